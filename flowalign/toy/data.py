"""Toy datasets: on-the-fly torch ``Dataset``, a pre-rendered copy (:class:`PrerenderedToy`), the
cache folder of trained toy models (:func:`cache_root`) and an exporter to files + ``manifest.jsonl``.

Exported layout (``out_dir``)::

    manifest.jsonl            one JSON object a line: id, prompt, file, shape, colour, size, position,
                              (motion), kind, split, seed, index
    images/00000.png          RGB uint8 PNG (lossless), for kind="image"
    videos/00000.npy          uint8 array [T, H, W, 3], for kind="video"

Pixels are stored as round(255 * x), so reading back reproduces the rendered floats within 0.5/255.
"""

from __future__ import annotations

import os
from pathlib import Path

import numpy as np
import torch
from PIL import Image
from torch import Tensor
from torch.utils.data import Dataset

from flowalign.files import read_jsonl, write_jsonl
from flowalign.toy.render import render_image, render_images, render_video, render_videos
from flowalign.toy.world import KINDS, SPLITS, Scene, sample_scene

MANIFEST = "manifest.jsonl"


class ToyDataset(Dataset):
    """Toy images or clips with their captions, rendered on the fly from (split, index, seed).

    Item ``i`` is ``sample_scene(i, seed=seed, split=split, kind=kind)`` rendered, so two datasets with
    the same arguments yield identical items, and a held-out dataset never yields a training caption.

    Args:
        split: "train" or "heldout".
        kind: "image" or "video".
        num: number of items.
        seed: stream seed.
        size: frame side in pixels.
        num_frames: frames per clip (videos only).
    """

    def __init__(
        self,
        split: str = "train",
        *,
        kind: str = "image",
        num: int = 10_000,
        seed: int = 0,
        size: int = 32,
        num_frames: int = 8,
    ) -> None:
        if split not in SPLITS:
            raise ValueError(f"ToyDataset split must be one of {list(SPLITS)}, got {split!r}")
        if kind not in KINDS:
            raise ValueError(f"ToyDataset kind must be one of {list(KINDS)}, got {kind!r}")
        if num < 1:
            raise ValueError(f"ToyDataset num must be >= 1, got {num}")
        self.split, self.kind, self.num, self.seed = split, kind, num, seed
        self.size, self.num_frames = size, num_frames

    def __len__(self) -> int:
        return self.num

    def scene(self, index: int) -> Scene:
        """The scene behind item ``index``."""
        if not 0 <= index < self.num:
            raise IndexError(f"ToyDataset index {index} out of range [0, {self.num})")
        return sample_scene(index, seed=self.seed, split=self.split, kind=self.kind)

    def __getitem__(self, index: int) -> dict[str, Tensor | str]:
        """{"pixels": float32 [3, H, W] or [T, 3, H, W] in [0, 1], "prompt": str}."""
        scene = self.scene(index)
        if self.kind == "image":
            pixels = render_image(scene, size=self.size)
        else:
            pixels = render_video(scene, num_frames=self.num_frames, size=self.size)
        return {"pixels": pixels, "prompt": scene.caption}


def _to_uint8(pixels: Tensor) -> np.ndarray:
    """float [..., 3, H, W] in [0, 1] -> uint8 [..., H, W, 3]."""
    arr = (pixels.clamp(0.0, 1.0) * 255.0).round().to(torch.uint8).numpy()
    return np.moveaxis(arr, -3, -1)


