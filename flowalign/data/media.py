"""Read and write images and videos as float tensors in [0, 1].

The reward boundary of flowalign (see docs/design.md) speaks one format: images are float32
``[3, H, W]`` and videos float32 ``[T, 3, H, W]`` with values in [0, 1]. This module is the
only place that turns files into that format and back.

Supported files:

- images: ``.png``, ``.jpg``/``.jpeg``, ``.webp``, ``.bmp`` (read through Pillow);
- videos: ``.mp4``, ``.webm``, ``.mov``, ``.mkv`` (PyAV when importable, else the ffmpeg
  binary bundled with ``imageio-ffmpeg``), ``.gif`` (Pillow) and ``.npy`` arrays
  (``[T, H, W, 3]`` uint8 or ``[T, 3, H, W]`` float in [0, 1]).

Every problem with a file (missing, empty, truncated, undecodable, an unsupported or wrong
extension, too many pixels) raises :class:`MediaError` naming the path and the reason.
Input is never silently repaired: a float array outside [0, 1] is refused, not clipped.

All writes are atomic: the data goes to a temporary file in the destination folder, which is
then renamed over the destination with :func:`os.replace`, so an interrupted write never
leaves a half-written file under the final name.
"""

from __future__ import annotations

import os
import struct
import warnings
from collections.abc import Callable, Iterator
from pathlib import Path

import numpy as np
import torch
from PIL import Image, ImageSequence, UnidentifiedImageError
from torch import Tensor

from flowalign.data.errors import DataError
from flowalign.files import atomic_write

__all__ = [
    "IMAGE_EXTENSIONS",
    "MAX_IMAGE_PIXELS",
    "MAX_VIDEO_PIXELS",
    "VIDEO_EXTENSIONS",
    "MediaError",
    "atomic_write",
    "decode_image_bytes",
    "load_image",
    "load_media",
    "load_video",
    "save_image",
    "save_media",
    "save_video",
]

MAX_IMAGE_PIXELS: int = 8192 * 8192
"""Largest image (width * height) that is decoded; bigger files are refused as a likely
decompression bomb. Checked from the header, before any pixel is decoded. Pillow's own
global ``Image.MAX_IMAGE_PIXELS`` is left untouched."""

MAX_VIDEO_PIXELS: int = 2**31
"""Largest video (frames * width * height) that is decoded, about 8 GiB as uint8 RGB."""

IMAGE_EXTENSIONS: frozenset[str] = frozenset({".png", ".jpg", ".jpeg", ".webp", ".bmp"})
VIDEO_EXTENSIONS: frozenset[str] = frozenset({".mp4", ".webm", ".mov", ".mkv", ".gif", ".npy"})

# Pillow format names accepted for each image extension (content must match the name).
_PIL_FORMATS: dict[str, frozenset[str]] = {
    ".png": frozenset({"PNG"}),
    ".jpg": frozenset({"JPEG", "MPO"}),
    ".jpeg": frozenset({"JPEG", "MPO"}),
    ".webp": frozenset({"WEBP"}),
    ".bmp": frozenset({"BMP", "DIB"}),
    ".gif": frozenset({"GIF"}),
}
_FFMPEG_EXTENSIONS = frozenset({".mp4", ".webm", ".mov", ".mkv"})
_SAVE_IMAGE_FORMATS = {".png": "PNG", ".jpg": "JPEG", ".jpeg": "JPEG", ".webp": "WEBP", ".bmp": "BMP"}
_SAVE_VIDEO_EXTENSIONS = frozenset({".mp4", ".gif", ".npy"})


# What Pillow's decoders raise on corrupt or truncated data (a cut GIF frame gives IndexError, a bad
# header struct.error), besides OSError.
_PIL_DECODE_ERRORS = (OSError, SyntaxError, ValueError, IndexError, struct.error)


class MediaError(DataError):
    """A media file could not be read or written; the message names the path and the reason."""

    def __init__(self, path: str | os.PathLike[str], reason: str) -> None:
        super().__init__(path, reason)


# ----------------------------------------------------------------------------- helpers


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


# ----------------------------------------------------------------------------- images


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


# ----------------------------------------------------------------------------- videos


