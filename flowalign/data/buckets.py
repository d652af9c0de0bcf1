"""Training media at a target resolution: resize + center crop into aspect-ratio buckets.

A bucket is a (height, width) of about ``resolution**2`` pixels whose sides are multiples of
``multiple`` (16 = the VAE's 8x downsampling times a 2x2 patch, the SD3/FLUX/Wan layout), one per
aspect ratio of :attr:`BucketConfig.aspect_ratios`. Each preference pair goes into the bucket
whose aspect ratio (width / height) is nearest, in log scale, to the geometric mean of its two
members' ratios, and **both members are resized and cropped to that one bucket**, so a pair of two
sizes trains as one pair. Resizing scales the media so that it covers the bucket (bilinear with
antialiasing) and then crops the center.

Clips also get a fixed frame count: ``num_frames`` frames, taken every ``source_fps / fps`` frames
when both rates are known (frame ``floor(k * source_fps / fps)`` for k = 0..num_frames-1), else
consecutive frames from the first.

:class:`BucketedPairs` reads every row's media header once (sizes, frame counts, frame rates; no
pixels decoded) to assign buckets. Documented behaviour for bad rows:

- a pair whose two members differ in size: both go to one bucket (above); without buckets
  :class:`~flowalign.data.preference.PreferenceDataset` users get one :class:`DataError` naming
  the row when the sizes differ (:func:`check_same_size`);
- an image or clip with a side shorter than ``min_side`` (a 1x1 image): the row is **skipped**,
  and the number skipped is logged and kept in :attr:`BucketedPairs.skipped`;
- a clip with fewer frames than ``num_frames`` needs: skipped and counted the same way when the
  header gives the frame count; when it does not (some containers), loading the row raises a
  :class:`DataError` naming the file and the row;
- tie rows are the preference dataset's business (``keep_ties``, dropped for DPO by default).

Batches come from one bucket at a time: :func:`bucket_batches` cuts a seeded shuffle of each
bucket into batches (an incomplete batch per bucket is left out of that epoch) and shuffles the
batches; :class:`BucketBatchSampler` serves it to a ``DataLoader``, and the training loop's data
cursor uses :meth:`BucketedPairs.batch_order` the same way.
"""

from __future__ import annotations

import io
import logging
import math
from collections import Counter
from collections.abc import Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from torch import Tensor
from torch.utils.data import Dataset, Sampler

from flowalign.data.errors import DataError

__all__ = [
    "DEFAULT_ASPECT_RATIOS",
    "BucketBatchSampler",
    "BucketConfig",
    "BucketedPairs",
    "MediaInfo",
    "bucket_batches",
    "bucket_sizes",
    "check_same_size",
    "frame_indices",
    "media_info",
    "nearest_bucket",
    "resize_center_crop",
]

logger = logging.getLogger(__name__)

DEFAULT_ASPECT_RATIOS: tuple[float, ...] = (1.0, 4 / 3, 3 / 4, 3 / 2, 2 / 3, 16 / 9, 9 / 16)
"""width / height of the default buckets."""


@dataclass(kw_only=True)
class BucketConfig:
    """Resolution, aspect-ratio buckets and clip length of training media."""

    resolution: int = 512
    """Each bucket holds about resolution**2 pixels (1024 for SD3.5/FLUX at 1024²)."""
    aspect_ratios: list[float] = field(default_factory=lambda: list(DEFAULT_ASPECT_RATIOS))
    """width / height of the buckets; [1.0] gives square center crops only."""
    multiple: int = 16
    """Bucket sides are multiples of this (VAE downsampling x patch size)."""
    num_frames: int | None = None
    """Clips: frames per clip (Wan wants 4k + 1, e.g. 33 or 81); None keeps images only."""
    fps: float | None = None
    """Clips: frame rate to sample at (needs the file's own rate); None takes consecutive frames."""
    min_side: int = 32
    """Media with a shorter side below this are skipped (counted and logged)."""

    def __post_init__(self) -> None:
        if self.resolution < self.multiple or self.multiple < 1:
            raise ValueError(
                f"buckets.resolution ({self.resolution}) must be >= buckets.multiple ({self.multiple}) >= 1"
            )
        if not self.aspect_ratios or any(not (r > 0 and math.isfinite(r)) for r in self.aspect_ratios):
            raise ValueError(f"buckets.aspect_ratios must be positive numbers, got {self.aspect_ratios}")
        if self.num_frames is not None and self.num_frames < 1:
            raise ValueError(f"buckets.num_frames must be >= 1 or null, got {self.num_frames}")
        if self.fps is not None and not self.fps > 0:
            raise ValueError(f"buckets.fps must be > 0 or null, got {self.fps}")
        if self.min_side < 1:
            raise ValueError(f"buckets.min_side must be >= 1, got {self.min_side}")

    def sizes(self) -> list[tuple[int, int]]:
        return bucket_sizes(self.resolution, aspect_ratios=self.aspect_ratios, multiple=self.multiple)