def export_toy_dataset(
    out_dir: str | os.PathLike,
    *,
    kind: str = "image",
    split: str = "train",
    num: int,
    seed: int = 0,
    size: int = 32,
    num_frames: int = 8,
    overwrite: bool = False,
) -> Path:
    """Write ``num`` items of :class:`ToyDataset` to ``out_dir`` as PNG / npy files plus a manifest.

    The manifest is written last, to a temporary name then renamed, so a crash never leaves a manifest
    that points to missing files.

    Args:
        out_dir: target folder (created if needed).
        kind: "image" (PNG) or "video" (npy uint8 [T, H, W, 3]).
        split: "train" or "heldout".
        num: number of items.
        seed: stream seed (item i is the dataset's item i).
        size: frame side in pixels.
        num_frames: frames per clip (videos only).
        overwrite: replace an existing manifest in ``out_dir``; otherwise that is an error.

    Returns:
        Path of the written ``manifest.jsonl``.
    """
    out = Path(out_dir)
    manifest = out / MANIFEST
    if manifest.exists() and not overwrite:
        raise FileExistsError(f"{manifest} already exists; pass overwrite=True to replace the export")
    data = ToyDataset(split, kind=kind, num=num, seed=seed, size=size, num_frames=num_frames)
    sub = "images" if kind == "image" else "videos"
    (out / sub).mkdir(parents=True, exist_ok=True)
    rows = []
    for i in range(num):
        scene = data.scene(i)
        item = data[i]
        if kind == "image":
            rel = f"{sub}/{i:05d}.png"
            Image.fromarray(_to_uint8(item["pixels"])).save(out / rel)
        else:
            rel = f"{sub}/{i:05d}.npy"
            np.save(out / rel, _to_uint8(item["pixels"]))
        attrs = {k: v for k, v in scene.attributes.as_dict().items() if v is not None}
        rows.append(
            {"id": f"{split}-{kind}-{seed}-{i:05d}", "prompt": item["prompt"], "file": rel, **attrs}
            | {"kind": kind, "split": split, "seed": seed, "index": i}
        )
    return write_jsonl(manifest, rows)


def load_toy_export(out_dir: str | os.PathLike) -> list[dict]:
    """Read an export back: each manifest row plus "pixels" (float32 [3, H, W] or [T, 3, H, W] in [0, 1]).

    Raises:
        ValueError: naming the file and line of a malformed manifest row or an unreadable media file.
    """
    manifest = Path(out_dir) / MANIFEST
    if not manifest.is_file():
        raise ValueError(f"no toy export at {out_dir}: {manifest} does not exist")
    rows = []
    for line_no, row in read_jsonl(manifest):
        if not isinstance(row.get("file"), str) or not isinstance(row.get("prompt"), str):
            raise ValueError(
                f"{manifest}: line {line_no}: bad manifest row; need 'file' and 'prompt' strings"
            )
        rel, prompt = row["file"], row["prompt"]
        path = Path(out_dir) / rel
        if not path.is_file():
            raise ValueError(f"{manifest}: line {line_no}: file {path} for prompt {prompt!r} does not exist")
        try:
            arr = np.load(path) if path.suffix == ".npy" else np.asarray(Image.open(path).convert("RGB"))
        except (OSError, ValueError) as err:
            raise ValueError(f"{manifest}: line {line_no}: cannot read {path}: {err}") from None
        if arr.dtype != np.uint8 or arr.shape[-1] != 3 or arr.ndim not in (3, 4):
            raise ValueError(
                f"{manifest}: line {line_no}: {path} must be uint8 [H, W, 3] or [T, H, W, 3], "
                f"got {arr.dtype} {arr.shape}"
            )
        pixels = torch.from_numpy(np.moveaxis(arr, -1, -3).copy()).float() / 255.0
        rows.append({**row, "pixels": pixels})
    return rows


class PrerenderedToy(Dataset):
    """A :class:`ToyDataset` rendered once up front in large batches (rendering per item costs ~25% of a step)."""

    def __init__(self, source: ToyDataset, *, chunk: int = 4096):
        self.prompts = [source.scene(i).caption for i in range(len(source))]
        scenes = [source.scene(i) for i in range(len(source))]
        render = render_images if source.kind == "image" else render_videos
        kwargs = (
            {"size": source.size}
            if source.kind == "image"
            else {"size": source.size, "num_frames": source.num_frames}
        )
        self.pixels = torch.cat(
            [render(scenes[i : i + chunk], **kwargs) for i in range(0, len(scenes), chunk)]
        )

    def __len__(self) -> int:
        return len(self.prompts)

    def __getitem__(self, i: int) -> dict:
        return {"pixels": self.pixels[i], "prompt": self.prompts[i], "index": i}


def cache_root() -> Path:
    """Where trained toy models are cached: ``$FLOWALIGN_CACHE``, default ``~/.cache/flowalign``."""
    return Path(os.environ.get("FLOWALIGN_CACHE", Path.home() / ".cache" / "flowalign"))
