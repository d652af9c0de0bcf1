"""The reward-model contract: canonical media in, one float32 score per item and dimension out.

Every scorer in :mod:`flowalign.rewards` is a :class:`RewardModel` (an ``nn.Module``):

    scores = reward.score(media, prompts)            # dict[str, Tensor[B] float32]

``media`` is a float tensor in [0, 1]: images ``[B, 3, H, W]`` or videos ``[B, T, 3, H, W]``.
Resizing, cropping and normalisation happen inside the reward, on tensors. Image scorers accept
videos too and score them as the mean of their per-frame scores. Scoring runs under
``torch.no_grad`` unless ``differentiable=True`` is asked for (reward guidance), in which case
gradients flow back to ``media``.
"""

from __future__ import annotations

import math
from collections import OrderedDict
from collections.abc import Callable, Sequence
from typing import Literal

import torch
from torch import Tensor, nn

__all__ = [
    "RewardInputError",
    "RewardModel",
    "RewardOutputError",
    "TextEmbeddingCache",
    "validate_media",
    "validate_prompts",
]

InputKind = Literal["pixels", "latents"]
MediaKind = Literal["image", "video", "both"]

# Media may come out of a decoder with float rounding just past the ends of [0, 1].
RANGE_TOLERANCE = 1e-4


class RewardInputError(ValueError):
    """Media or prompts given to a reward model do not match its contract."""


class RewardOutputError(ValueError):
    """A reward model returned NaN or infinite scores for valid (finite, in-range) media."""


def validate_media(media: Tensor, *, name: str = "reward") -> Literal["image", "video"]:
    """Check the canonical media layout and range; return ``"image"`` or ``"video"``.

    Args:
        media: float tensor, [B, 3, H, W] (images) or [B, T, 3, H, W] (videos), values in [0, 1].
        name: the reward's name, used in error messages.

    Returns:
        ``"image"`` for a 4-D tensor, ``"video"`` for a 5-D one.

    Raises:
        RewardInputError: wrong type, dtype, rank, channel count, empty batch, NaN/inf, or values
            outside [0, 1] (by more than 1e-4); the message names the expected and actual value.
    """
    if not isinstance(media, Tensor):
        raise RewardInputError(f"{name}: media must be a torch.Tensor, got {type(media).__name__}")
    if not media.is_floating_point():
        hint = " (divide uint8 pixels by 255)" if media.dtype == torch.uint8 else ""
        raise RewardInputError(
            f"{name}: media must be a float tensor in [0, 1], got dtype {media.dtype}{hint}"
        )
    if media.ndim not in (4, 5):
        raise RewardInputError(
            f"{name}: media must be images [B, 3, H, W] or videos [B, T, 3, H, W], "
            f"got shape {tuple(media.shape)} (rank {media.ndim})"
        )
    if media.shape[-3] != 3:
        hint = " (channels-last? permute to channels-first)" if media.shape[-1] == 3 else ""
        raise RewardInputError(
            f"{name}: media must have 3 channels at dim {media.ndim - 3}, got shape {tuple(media.shape)}{hint}"
        )
    if media.numel() == 0:
        raise RewardInputError(f"{name}: media is empty, shape {tuple(media.shape)}")
    lo, hi = torch.aminmax(media.detach())
    lo, hi = float(lo), float(hi)
    if not (math.isfinite(lo) and math.isfinite(hi)):
        raise RewardInputError(f"{name}: media contains NaN or inf values")
    if lo < -RANGE_TOLERANCE or hi > 1 + RANGE_TOLERANCE:
        raise RewardInputError(
            f"{name}: media values must be in [0, 1], got min {lo:.4g} and max {hi:.4g} "
            f"(map [-1, 1] decoder output with x / 2 + 0.5)"
        )
    return "image" if media.ndim == 4 else "video"


def validate_prompts(prompts: Sequence[str] | None, count: int, *, name: str = "reward") -> list[str] | None:
    """Check there is one string prompt per media item.

    Raises:
        RewardInputError: a bare string instead of a list, a non-string entry, or a prompt count
            different from the media count (both counts are in the message).
    """
    if prompts is None:
        return None
    if isinstance(prompts, str):
        raise RewardInputError(
            f"{name}: prompts must be a list of strings, got a single str {prompts[:40]!r}"
        )
    prompts = list(prompts)
    if len(prompts) != count:
        raise RewardInputError(f"{name}: got {len(prompts)} prompts for {count} media items; they must match")
    for i, prompt in enumerate(prompts):
        if not isinstance(prompt, str):
            raise RewardInputError(f"{name}: prompts[{i}] must be a str, got {type(prompt).__name__}")
    return prompts