def bucket_sizes(
    resolution: int, *, aspect_ratios: Sequence[float] = DEFAULT_ASPECT_RATIOS, multiple: int = 16
) -> list[tuple[int, int]]:
    """(height, width) per aspect ratio r = w / h: h = sqrt(resolution² / r), w = h r, each rounded
    to the nearest multiple of ``multiple`` (at least one multiple); duplicates removed, order kept."""
    out: list[tuple[int, int]] = []
    for r in aspect_ratios:
        h = math.sqrt(resolution * resolution / r)
        size = tuple(max(multiple, multiple * round(s / multiple)) for s in (h, h * r))
        if size not in out:
            out.append(size)  # type: ignore[arg-type]
    return out


def nearest_bucket(aspect: float, sizes: Sequence[tuple[int, int]]) -> tuple[int, int]:
    """The size whose width / height is nearest to ``aspect`` in log scale (first one on a tie)."""
    return min(sizes, key=lambda s: abs(math.log(s[1] / s[0]) - math.log(aspect)))


def resize_center_crop(media: Tensor, height: int, width: int) -> Tensor:
    """Scale ``media`` ([3, H, W] or [T, 3, H, W]) by max(height / H, width / W) so that it covers
    the target (bilinear, antialiased, clamped to [0, 1]), then crop the center to height x width."""
    *lead, c, h, w = media.shape
    scale = max(height / h, width / w)
    nh, nw = max(height, round(h * scale)), max(width, round(w * scale))
    x = media.reshape(-1, c, h, w)
    if (nh, nw) != (h, w):
        x = F.interpolate(x.float(), size=(nh, nw), mode="bilinear", antialias=True, align_corners=False)
        x = x.clamp_(0.0, 1.0)
    top, left = (nh - height) // 2, (nw - width) // 2
    x = x[:, :, top : top + height, left : left + width]
    return x.reshape(*lead, c, height, width).contiguous()


def frame_indices(
    available: int, num_frames: int, *, source_fps: float | None = None, fps: float | None = None
) -> list[int] | None:
    """Frames to take from a clip of ``available`` frames: ``floor(k * source_fps / fps)`` for
    k < num_frames (consecutive frames when a rate is unknown); None when the clip is too short."""
    stride = source_fps / fps if source_fps and fps else 1.0
    idx = [math.floor(k * stride + 1e-9) for k in range(num_frames)]
    return idx if idx[-1] < available else None


def check_same_size(media_w: Tensor, media_l: Tensor, *, source: str) -> None:
    """One :class:`DataError` naming the row (``source``, e.g. ``"pairs.jsonl line 3"``) when the
    two members of a pair differ in shape."""
    if media_w.shape != media_l.shape:
        raise DataError(
            source,
            f"the two media of the pair differ in size, {tuple(media_w.shape)} vs {tuple(media_l.shape)}; "
            "set a bucket resolution (buckets.resolution) to resize both into one bucket",
        )


# ----------------------------------------------------------------------------- headers


@dataclass(frozen=True)
class MediaInfo:
    """What a media header says: pixel size, and for clips the frame count and rate if known."""

    height: int
    width: int
    frames: int | None = None
    fps: float | None = None
    is_video: bool = False