def _frames_to_tensor(frames: list[np.ndarray], source: str | Path) -> Tensor:
    if not frames:
        raise MediaError(source, "video has zero frames")
    shapes = {f.shape for f in frames}
    if len(shapes) != 1:
        raise MediaError(source, f"frames have different shapes {sorted(shapes)}")
    video = torch.from_numpy(np.stack(frames))  # [T, H, W, 3] uint8
    return video.permute(0, 3, 1, 2).float().div_(255.0).contiguous()  # [T, 3, H, W]


def _check_video_budget(source: str | Path, num_frames: int, width: int, height: int) -> None:
    _check_pixels(source, width, height)
    if num_frames * width * height > MAX_VIDEO_PIXELS:
        raise MediaError(
            source, f"video exceeds MAX_VIDEO_PIXELS = {MAX_VIDEO_PIXELS} after {num_frames} frames"
        )


def _read_gif(path: Path, max_frames: int | None) -> list[np.ndarray]:
    frames: list[np.ndarray] = []
    with _open_pil(path, path) as img:
        if img.format != "GIF":
            raise MediaError(path, f"extension '.gif' but the content is {img.format or 'unknown'}")
        try:
            for frame in ImageSequence.Iterator(img):
                if max_frames is not None and len(frames) >= max_frames:
                    break
                _check_video_budget(path, len(frames) + 1, *frame.size)
                frames.append(np.asarray(frame.convert("RGB"), dtype=np.uint8).copy())  # [H, W, 3]
        except MediaError:
            raise
        except (*_PIL_DECODE_ERRORS, EOFError) as exc:
            raise MediaError(path, f"cannot decode GIF, truncated or corrupt ({exc})") from exc
    return frames


def _read_npy(path: Path, max_frames: int | None) -> Tensor:
    try:
        arr = np.load(path, allow_pickle=False, mmap_mode="r")
    # numpy's header parser raises many kinds (SyntaxError, TokenError, OverflowError)
    except Exception as exc:
        raise MediaError(path, f"cannot read .npy array ({exc})") from exc
    if arr.ndim != 4:
        raise MediaError(path, f"expected a 4-D array [T,H,W,3] or [T,3,H,W], got shape {tuple(arr.shape)}")
    if max_frames is not None:
        arr = arr[:max_frames]
    if arr.shape[0] == 0:
        raise MediaError(path, "video has zero frames")
    if arr.dtype == np.uint8:
        if arr.shape[3] != 3:
            raise MediaError(path, f"uint8 arrays must be [T,H,W,3], got shape {tuple(arr.shape)}")
        _check_video_budget(path, arr.shape[0], arr.shape[2], arr.shape[1])
        video = torch.from_numpy(np.array(arr, copy=True))  # [T, H, W, 3], copied out of the mmap
        return video.permute(0, 3, 1, 2).float().div_(255.0).contiguous()  # [T, 3, H, W]
    if np.issubdtype(arr.dtype, np.floating):
        if arr.shape[1] != 3:
            raise MediaError(path, f"float arrays must be [T,3,H,W], got shape {tuple(arr.shape)}")
        _check_video_budget(path, arr.shape[0], arr.shape[3], arr.shape[2])
        video = torch.from_numpy(np.array(arr, dtype=np.float32, copy=True))  # [T, 3, H, W]
        if not torch.isfinite(video).all():
            raise MediaError(path, "float array contains NaN or Inf")
        lo, hi = float(video.min()), float(video.max())
        if lo < 0.0 or hi > 1.0:
            raise MediaError(path, f"float array values must lie in [0, 1], got [{lo:.4g}, {hi:.4g}]")
        return video
    raise MediaError(path, f"unsupported dtype {arr.dtype}; expected uint8 [T,H,W,3] or float [T,3,H,W]")


def _read_ffmpeg(path: Path, max_frames: int | None) -> list[np.ndarray]:
    """Decode with the ffmpeg binary bundled in imageio-ffmpeg (a subprocess)."""
    import imageio_ffmpeg

    frames: list[np.ndarray] = []
    gen: Iterator = imageio_ffmpeg.read_frames(str(path), pix_fmt="rgb24")
    try:
        meta = next(gen)
        width, height = (int(s) for s in meta["size"])
        _check_pixels(path, width, height)
        for raw in gen:
            if max_frames is not None and len(frames) >= max_frames:
                break
            _check_video_budget(path, len(frames) + 1, width, height)
            frames.append(np.frombuffer(raw, dtype=np.uint8).reshape(height, width, 3))  # [H, W, 3]
    except MediaError:
        raise
    except (OSError, RuntimeError, StopIteration, KeyError, ValueError) as exc:
        raise MediaError(path, f"cannot decode video with ffmpeg ({str(exc).strip()[:500]})") from exc
    finally:
        gen.close()  # stops the ffmpeg subprocess when we leave early
    return frames