class TextEmbeddingCache:
    """Least-recently-used cache of per-prompt text embeddings.

    Scoring many samples of the same prompts (evaluation sets, RL groups) encodes each prompt once.
    Embeddings are stored detached: gradients never flow into the text side.
    """

    def __init__(self, max_size: int = 1024) -> None:
        if max_size < 0:
            raise ValueError(f"TextEmbeddingCache: max_size must be >= 0, got {max_size}")
        self.max_size = max_size
        self._items: OrderedDict[str, Tensor] = OrderedDict()
        self.hits = 0
        self.misses = 0

    def __len__(self) -> int:
        return len(self._items)

    def clear(self) -> None:
        self._items.clear()

    def get(self, prompts: Sequence[str], encode: Callable[[list[str]], Tensor]) -> Tensor:
        """Embeddings for ``prompts`` [N, D], encoding only the unique prompts not cached.

        Args:
            prompts: N prompts (duplicates allowed).
            encode: maps a list of U unique prompts to a [U, D] tensor.
        """
        missing = [p for p in dict.fromkeys(prompts) if p not in self._items]
        fresh: dict[str, Tensor] = {}
        if missing:
            embeddings = encode(missing).detach()
            assert embeddings.shape[0] == len(missing), "encode must return one row per prompt"
            fresh = dict(zip(missing, embeddings, strict=True))
        self.misses += len(missing)
        self.hits += len(prompts) - len(missing)
        rows = [self._items[p] if p in self._items else fresh[p] for p in prompts]
        for prompt in dict.fromkeys(prompts):
            if prompt in fresh:
                self._items[prompt] = fresh[prompt]
            self._items.move_to_end(prompt)
        while len(self._items) > self.max_size:
            self._items.popitem(last=False)
        return torch.stack(rows)


