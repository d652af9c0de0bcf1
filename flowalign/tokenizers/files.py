"""File-level CDT tools behind ``flowalign tokenize encode | decode | reconstruct``.

Latent files are safetensors with one tensor ``latents`` [C_z, T', H', W'] (float32) and string
metadata: ``format`` (:data:`LATENT_FORMAT`), ``source``, ``num_frames``, ``height``, ``width``,
``is_image`` and ``trimmed``. Reconstructions of videos are written as ``.mp4`` by default (lossy;
metrics are computed on the decoded tensors before writing) and images as ``.png``.

Input that does not fit the tokenizer (frame count not 1 + 4k, sides not multiples of 8) is refused
with a :class:`~flowalign.data.media.MediaError` naming the file, unless ``trim=True``: then the clip
is cut to its longest 1 + 4k prefix and centre-cropped to multiples of 8, and the metadata says so.
"""

from __future__ import annotations

import logging
import math
import os
from collections.abc import Sequence
from pathlib import Path

import torch
from safetensors import SafetensorError
from safetensors.torch import safe_open
from torch import Tensor

from flowalign.data.media import (
    IMAGE_EXTENSIONS,
    MediaError,
    load_media,
    save_image,
    save_media,
)
from flowalign.files import atomic_write_json, save_safetensors
from flowalign.tokenizers.cdt import (
    ConditionedDiffusionTokenizer,
    decode_video,
    default_chunk_sizes,
    encode_video,
)
from flowalign.tokenizers.metrics import LpipsUnavailable, load_lpips, video_metrics

__all__ = [
    "LATENT_FORMAT",
    "decode_file",
    "encode_file",
    "fit_media",
    "load_tokenizer",
    "read_latents",
    "reconstruct_files",
]

logger = logging.getLogger(__name__)

LATENT_FORMAT = "flowalign.cdt.latents/1"

ModelLike = ConditionedDiffusionTokenizer | str | os.PathLike


def load_tokenizer(
    model: ModelLike, *, device: torch.device | str = "cpu", dtype: torch.dtype = torch.float32
) -> ConditionedDiffusionTokenizer:
    """A tokenizer in eval mode from a ``save_pretrained`` folder (config.json + safetensors) or as given."""
    if isinstance(model, ConditionedDiffusionTokenizer):
        return model.eval()
    path = Path(model)
    if not (path / "config.json").is_file():
        raise FileNotFoundError(
            f"{path}: not a CDT model folder (no config.json); expected save_pretrained output"
        )
    return ConditionedDiffusionTokenizer.from_pretrained(path, torch_dtype=dtype).to(device).eval()


def fit_media(
    media: Tensor, *, time_factor: int, space_factor: int, trim: bool, source: str | os.PathLike
) -> tuple[Tensor, bool]:
    """Check (or with ``trim`` cut) media [T, 3, H, W] / [3, H, W] to 1 + t_f k frames and sides % s_f == 0.

    Returns:
        (media [T', 3, H', W'] as a video, whether anything was cut).

    Raises:
        MediaError: naming ``source``, when the media does not fit and ``trim`` is False, or when
            it is smaller than one latent pixel.
    """
    video = media[None] if media.ndim == 3 else media
    t, _, h, w = video.shape
    keep_t = 1 + (t - 1) // time_factor * time_factor
    keep_h, keep_w = h // space_factor * space_factor, w // space_factor * space_factor
    if keep_h == 0 or keep_w == 0:
        raise MediaError(source, f"frames are {h}x{w}; the tokenizer needs sides of at least {space_factor}")
    if (keep_t, keep_h, keep_w) == (t, h, w):
        return video, False
    if not trim:
        problems = []
        if keep_t != t:
            problems.append(
                f"{t} frames (needs 1 + {time_factor}k: 1, {1 + time_factor}, {1 + 2 * time_factor}, ...)"
            )
        if (keep_h, keep_w) != (h, w):
            problems.append(f"size {h}x{w} (HxW; both sides must be multiples of {space_factor})")
        raise MediaError(
            source,
            "cannot tokenize " + " and ".join(problems) + "; pass trim=True (--trim) to cut "
            f"it to {keep_t} frames of {keep_h}x{keep_w}",
        )
    top, left = (h - keep_h) // 2, (w - keep_w) // 2
    return video[:keep_t, :, top : top + keep_h, left : left + keep_w], True


def _chunks(
    model: ConditionedDiffusionTokenizer, h: int, w: int, chunked: bool
) -> tuple[int | None, int | None]:
    return default_chunk_sizes(h, w, time_factor=model.time_factor) if chunked else (None, None)


