"""Read and write images as float tensors ``[3, H, W]`` in [0, 1] (Pillow).

Files: ``.png``, ``.jpg``/``.jpeg``, ``.webp``, ``.bmp``; the content must match the extension. Every
problem with a file raises :class:`~flowalign.data.errors.MediaError` naming the path and the reason;
input is never silently repaired, and writes are atomic (:func:`flowalign.files.atomic_write`).
:mod:`flowalign.data.media` is the front door (images and videos by extension or rank).
"""

from __future__ import annotations

import os
import struct
import warnings
from pathlib import Path

import numpy as np
import torch
from PIL import Image, UnidentifiedImageError
from torch import Tensor

from flowalign.data.errors import MediaError
from flowalign.files import atomic_write

__all__ = ["IMAGE_EXTENSIONS", "MAX_IMAGE_PIXELS", "decode_image_bytes", "load_image", "save_image"]

MAX_IMAGE_PIXELS: int = 8192 * 8192
"""Largest image (width * height) that is decoded; bigger files are refused as a likely
decompression bomb. Checked from the header, before any pixel is decoded. Pillow's own
global ``Image.MAX_IMAGE_PIXELS`` is left untouched."""

IMAGE_EXTENSIONS: frozenset[str] = frozenset({".png", ".jpg", ".jpeg", ".webp", ".bmp"})

# Pillow format names accepted for each image extension (content must match the name).
_PIL_FORMATS: dict[str, frozenset[str]] = {
    ".png": frozenset({"PNG"}),
    ".jpg": frozenset({"JPEG", "MPO"}),
    ".jpeg": frozenset({"JPEG", "MPO"}),
    ".webp": frozenset({"WEBP"}),
    ".bmp": frozenset({"BMP", "DIB"}),
    ".gif": frozenset({"GIF"}),
}
_SAVE_IMAGE_FORMATS = {".png": "PNG", ".jpg": "JPEG", ".jpeg": "JPEG", ".webp": "WEBP", ".bmp": "BMP"}

# What Pillow's decoders raise on corrupt or truncated data (a cut GIF frame gives IndexError, a bad
# header struct.error), besides OSError.
_PIL_DECODE_ERRORS = (OSError, SyntaxError, ValueError, IndexError, struct.error)


def _check_file(path: Path, allowed: frozenset[str], kind: str) -> str:
    """Check existence, non-emptiness and extension; return the lower-case extension."""
    ext = path.suffix.lower()
    if ext not in allowed:
        raise MediaError(
            path, f"unsupported {kind} extension {ext or '(none)'!r}; expected one of {sorted(allowed)}"
        )
    if not path.exists():
        raise MediaError(path, "file does not exist")
    if not path.is_file():
        raise MediaError(path, "not a regular file")
    if path.stat().st_size == 0:
        raise MediaError(path, "file is empty (0 bytes)")
    return ext


def _check_pixels(source: str | Path, width: int, height: int) -> None:
    if width <= 0 or height <= 0:
        raise MediaError(source, f"invalid size {width}x{height}")
    if width * height > MAX_IMAGE_PIXELS:
        raise MediaError(
            source,
            f"image of {width}x{height} = {width * height} pixels exceeds MAX_IMAGE_PIXELS = "
            f"{MAX_IMAGE_PIXELS} (possible decompression bomb)",
        )


def _pil_to_tensor(img: Image.Image, source: str | Path) -> Tensor:
    """Decoded Pillow image -> float32 [3, H, W] in [0, 1]."""
    if img.mode in ("I;16", "I;16L", "I;16B"):
        # 16-bit grayscale: scale by the full 16-bit range instead of Pillow's clipping to 8 bits.
        gray = np.asarray(img, dtype=np.float32) / 65535.0  # [H, W]
        return torch.from_numpy(gray).unsqueeze(0).expand(3, -1, -1).contiguous()
    if img.mode in ("I", "F"):
        raise MediaError(source, f"unsupported image mode {img.mode!r} (32-bit integer/float pixels)")
    if img.mode != "RGB":
        img = img.convert("RGB")  # alpha is dropped, palette/grayscale/CMYK expanded
    arr = np.asarray(img, dtype=np.uint8)  # [H, W, 3]
    return torch.from_numpy(arr.copy()).permute(2, 0, 1).float().div_(255.0)  # [3, H, W]


def _open_pil(fp: object, source: str | Path) -> Image.Image:
    """Open with Pillow, turning every decoder complaint into MediaError."""
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", Image.DecompressionBombWarning)
            return Image.open(fp)  # type: ignore[arg-type]
    except Image.DecompressionBombError as exc:
        raise MediaError(source, f"refused as a decompression bomb ({exc})") from exc
    except UnidentifiedImageError as exc:
        raise MediaError(source, "cannot decode image (not a recognised image format)") from exc
    except _PIL_DECODE_ERRORS as exc:
        raise MediaError(source, f"cannot decode image ({type(exc).__name__}: {exc})") from exc