class RewardModel(nn.Module):
    """Base class of every reward model.

    Subclasses set the class attributes and implement :meth:`_score_images` (image scorers) and/or
    :meth:`_score_videos` (video-native scorers). :meth:`score` does validation, batching,
    no-grad handling and the float32 cast, so subclasses only see clean chunks.

    Attributes:
        name: registry name, e.g. ``"pickscore"``.
        dimensions: names of the scores returned, e.g. ``("vq", "mq", "ta")``.
        differentiable: whether ``score(..., differentiable=True)`` can backpropagate to pixels.
        input_kind: ``"pixels"`` (media in [0, 1]) or ``"latents"`` (noisy latents, for guidance).
        media_kind: what the model scores natively: ``"image"`` (videos are scored per frame and
            averaged), ``"video"`` (images are rejected) or ``"both"``.
        needs_prompts: False for prompt-free scorers (aesthetics); they accept ``prompts=None``.
        normalisation: per-dimension ``(mean, std)`` stored with the model, if any; used by
            :class:`flowalign.rewards.combine.RewardCombiner` when none is given.
    """

    name: str = "reward"
    dimensions: tuple[str, ...] = ()
    differentiable: bool = True
    input_kind: InputKind = "pixels"
    media_kind: MediaKind = "image"
    needs_prompts: bool = True
    normalisation: dict[str, tuple[float, float]] | None = None

    def __init__(self, *, batch_size: int = 16, text_cache_size: int = 1024) -> None:
        super().__init__()
        if batch_size < 1:
            raise ValueError(f"{self.name}: batch_size must be >= 1, got {batch_size}")
        self.batch_size = batch_size
        self.text_cache = TextEmbeddingCache(text_cache_size)

    # -- hooks for subclasses -------------------------------------------------------------------
    def _score_images(self, images: Tensor, prompts: list[str] | None) -> dict[str, Tensor]:
        """Score one chunk of images [N, 3, H, W] in [0, 1]; return ``{dim: [N]}``."""
        raise RewardInputError(
            f"{self.name}: this reward scores videos only (media_kind={self.media_kind!r})"
        )

    def _score_videos(self, videos: Tensor, prompts: list[str] | None) -> dict[str, Tensor]:
        """Score one chunk of videos [N, T, 3, H, W]; default: mean of the per-frame image scores.

        Frames go through :meth:`_score_images` ``batch_size`` at a time.
        """
        n, t = videos.shape[:2]
        frames = videos.reshape(n * t, *videos.shape[2:])  # [N*T, 3, H, W], video-major
        frame_prompts = None if prompts is None else [p for p in prompts for _ in range(t)]
        parts = self._score_chunks(self._score_images, frames, frame_prompts, self.batch_size)
        return {k: v.reshape(n, t).mean(dim=1) for k, v in parts.items()}  # [N]

    # -- public API -----------------------------------------------------------------------------
    @property
    def device(self) -> torch.device:
        for tensor in self.parameters():
            return tensor.device
        for tensor in self.buffers():
            return tensor.device
        return torch.device("cpu")

    @property
    def dtype(self) -> torch.dtype:
        for tensor in self.parameters():
            return tensor.dtype
        return torch.float32

    def clear_text_cache(self) -> None:
        """Drop cached text embeddings (done automatically on ``.to()``; call it after editing weights)."""
        self.text_cache.clear()

    def _apply(self, fn, recurse=True):  # noqa: ANN001 - nn.Module signature
        self.text_cache.clear()  # cached embeddings would keep the old device/dtype
        return super()._apply(fn, recurse)

    def score(
        self,
        media: Tensor,
        prompts: Sequence[str] | None = None,
        *,
        batch_size: int | None = None,
        differentiable: bool = False,
    ) -> dict[str, Tensor]:
        """Score media against prompts.

        Args:
            media: float [B, 3, H, W] images or [B, T, 3, H, W] videos, values in [0, 1], on any
                device (preprocessing runs there; the backbone input moves to the model's device).
            prompts: B prompts, or None for prompt-free rewards.
            batch_size: images (or video frames) per forward pass; default ``self.batch_size``.
            differentiable: keep the autograd graph so ``scores[d].sum().backward()`` reaches
                ``media`` (for reward guidance). Otherwise runs under ``torch.no_grad``.

        Returns:
            ``{dimension: float32 tensor [B]}`` on the media's device.

        Raises:
            RewardInputError: invalid media or prompts (see :func:`validate_media`), video input
                to an image-less model, or ``differentiable=True`` on a non-differentiable model.
            RewardOutputError: a NaN or infinite score (unless the model is being trained: train mode
                with trainable parameters, where the training loop skips non-finite steps).
        """
        kind = validate_media(media, name=self.name)
        prompts = validate_prompts(prompts, media.shape[0], name=self.name)
        if prompts is None and self.needs_prompts:
            raise RewardInputError(
                f"{self.name}: this reward needs one prompt per media item, got prompts=None"
            )
        if kind == "image" and self.media_kind == "video":
            raise RewardInputError(
                f"{self.name}: scores videos [B, T, 3, H, W] only, got images {tuple(media.shape)}"
            )
        if differentiable and not self.differentiable:
            raise RewardInputError(
                f"{self.name}: differentiable=True requested but this reward is not differentiable"
            )
        batch_size = batch_size or self.batch_size
        if batch_size < 1:
            raise RewardInputError(f"{self.name}: batch_size must be >= 1, got {batch_size}")
        # differentiable=True enables grad even inside an outer no_grad (samplers often run in one).
        with torch.set_grad_enabled(differentiable):
            if kind == "image":
                out = self._score_chunks(self._score_images, media, prompts, batch_size)
            else:
                per_chunk = max(1, batch_size // media.shape[1])  # videos per chunk, ~batch_size frames
                out = self._score_chunks(self._score_videos, media, prompts, per_chunk)
        out = {k: v.to(device=media.device, dtype=torch.float32) for k, v in out.items()}
        # A reward being trained hands its scores to a loss, where the training loop skips non-finite
        # steps; any other scorer gives finite scores or raises.
        in_training = self.training and any(p.requires_grad for p in self.parameters())
        bad = [] if in_training else [k for k, v in out.items() if not bool(torch.isfinite(v.detach()).all())]
        if bad:
            items = {k: (~torch.isfinite(out[k].detach())).nonzero().flatten().tolist()[:8] for k in bad}
            where = "; ".join(f"{k!r} at item(s) {i}" for k, i in items.items())
            raise RewardOutputError(
                f"{self.name}: non-finite scores (NaN/inf) for dimension {where} of {media.shape[0]}; "
                "the media were finite and in [0, 1], so the model's weights or precision are at fault"
            )
        return out

    def forward(self, media: Tensor, prompts: Sequence[str] | None = None) -> dict[str, Tensor]:
        """Differentiable scoring when grad is enabled and the model allows it; see :meth:`score`."""
        return self.score(media, prompts, differentiable=self.differentiable and torch.is_grad_enabled())

    @staticmethod
    def _score_chunks(
        fn: Callable[[Tensor, list[str] | None], dict[str, Tensor]],
        media: Tensor,
        prompts: list[str] | None,
        chunk: int,
    ) -> dict[str, Tensor]:
        parts: dict[str, list[Tensor]] = {}
        for start in range(0, media.shape[0], chunk):
            stop = start + chunk
            out = fn(media[start:stop], None if prompts is None else prompts[start:stop])
            for key, value in out.items():
                parts.setdefault(key, []).append(value.to(media.device))
        return {k: torch.cat(v) for k, v in parts.items()}
