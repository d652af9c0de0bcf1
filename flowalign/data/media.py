"""Read and write images and videos as float tensors in [0, 1].

The reward boundary of flowalign (see docs/design.md) speaks one format: images are float32
``[3, H, W]`` and videos float32 ``[T, 3, H, W]`` with values in [0, 1]. This module (with its two
halves, :mod:`flowalign.data.images` and :mod:`flowalign.data.videos`) is the only place that turns
files into that format and back.

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
from pathlib import Path

from torch import Tensor

from flowalign.data.errors import MediaError
from flowalign.data.images import (
    IMAGE_EXTENSIONS,
    MAX_IMAGE_PIXELS,
    decode_image_bytes,
    load_image,
    save_image,
)
from flowalign.data.videos import MAX_VIDEO_PIXELS, VIDEO_EXTENSIONS, load_video, save_video
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