def _read_pyav(path: Path, max_frames: int | None) -> list[np.ndarray]:
    """Decode in-process with PyAV."""
    import av

    frames: list[np.ndarray] = []
    try:
        with av.open(str(path)) as container:
            if not container.streams.video:
                raise MediaError(path, "file has no video stream")
            for frame in container.decode(video=0):
                if max_frames is not None and len(frames) >= max_frames:
                    break
                _check_video_budget(path, len(frames) + 1, frame.width, frame.height)
                frames.append(frame.to_ndarray(format="rgb24"))  # [H, W, 3]
    except MediaError:
        raise
    except (av.FFmpegError, OSError, ValueError) as exc:
        raise MediaError(path, f"cannot decode video with PyAV ({exc})") from exc
    return frames


def _video_reader() -> Callable[[Path, int | None], list[np.ndarray]]:
    try:
        import av  # noqa: F401
    except ImportError:
        return _read_ffmpeg
    return _read_pyav


def load_video(path: str | os.PathLike[str], max_frames: int | None = None) -> Tensor:
    """Read a video file into a float tensor.

    Containers (mp4/webm/mov/mkv) are decoded with PyAV when it is importable, otherwise with
    the ffmpeg binary bundled in ``imageio-ffmpeg``; GIFs with Pillow (each frame composited
    as displayed); ``.npy`` arrays as ``[T, H, W, 3]`` uint8 or ``[T, 3, H, W]`` float in
    [0, 1] (the dtype decides the layout).

    Args:
        path: the video file.
        max_frames: keep only the first ``max_frames`` frames (None keeps all; must be >= 1).

    Returns:
        float32 tensor ``[T, 3, H, W]`` with values in [0, 1], T >= 1.

    Raises:
        MediaError: missing, empty or undecodable file, unsupported extension, zero frames,
            frames of different sizes, a float array outside [0, 1], or too many pixels.
    """
    path = Path(path)
    if max_frames is not None and max_frames < 1:
        raise ValueError(f"max_frames must be >= 1 or None, got {max_frames}")
    ext = _check_file(path, VIDEO_EXTENSIONS, "video")
    if ext == ".npy":
        return _read_npy(path, max_frames)
    if ext == ".gif":
        frames = _read_gif(path, max_frames)
    else:
        frames = _video_reader()(path, max_frames)
    return _frames_to_tensor(frames, path)


def load_media(path: str | os.PathLike[str], *, max_frames: int | None = None) -> Tensor:
    """Read an image (``[3, H, W]``) or a video (``[T, 3, H, W]``), chosen by the extension.

    ``.gif`` and ``.npy`` are always read as videos (a one-frame GIF gives T = 1).

    Args:
        path: an image or video file (see :data:`IMAGE_EXTENSIONS`, :data:`VIDEO_EXTENSIONS`).
        max_frames: for videos, keep only the first ``max_frames`` frames.

    Returns:
        float32 tensor in [0, 1], ``[3, H, W]`` for images and ``[T, 3, H, W]`` for videos.

    Raises:
        MediaError: as :func:`load_image` / :func:`load_video`, or an unknown extension.
    """
    ext = Path(path).suffix.lower()
    if ext in IMAGE_EXTENSIONS:
        return load_image(path)
    if ext in VIDEO_EXTENSIONS:
        return load_video(path, max_frames=max_frames)
    raise MediaError(
        path,
        f"unsupported extension {ext or '(none)'!r}; expected one of "
        f"{sorted(IMAGE_EXTENSIONS | VIDEO_EXTENSIONS)}",
    )


# ----------------------------------------------------------------------------- writing


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