@torch.no_grad()
def encode_file(
    model: ModelLike,
    input_path: str | os.PathLike,
    output_path: str | os.PathLike,
    *,
    trim: bool = False,
    chunked: bool = True,
    device: torch.device | str = "cpu",
) -> Path:
    """Encode an image or video file to a latent file (posterior means; see the module docstring).

    Args:
        model: tokenizer or its folder.
        input_path: image or video file (:func:`flowalign.data.media.load_media` formats).
        output_path: the ``.safetensors`` file to write (atomically).
        trim: cut a clip that does not fit instead of refusing it.
        chunked: encode chunk by chunk with the feature cache (flat memory); False = one pass.
        device: where to run.

    Returns:
        ``output_path``.
    """
    output_path = Path(output_path)
    if output_path.suffix != ".safetensors":
        raise ValueError(f"{output_path}: latent files must end in .safetensors")
    tok = load_tokenizer(model, device=device)
    media = load_media(input_path)
    video, trimmed = fit_media(
        media, time_factor=tok.time_factor, space_factor=tok.space_factor, trim=trim, source=input_path
    )
    t, _, h, w = video.shape
    chunk_frames, _ = _chunks(tok, h, w, chunked)
    z = encode_video(tok, video[None], chunk_frames=chunk_frames)[0]  # [C_z, T', H', W']
    meta = {
        "format": LATENT_FORMAT,
        "source": str(input_path),
        "num_frames": str(t),
        "height": str(h),
        "width": str(w),
        "is_image": str(media.ndim == 3).lower(),
        "trimmed": str(trimmed).lower(),
    }
    save_safetensors({"latents": z.float().cpu().contiguous()}, output_path, metadata=meta)
    return output_path


def read_latents(path: str | os.PathLike) -> tuple[Tensor, dict[str, str]]:
    """Latents [C_z, T', H', W'] and metadata of a file written by :func:`encode_file`.

    Raises:
        MediaError: missing or unreadable file, no ``latents`` tensor, or a wrong shape.
    """
    path = Path(path)
    if not path.is_file():
        raise MediaError(path, "latent file not found")
    try:
        with safe_open(str(path), framework="pt") as f:
            meta = dict(f.metadata() or {})
            if "latents" not in f.keys():
                raise MediaError(path, f"no 'latents' tensor (has {sorted(f.keys())})")
            z = f.get_tensor("latents")
    except (SafetensorError, OSError) as exc:
        raise MediaError(path, f"not a readable safetensors file ({exc})") from exc
    if z.ndim != 4:
        raise MediaError(path, f"'latents' must be [C, T, H, W], got {list(z.shape)}")
    return z, meta


@torch.no_grad()
def decode_file(
    model: ModelLike,
    latents_path: str | os.PathLike,
    output_path: str | os.PathLike,
    *,
    num_inference_steps: int = 1,
    seed: int = 0,
    chunked: bool = True,
    fps: float = 8,
    device: torch.device | str = "cpu",
) -> Path:
    """Decode a latent file to media: an image (``.png`` etc.) for 1-frame latents, else a video.

    Args:
        model: tokenizer or its folder.
        latents_path: a file from :func:`encode_file`.
        output_path: destination (its extension picks the format; images need a 1-frame latent).
        num_inference_steps: DDIM steps (1 = the released default).
        seed: seed of the initial noise.
        chunked: decode chunk by chunk with the feature cache.
        fps: frame rate of a video output.
        device: where to run.

    Returns:
        ``output_path``.
    """
    tok = load_tokenizer(model, device=device)
    z, _ = read_latents(latents_path)
    if z.shape[0] != tok.config.latent_channels:
        raise MediaError(
            latents_path,
            f"latents have {z.shape[0]} channels; this tokenizer uses {tok.config.latent_channels}",
        )
    _, chunk_latents = _chunks(tok, z.shape[2] * tok.space_factor, z.shape[3] * tok.space_factor, chunked)
    video = decode_video(
        tok,
        z[None],
        num_inference_steps=num_inference_steps,
        chunk_latents=chunk_latents,
        generator=torch.Generator().manual_seed(seed),
    )[0]  # [T, 3, H, W]
    _save(video, Path(output_path), fps=fps)
    return Path(output_path)


def _save(video: Tensor, path: Path, *, fps: float) -> None:
    if path.suffix.lower() in IMAGE_EXTENSIONS:
        if video.shape[0] != 1:
            raise MediaError(path, f"cannot save {video.shape[0]} frames as an image; use .mp4, .gif or .npy")
        save_image(video[0].cpu(), path)
    else:
        save_media(video.cpu(), path, fps=fps)


