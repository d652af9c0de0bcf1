"""Read and write videos as float tensors ``[T, 3, H, W]`` in [0, 1].

Files: ``.mp4``, ``.webm``, ``.mov``, ``.mkv`` (PyAV when importable, else the ffmpeg binary bundled
with ``imageio-ffmpeg``), ``.gif`` (Pillow) and ``.npy`` arrays (``[T, H, W, 3]`` uint8 or
``[T, 3, H, W]`` float in [0, 1]). Errors and atomic writes as in :mod:`flowalign.data.images`.
"""

from __future__ import annotations

import os
from collections.abc import Callable, Iterator
from pathlib import Path

import numpy as np
import torch
from PIL import Image, ImageSequence
from torch import Tensor

from flowalign.data.errors import MediaError
from flowalign.data.images import _PIL_DECODE_ERRORS, _check_file, _check_pixels, _open_pil, _to_uint8
from flowalign.files import atomic_write

__all__ = ["MAX_VIDEO_PIXELS", "VIDEO_EXTENSIONS", "load_video", "save_video"]

MAX_VIDEO_PIXELS: int = 2**31
"""Largest video (frames * width * height) that is decoded, about 8 GiB as uint8 RGB."""

VIDEO_EXTENSIONS: frozenset[str] = frozenset({".mp4", ".webm", ".mov", ".mkv", ".gif", ".npy"})
_SAVE_VIDEO_EXTENSIONS = frozenset({".mp4", ".gif", ".npy"})


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