def _pil_info(fp, source: str) -> MediaInfo:
    from PIL import Image, UnidentifiedImageError

    try:
        with Image.open(fp) as img:
            w, h = img.size
            if img.format == "GIF":
                n = getattr(img, "n_frames", 1)
                duration = img.info.get("duration") or 0
                return MediaInfo(h, w, n, 1000.0 / duration if duration else None, True)
            return MediaInfo(h, w)
    except (OSError, UnidentifiedImageError, SyntaxError, ValueError) as exc:
        raise DataError(source, f"cannot read the media header ({exc})") from exc


def _container_info(path: Path) -> MediaInfo:
    try:
        import av
    except ImportError:
        import imageio_ffmpeg

        gen = imageio_ffmpeg.read_frames(str(path))
        try:
            meta = next(gen)
        except (OSError, RuntimeError, StopIteration) as exc:
            raise DataError(path, f"cannot read the video header ({exc})") from exc
        finally:
            gen.close()
        w, h = (int(s) for s in meta["size"])
        return MediaInfo(h, w, None, float(meta.get("fps") or 0) or None, True)
    try:
        with av.open(str(path)) as container:
            stream = container.streams.video[0]
            rate = float(stream.average_rate) if stream.average_rate else None
            return MediaInfo(stream.height, stream.width, stream.frames or None, rate, True)
    except (av.FFmpegError, OSError, IndexError) as exc:
        raise DataError(path, f"cannot read the video header ({exc})") from exc


def media_info(source: Path | bytes, *, name: str = "") -> MediaInfo:
    """Read the header of an image or clip (a file, or encoded image bytes) without decoding pixels.

    ``.npy`` clips have no rate; mp4/webm/mov/mkv give their frame count only through PyAV.
    """
    if isinstance(source, bytes):
        return _pil_info(io.BytesIO(source), name or "image bytes")
    ext = source.suffix.lower()
    if ext == ".npy":
        try:
            arr = np.load(source, allow_pickle=False, mmap_mode="r")
        except Exception as exc:  # numpy's header parser raises many kinds
            raise DataError(source, f"cannot read .npy header ({exc})") from exc
        if arr.ndim != 4:
            raise DataError(source, f"expected a 4-D array, got shape {tuple(arr.shape)}")
        t, a, b, c = arr.shape
        h, w = (a, b) if arr.dtype == np.uint8 else (b, c)  # [T, H, W, 3] uint8 or [T, 3, H, W] float
        return MediaInfo(h, w, t, None, True)
    if ext in (".mp4", ".webm", ".mov", ".mkv"):
        return _container_info(source)
    return _pil_info(source, str(source))


# ----------------------------------------------------------------------------- batches


def bucket_batches(keys: Sequence[object], batch_size: int, *, seed: int, epoch: int) -> list[list[int]]:
    """Batches of ``batch_size`` positions sharing one key: each key's positions shuffled and cut
    (an incomplete batch per key is left out), then the batches shuffled; seeded by (seed, epoch)."""
    g = torch.Generator().manual_seed(int(seed) * 1_000_003 + int(epoch))
    groups: dict[object, list[int]] = {}
    for i, k in enumerate(keys):
        groups.setdefault(k, []).append(i)
    batches = []
    for members in groups.values():
        perm = torch.randperm(len(members), generator=g).tolist()
        shuffled = [members[p] for p in perm]
        batches += [
            shuffled[s : s + batch_size] for s in range(0, len(shuffled) - batch_size + 1, batch_size)
        ]
    return [batches[p] for p in torch.randperm(len(batches), generator=g).tolist()]