def _decode_pil_image(img: Image.Image, source: str | Path, expected_ext: str | None) -> Tensor:
    if expected_ext is not None and img.format not in _PIL_FORMATS.get(expected_ext, frozenset()):
        raise MediaError(source, f"extension {expected_ext!r} but the content is {img.format or 'unknown'}")
    _check_pixels(source, *img.size)
    try:
        img.load()
        return _pil_to_tensor(img, source)
    except MediaError:
        raise
    except _PIL_DECODE_ERRORS as exc:
        raise MediaError(source, f"cannot decode image, truncated or corrupt ({exc})") from exc


def load_image(path: str | os.PathLike[str]) -> Tensor:
    """Read an image file into a float tensor.

    Grayscale, palette and CMYK images are expanded to RGB; an alpha channel is dropped
    (not composited); 16-bit grayscale is scaled by 1/65535.

    Args:
        path: a ``.png``, ``.jpg``/``.jpeg``, ``.webp`` or ``.bmp`` file whose content matches
            its extension.

    Returns:
        float32 tensor ``[3, H, W]`` with values in [0, 1] (uint8 value k maps to k / 255).

    Raises:
        MediaError: missing, empty, truncated or undecodable file, wrong or unsupported
            extension, or more than :data:`MAX_IMAGE_PIXELS` pixels.
    """
    path = Path(path)
    ext = _check_file(path, IMAGE_EXTENSIONS, "image")
    with _open_pil(path, path) as img:
        return _decode_pil_image(img, path, ext)


def decode_image_bytes(data: bytes, *, source: str) -> Tensor:
    """Decode an encoded image (PNG/JPEG/WebP/BMP bytes, e.g. a parquet cell).

    Args:
        data: the encoded file content.
        source: a description used in error messages, e.g. ``"pairs.parquet row 3 jpg_0"``.

    Returns:
        float32 tensor ``[3, H, W]`` in [0, 1].

    Raises:
        MediaError: empty or undecodable bytes, or too many pixels.
    """
    import io

    if not data:
        raise MediaError(source, "image bytes are empty")
    with _open_pil(io.BytesIO(data), source) as img:
        if img.format not in {f for fs in _PIL_FORMATS.values() for f in fs} - {"GIF"}:
            raise MediaError(source, f"unsupported image format {img.format!r}")
        return _decode_pil_image(img, source, None)


def _to_uint8(x: Tensor, path: Path, what: str) -> np.ndarray:
    """Check a float tensor in [0, 1] and quantise it (round to nearest) to uint8."""
    if not torch.is_floating_point(x):
        raise MediaError(path, f"{what} must be a float tensor in [0, 1], got dtype {x.dtype}")
    x = x.detach().to(device="cpu", dtype=torch.float32)
    if not torch.isfinite(x).all():
        raise MediaError(path, f"{what} contains NaN or Inf")
    lo, hi = float(x.min()), float(x.max())
    if lo < 0.0 or hi > 1.0:
        raise MediaError(path, f"{what} values must lie in [0, 1], got [{lo:.4g}, {hi:.4g}]")
    return (x * 255.0).round_().to(torch.uint8).numpy()


def save_image(image: Tensor, path: str | os.PathLike[str]) -> None:
    """Write a float image atomically (PNG lossless; JPEG at quality 95; WebP lossless).

    Values are quantised as round(255 * x), so ``load_image(save_image(x))`` returns ``x``
    exactly when ``x`` holds multiples of 1/255.

    Args:
        image: float tensor ``[3, H, W]`` with values in [0, 1] (any device).
        path: destination ending in ``.png``, ``.jpg``/``.jpeg``, ``.webp`` or ``.bmp``.

    Raises:
        MediaError: wrong shape or dtype, values outside [0, 1] or non-finite, or an
            unsupported extension.
    """
    path = Path(path)
    fmt = _SAVE_IMAGE_FORMATS.get(path.suffix.lower())
    if fmt is None:
        raise MediaError(
            path, f"cannot save an image as {path.suffix!r}; use one of {sorted(_SAVE_IMAGE_FORMATS)}"
        )
    if image.ndim != 3 or image.shape[0] != 3:
        raise MediaError(path, f"image must have shape [3, H, W], got {tuple(image.shape)}")
    arr = _to_uint8(image, path, "image").transpose(1, 2, 0)  # [H, W, 3]
    options = {"quality": 95} if fmt == "JPEG" else {"lossless": True} if fmt == "WEBP" else {}
    with atomic_write(path) as tmp:
        Image.fromarray(np.ascontiguousarray(arr), mode="RGB").save(tmp, format=fmt, **options)