def _lpips_for(
    lpips: str | torch.nn.Module | None, device: torch.device | str
) -> tuple[torch.nn.Module | None, str]:
    if lpips is None or lpips == "none":
        return None, "none"
    if isinstance(lpips, torch.nn.Module):
        return lpips, "custom"
    if lpips == "auto":
        try:
            return load_lpips("alex", device=device), "alex"
        except LpipsUnavailable as exc:
            logger.warning("LPIPS skipped: %s", exc)
            return None, f"unavailable: {exc}"
    if lpips == "alex-random":
        return load_lpips("alex", random_backbone=True, device=device), "alex-random (NOT comparable)"
    return load_lpips(lpips, device=device), lpips


@torch.no_grad()
def reconstruct_files(
    model: ModelLike,
    inputs: Sequence[str | os.PathLike],
    out_dir: str | os.PathLike,
    *,
    num_inference_steps: int = 1,
    seed: int = 0,
    trim: bool = False,
    chunked: bool = True,
    lpips: str | torch.nn.Module | None = "auto",
    video_ext: str = ".mp4",
    fps: float = 8,
    device: torch.device | str = "cpu",
) -> dict:
    """Encode and decode each file, write the reconstructions and ``metrics.json``; return the metrics.

    Args:
        model: tokenizer or its folder.
        inputs: image or video files.
        out_dir: where ``<stem>.recon<ext>`` files and ``metrics.json`` go.
        num_inference_steps: DDIM steps.
        seed: noise seed (the same for every file).
        trim: cut clips that do not fit (see :func:`fit_media`) instead of refusing them.
        chunked: chunked encode/decode with the feature cache.
        lpips: "auto" (LPIPS-Alex if its backbone weights are on disk, else skipped with a warning),
            "alex" / "vgg" / "squeeze" (required), "alex-random" (tests only), "none", or a module.
        video_ext: ".mp4", ".gif" or ".npy" for video reconstructions.
        fps: frame rate of written videos.
        device: where to run.

    Returns:
        {"files": [{"input", "output", "num_frames", "height", "width", "trimmed", "psnr", "ssim",
        "lpips"}], "mean": {"psnr", "ssim", "lpips"}, "lpips_backbone", "num_inference_steps", "seed"}.
        Every input is checked before any work, so one bad file fails the call without output.
    """
    if not inputs:
        raise ValueError("reconstruct_files: no input files")
    tok = load_tokenizer(model, device=device)
    lpips_fn, backbone = _lpips_for(lpips, device)
    out_dir = Path(out_dir)
    loaded = []
    for path in inputs:
        media = load_media(path)
        video, trimmed = fit_media(
            media, time_factor=tok.time_factor, space_factor=tok.space_factor, trim=trim, source=path
        )
        loaded.append((Path(path), media.ndim == 3, video, trimmed))
    rows, used = [], set()
    for i, (path, is_image, video, trimmed) in enumerate(loaded):
        t, _, h, w = video.shape
        chunk_frames, chunk_latents = _chunks(tok, h, w, chunked)
        z = encode_video(tok, video[None], chunk_frames=chunk_frames)
        rec = decode_video(
            tok,
            z,
            num_inference_steps=num_inference_steps,
            chunk_latents=chunk_latents,
            generator=torch.Generator().manual_seed(seed),
        )  # [1, T, 3, H, W]
        scores = video_metrics(rec, video[None].to(rec.device), lpips_fn=lpips_fn)
        name = f"{path.stem}.recon{'.png' if is_image else video_ext}"
        if name in used:
            name = f"{path.stem}.{i}.recon{'.png' if is_image else video_ext}"
        used.add(name)
        _save(rec[0], out_dir / name, fps=fps)
        rows.append(
            {
                "input": str(path),
                "output": str(out_dir / name),
                "num_frames": t,
                "height": h,
                "width": w,
                "trimmed": trimmed,
                **{k: float(v[0]) for k, v in scores.items()},
            }
        )
    keys = ["psnr", "ssim"] + (["lpips"] if lpips_fn is not None else [])
    result = {
        "files": rows,
        "mean": {k: math.fsum(r[k] for r in rows) / len(rows) for k in keys},
        "lpips_backbone": backbone,
        "num_inference_steps": num_inference_steps,
        "seed": seed,
    }
    atomic_write_json(out_dir / "metrics.json", result)
    return result