def _write_mp4(frames: np.ndarray, tmp: Path, fps: float, crf: int) -> None:
    import imageio_ffmpeg

    _, height, width, _ = frames.shape
    # yuv420p (what every player supports) needs even sides; odd sizes fall back to yuv444p.
    pix_fmt = "yuv420p" if height % 2 == 0 and width % 2 == 0 else "yuv444p"
    writer = imageio_ffmpeg.write_frames(
        str(tmp),
        (width, height),
        fps=fps,
        codec="libx264",
        pix_fmt_in="rgb24",
        pix_fmt_out=pix_fmt,
        macro_block_size=1,  # never resize (the default 16 would rescale a 32x40 video)
        output_params=["-crf", str(crf)],
        ffmpeg_log_level="error",
    )
    writer.send(None)  # start the ffmpeg process
    try:
        for frame in frames:
            writer.send(np.ascontiguousarray(frame))
    finally:
        writer.close()


def _write_gif(frames: np.ndarray, tmp: Path, fps: float) -> None:
    images = [Image.fromarray(np.ascontiguousarray(f), mode="RGB") for f in frames]
    images[0].save(
        tmp,
        format="GIF",
        save_all=True,
        append_images=images[1:],
        duration=max(int(round(1000.0 / fps)), 10),  # GIF stores durations in 10 ms units
        loop=0,
    )


def save_video(video: Tensor, path: str | os.PathLike[str], *, fps: float = 8, crf: int = 18) -> None:
    """Write a float video atomically as ``.mp4`` (H.264), ``.gif`` or ``.npy`` (uint8).

    MP4 is lossy (``crf`` sets the quality, 0 = lossless luma but chroma is still
    subsampled) and is never resized: frames keep their exact size (yuv420p for even sides,
    yuv444p for odd). GIF stores a 256-colour palette per frame, and Pillow merges runs of
    identical consecutive frames into one longer frame, so a GIF can hold fewer frames than
    ``video`` when frames repeat. ``.npy`` stores the exact uint8 ``[T, H, W, 3]`` frames.

    Args:
        video: float tensor ``[T, 3, H, W]`` with values in [0, 1], T >= 1 (any device).
        path: destination ending in ``.mp4``, ``.gif`` or ``.npy``.
        fps: frames per second (> 0).
        crf: x264 constant rate factor for MP4 (0-51, lower is better quality).

    Raises:
        MediaError: wrong shape or dtype, values outside [0, 1], unsupported extension, or
            an encoder failure.
    """
    path = Path(path)
    ext = path.suffix.lower()
    if ext not in _SAVE_VIDEO_EXTENSIONS:
        raise MediaError(path, f"cannot save a video as {ext!r}; use one of {sorted(_SAVE_VIDEO_EXTENSIONS)}")
    if video.ndim != 4 or video.shape[1] != 3 or video.shape[0] == 0:
        raise MediaError(path, f"video must have shape [T, 3, H, W] with T >= 1, got {tuple(video.shape)}")
    if not fps > 0:
        raise ValueError(f"fps must be > 0, got {fps}")
    frames = _to_uint8(video, path, "video").transpose(0, 2, 3, 1)  # [T, H, W, 3]
    with atomic_write(path) as tmp:
        try:
            if ext == ".mp4":
                _write_mp4(frames, tmp, fps, crf)
            elif ext == ".gif":
                _write_gif(frames, tmp, fps)
            else:
                with open(tmp, "wb") as fh:
                    np.save(fh, np.ascontiguousarray(frames), allow_pickle=False)
        except (OSError, RuntimeError, BrokenPipeError) as exc:
            raise MediaError(path, f"cannot encode video ({exc})") from exc


def save_media(media: Tensor, path: str | os.PathLike[str], *, fps: float = 8) -> None:
    """Write an image (``[3, H, W]``) or a video (``[T, 3, H, W]``), chosen by the tensor rank.

    Args:
        media: float tensor in [0, 1], 3-D for an image or 4-D for a video.
        path: destination; its extension must suit the rank (see :func:`save_image`,
            :func:`save_video`).
        fps: frames per second for videos.

    Raises:
        MediaError: a rank other than 3 or 4, or as :func:`save_image` / :func:`save_video`.
    """
    if media.ndim == 3:
        save_image(media, path)
    elif media.ndim == 4:
        save_video(media, path, fps=fps)
    else:
        raise MediaError(path, f"media must be [3, H, W] or [T, 3, H, W], got shape {tuple(media.shape)}")
