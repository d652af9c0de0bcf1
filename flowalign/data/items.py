"""Map-style datasets of training items built from files: one dict per item, collated by
:mod:`flowalign.data.batches`.

- :class:`ManifestDataset`: media + prompts of a manifest.jsonl -> ``{"pixels", "prompt", "index"}``
  (:class:`~flowalign.data.batches.MediaBatch`).
- :class:`PairDataset`: ordered preference pairs -> ``{"media_w", "media_l", "prompt", "index"}``
  (:class:`~flowalign.data.batches.PairBatch`).
- :class:`VideoFolderDataset`: the video files of a folder as clips -> ``{"pixels"}``.
"""

from __future__ import annotations

import os
from pathlib import Path

from torch import Tensor
from torch.utils.data import Dataset

from flowalign.data.buckets import BucketConfig, BucketedPairs, check_same_size
from flowalign.data.errors import DataError
from flowalign.data.media import VIDEO_EXTENSIONS, MediaError, load_video
from flowalign.data.paths import load_row_media, resolve_data_path
from flowalign.data.preference import load_preference_dataset
from flowalign.files import read_jsonl

__all__ = ["ManifestDataset", "PairDataset", "VideoFolderDataset"]


class ManifestDataset(Dataset):
    """Media + prompts listed in a manifest.jsonl ({"file" or "path", "prompt"}, paths relative to it);
    an ``"image"`` on every row is each sample's condition image (image-conditioned families)."""

    def __init__(self, manifest: str | Path):
        self.manifest = Path(manifest)
        if not self.manifest.is_file():
            raise DataError(self.manifest, "manifest not found")
        self.rows = []
        for number, row in read_jsonl(self.manifest, error=DataError):
            file = row.get("file") or row.get("path")
            prompt = row.get("prompt")
            if not file or not isinstance(prompt, str) or not prompt.strip():
                raise DataError(
                    self.manifest, "needs a non-empty 'prompt' and a 'file'", where=f"line {number}"
                )
            where = f"line {number}"
            path = resolve_data_path(
                self.manifest.parent, file, source=self.manifest, where=where, key="file"
            )
            image = row.get("image")
            if image is not None:
                image = resolve_data_path(
                    self.manifest.parent, image, source=self.manifest, where=where, key="image"
                )
            self.rows.append((path, prompt, where, image))
        if not self.rows:
            raise DataError(self.manifest, "has no rows")

    def __len__(self) -> int:
        return len(self.rows)

    def __getitem__(self, i: int) -> dict:
        path, prompt, where, image = self.rows[i]
        pixels = load_row_media(path, source=self.manifest, where=where, key="file")
        item = {"pixels": pixels, "prompt": prompt, "index": i}
        if image is not None:
            item["condition"] = load_row_media(image, source=self.manifest, where=where, key="image")
        return item

    def prompts(self) -> list[str]:
        return [row[1] for row in self.rows]


class PairDataset(Dataset):
    """Preference pairs as training items for DPO.

    Each pair is ordered by its single label, or by the ``Overall`` dimension of multi-dimensional
    labels (VideoAlign); ties on it are dropped unless ``keep_ties`` (the count is logged). With
    ``buckets`` every pair is resized and cropped into its aspect-ratio bucket and each global batch
    comes from one bucket (:mod:`flowalign.data.buckets`); without, the two media of a pair must have
    one size (else one :class:`DataError` naming the row).
    """

    def __init__(self, path: str | Path, *, keep_ties: bool = False, buckets: BucketConfig | None = None):
        pairs = load_preference_dataset(path)
        order_by = pairs.order_by
        if order_by is None:  # multi-dimensional labels: the overall one orders each pair
            order_by = next((d for d in pairs.dimensions if d.lower() == "overall"), None)
            if order_by is None:
                raise DataError(
                    pairs.path,
                    f"DPO needs one preference per pair; the labels have dimensions {list(pairs.dimensions)} "
                    "and none is 'Overall'",
                )
        if order_by != pairs.order_by or not keep_ties:
            pairs = load_preference_dataset(path, order_by=order_by, keep_ties=keep_ties)
        self.pairs = BucketedPairs(pairs, buckets) if buckets is not None else pairs
        if buckets is not None:  # the loop's data cursor then takes each global batch from one bucket
            self.batch_order = self.pairs.batch_order

    def __len__(self) -> int:
        return len(self.pairs)

    def __getitem__(self, i: int) -> dict:
        pair = self.pairs[i]
        check_same_size(pair.media_w, pair.media_l, source=pair.source)
        item = {"media_w": pair.media_w, "media_l": pair.media_l, "prompt": pair.prompt, "index": i}
        if pair.condition is not None:  # image-conditioned families: the pair's shared condition image
            item["condition"] = pair.condition
        return item

    def prompts(self) -> list[str]:
        return [self.pairs.prompt(i) for i in range(len(self.pairs))]


class VideoFolderDataset(Dataset):
    """Clips from the video files in a folder: the first ``num_frames`` frames, centre-cropped to ``size``.

    Items are {"pixels": [T, 3, size, size] in [0, 1]}. A file with too few frames or smaller than
    ``size`` raises :class:`MediaError` naming it when read.
    """

    def __init__(self, folder: str | os.PathLike, *, num_frames: int, size: int) -> None:
        self.folder = Path(folder)
        if not self.folder.is_dir():
            raise FileNotFoundError(f"{self.folder}: video folder not found")
        self.files = sorted(p for p in self.folder.iterdir() if p.suffix.lower() in VIDEO_EXTENSIONS)
        if not self.files:
            raise ValueError(f"{self.folder}: no video files ({sorted(VIDEO_EXTENSIONS)})")
        self.num_frames, self.size = num_frames, size

    def __len__(self) -> int:
        return len(self.files)

    def __getitem__(self, index: int) -> dict[str, Tensor]:
        path = self.files[index]
        video = load_video(path, max_frames=self.num_frames)  # [T, 3, H, W]
        t, _, h, w = video.shape
        if t < self.num_frames or h < self.size or w < self.size:
            raise MediaError(
                path, f"need >= {self.num_frames} frames of >= {self.size}x{self.size}, got {t} of {h}x{w}"
            )
        top, left = (h - self.size) // 2, (w - self.size) // 2
        return {"pixels": video[:, :, top : top + self.size, left : left + self.size].contiguous()}