class BucketBatchSampler(Sampler[list[int]]):
    """``DataLoader`` batch sampler whose batches each come from one bucket (see :func:`bucket_batches`);
    call :meth:`set_epoch` for a new order each epoch."""

    def __init__(self, keys: Sequence[object], batch_size: int, *, seed: int = 0) -> None:
        if batch_size < 1:
            raise ValueError(f"batch_size must be >= 1, got {batch_size}")
        self.keys, self.batch_size, self.seed, self.epoch = list(keys), batch_size, seed, 0

    def set_epoch(self, epoch: int) -> None:
        self.epoch = epoch

    def __iter__(self) -> Iterator[list[int]]:
        return iter(bucket_batches(self.keys, self.batch_size, seed=self.seed, epoch=self.epoch))

    def __len__(self) -> int:
        return sum(n // self.batch_size for n in Counter(self.keys).values())


# ----------------------------------------------------------------------------- pairs


@dataclass(frozen=True)
class _Slot:
    index: int  # position in the preference dataset
    height: int
    width: int
    frames: tuple[tuple[int, ...], tuple[int, ...]] | None  # clips: frame indices of (w, l)


class BucketedPairs(Dataset):
    """A :class:`~flowalign.data.preference.PreferenceDataset` with every pair resized and cropped
    into its bucket (and clips cut to ``num_frames``); rows that cannot fit are skipped and counted
    (see the module doc).

    Attributes:
        buckets: the bucket key of each item: (height, width) or (frames, height, width).
        skipped: reason -> number of rows skipped.
    """

    def __init__(self, pairs, config: BucketConfig) -> None:
        self.pairs, self.config = pairs, config
        sizes = config.sizes()
        self.slots: list[_Slot] = []
        self.skipped: Counter[str] = Counter()
        for i in range(len(pairs)):
            where, sources = pairs.media_sources(i)
            infos = [media_info(s, name=f"{pairs.path} {where}") for s in sources]
            slot = self._slot(i, infos, sizes)
            if isinstance(slot, str):
                self.skipped[slot] += 1
            else:
                self.slots.append(slot)
        for reason, n in sorted(self.skipped.items()):
            logger.warning("%s: skipped %d of %d rows: %s", pairs.path, n, len(pairs), reason)
        if not self.slots:
            raise DataError(pairs.path, f"no row fits the buckets (skipped: {dict(self.skipped)})")
        self.buckets = [
            (s.height, s.width) if s.frames is None else (len(s.frames[0]), s.height, s.width)
            for s in self.slots
        ]

    def _slot(self, i: int, infos: list[MediaInfo], sizes) -> _Slot | str:
        cfg = self.config
        if min(min(m.height, m.width) for m in infos) < cfg.min_side:
            return f"a side shorter than min_side={cfg.min_side} px"
        aspect = math.exp(sum(math.log(m.width / m.height) for m in infos) / len(infos))
        h, w = nearest_bucket(aspect, sizes)
        frames = None
        if infos[0].is_video and cfg.num_frames is not None:
            picks = []
            for m in infos:  # each member at its own rate; an unknown frame count is checked on load
                idx = frame_indices(m.frames or 2**62, cfg.num_frames, source_fps=m.fps, fps=cfg.fps)
                if idx is None:
                    return f"a clip shorter than num_frames={cfg.num_frames} (at fps={cfg.fps})"
                picks.append(tuple(idx))
            frames = (picks[0], picks[1])
        return _Slot(i, h, w, frames)

    def __len__(self) -> int:
        return len(self.slots)

    def _fit(self, media: Tensor, slot: _Slot, member: int, source: str) -> Tensor:
        if media.ndim == 4 and slot.frames is not None:
            frames = slot.frames[member]
            if frames[-1] >= media.shape[0]:
                raise DataError(
                    self.pairs.path,
                    f"{('media_w', 'media_l')[member]}: the clip has {media.shape[0]} frames, fewer than "
                    f"num_frames={self.config.num_frames} needs (frame {frames[-1]} at fps={self.config.fps})",
                    where=source.removeprefix(f"{self.pairs.path} "),
                )
            media = media[list(frames)]
        return resize_center_crop(media, slot.height, slot.width)

    def __getitem__(self, j: int):
        from flowalign.data.preference import PreferencePair

        slot = self.slots[j]
        pair = self.pairs[slot.index]
        media_w = self._fit(pair.media_w, slot, 0, pair.source)
        media_l = self._fit(pair.media_l, slot, 1, pair.source)
        return PreferencePair(pair.prompt, media_w, media_l, pair.labels, pair.source, pair.meta)

    def prompt(self, j: int) -> str:
        return self.pairs.prompt(self.slots[j].index)

    def batch_order(self, batch_size: int, *, seed: int, epoch: int) -> list[int]:
        """Item positions for one epoch, each run of ``batch_size`` from one bucket."""
        return [i for b in bucket_batches(self.buckets, batch_size, seed=seed, epoch=epoch) for i in b]
