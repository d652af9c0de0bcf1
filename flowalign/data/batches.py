"""Typed training batches: what the offline methods (SFT, RWR, DPO) receive from the loop.

Datasets keep returning one dict per item (the loop's data cursor adds each item's dataset position
as ``"index"``, which seeds the per-sample random numbers); each batch class's :meth:`collate` turns
a list of such items into one batch, and :meth:`to` moves its tensors to a device::

    PromptBatch   prompt [B] (str), index [B] (int64)
    MediaBatch    + pixels [B, 3, H, W] / [B, T, 3, H, W] in [0, 1] or cached canonical latents,
                    and an optional per-sample loss weight [B]
    PairBatch     + media_w / media_l (pixels) or latents_w / latents_l, one shape per batch

Items of image-conditioned families carry their condition image (``"condition"``) or, once it is
cached, its encoding as ``condition/<field>`` tensors; either becomes the batch's ``condition`` list.

A method may also be handed a plain mapping with the same keys (a hand-built batch, or the output of
``torch.utils.data.default_collate``): :meth:`coerce` reads it into the typed batch.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from typing import Any, Self

import torch
from torch import Tensor

__all__ = [
    "CONDITION_PREFIX",
    "CachedCondition",
    "MediaBatch",
    "PairBatch",
    "PromptBatch",
    "cached_condition",
]

CONDITION_PREFIX = "condition/"
"""Item keys ``condition/<field>`` hold the cached encoding of the item's condition image (the image
fields of :class:`~flowalign.models.base.PromptEmbeds`, e.g. ``condition/image_latents``) in place of
the image itself (``flowalign/training/condition_cache.py``)."""


class CachedCondition(dict):
    """One sample's cached condition encoding, {PromptEmbeds image field: Tensor without batch axis};
    a batch's ``condition`` list holds these instead of images when the conditions are cached."""


def cached_condition(item: Mapping[str, Any]) -> CachedCondition:
    """The :data:`CONDITION_PREFIX` fields of a dataset item as a :class:`CachedCondition`."""
    n = len(CONDITION_PREFIX)
    return CachedCondition({k[n:]: v for k, v in item.items() if k.startswith(CONDITION_PREFIX)})


@dataclass(kw_only=True)
class PromptBatch:
    """Prompts with their dataset indices (data-free methods, and the base of every batch)."""

    prompt: list[str]
    """One prompt per sample."""
    index: Tensor
    """[B] int64 dataset positions: the ``sample_ids`` of every per-sample random draw."""
    condition: list | None = None
    """One condition image per sample (image-to-video, edit families), as the dataset gives it; a
    preference pair's two members share theirs. None for text-only data."""

    def __len__(self) -> int:
        return len(self.prompt)

    def _tensor_fields(self) -> list[str]:
        return [f.name for f in dataclasses.fields(self) if isinstance(getattr(self, f.name), Tensor)]

    def _map(self, fn: Callable[[Tensor], Tensor]) -> Self:
        return dataclasses.replace(self, **{k: fn(getattr(self, k)) for k in self._tensor_fields()})

    def to(self, device: torch.device | str) -> Self:
        """A copy with every tensor on ``device`` (the prompts are kept)."""
        return self._map(lambda t: t.to(device, non_blocking=True))

    def pin_memory(self) -> Self:
        """A copy with every tensor in pinned host memory (the DataLoader calls this with ``pin_memory``)."""
        return self._map(Tensor.pin_memory)

    @classmethod
    def _tensor_keys(cls) -> tuple[str, ...]:
        return tuple(
            f.name for f in dataclasses.fields(cls) if f.name not in ("prompt", "index", "condition")
        )

    @classmethod
    def collate(cls, items: Sequence[Mapping[str, Any]]) -> Self:
        """One batch from dataset items (dicts with ``prompt``, ``index`` and this batch's tensors).

        Raises:
            ValueError: no items, or an item without a key that the first item has.
        """
        if not items:
            raise ValueError(f"{cls.__name__}.collate got no items")
        present = [k for k in cls._tensor_keys() if k in items[0]]
        for n, item in enumerate(items):
            missing = [k for k in ("prompt", "index", *present) if k not in item]
            if missing:
                raise ValueError(f"{cls.__name__}: item {n} has no {missing} (it has {sorted(item)})")
        fields: dict[str, Any] = {
            "prompt": [item["prompt"] for item in items],
            "index": torch.tensor([int(item["index"]) for item in items], dtype=torch.long),
        }
        for key in present:
            fields[key] = torch.stack([torch.as_tensor(item[key]) for item in items])
        if "condition" in items[0]:
            fields["condition"] = [item["condition"] for item in items]
        elif any(key.startswith(CONDITION_PREFIX) for key in items[0]):  # cached condition encodings
            fields["condition"] = [cached_condition(item) for item in items]
        return cls._checked(fields)

    @classmethod
    def coerce(cls, batch: Self | Mapping[str, Any]) -> Self:
        """``batch`` itself, or a mapping with this batch's keys (extra keys are ignored) as one."""
        if isinstance(batch, cls):
            return batch
        if not isinstance(batch, Mapping):
            raise TypeError(f"expected a {cls.__name__} or a mapping, got {type(batch).__name__}")
        names = {f.name for f in dataclasses.fields(cls)}
        fields = {k: v for k, v in batch.items() if k in names}
        if "prompt" in fields:
            fields["prompt"] = list(fields["prompt"])
        missing = sorted({"prompt", "index"} - set(fields))
        if missing:
            raise ValueError(f"{cls.__name__}: the batch has no {missing} (it has {sorted(batch)})")
        return cls._checked(fields)

    @classmethod
    def _checked(cls, fields: dict[str, Any]) -> Self:
        return cls(**fields)


@dataclass(kw_only=True)
class MediaBatch(PromptBatch):
    """Media with prompts (SFT, RWR, real data of the one-step methods): pixels or cached latents."""

    pixels: Tensor | None = None
    """[B, 3, H, W] images or [B, T, 3, H, W] clips in [0, 1]."""
    latents: Tensor | None = None
    """Cached canonical latents [B, ...] (read instead of encoding ``pixels``)."""
    weight: Tensor | None = None
    """[B] per-sample loss weights (RWR)."""

    @classmethod
    def _checked(cls, fields: dict[str, Any]) -> Self:
        if fields.get("pixels") is None and fields.get("latents") is None:
            raise ValueError(f"MediaBatch needs 'pixels' or 'latents'; got {sorted(fields)}")
        return cls(**fields)

    def clean_latents(self, encode: Callable[[Tensor], Tensor]) -> Tensor:
        """The clean latents x0 [B, ...]: the cached ones, else ``encode(pixels)`` without a graph."""
        if self.latents is not None:
            return self.latents
        with torch.no_grad():
            return encode(self.pixels)


@dataclass(kw_only=True)
class PairBatch(PromptBatch):
    """Preference pairs (DPO): the chosen (w) and rejected (l) media of one prompt each."""

    media_w: Tensor | None = None
    """[P, ...] chosen media in [0, 1]."""
    media_l: Tensor | None = None
    """[P, ...] rejected media, the shape of ``media_w``."""
    latents_w: Tensor | None = None
    """Cached canonical latents of the chosen media (read instead of encoding ``media_w``)."""
    latents_l: Tensor | None = None
    """Cached canonical latents of the rejected media."""

    @classmethod
    def _checked(cls, fields: dict[str, Any]) -> Self:
        for w, l_ in (("latents_w", "latents_l"), ("media_w", "media_l")):
            if fields.get(w) is not None and fields.get(l_) is not None:
                if fields[w].shape != fields[l_].shape:
                    raise ValueError(
                        f"PairBatch: {w} has shape {tuple(fields[w].shape)} but {l_} has "
                        f"{tuple(fields[l_].shape)}"
                    )
                return cls(**fields)
        raise ValueError(
            f"PairBatch needs media_w and media_l, or latents_w and latents_l; got {sorted(fields)}"
        )

    def pair_latents(self, encode: Callable[[Tensor], Tensor]) -> Tensor:
        """Clean latents of the pairs laid out [w_0..w_{P-1}, l_0..l_{P-1}]: [2P, ...] (the cached ones,
        else ``encode`` of the media in one call, without a graph)."""
        if self.latents_w is not None:
            return torch.cat([self.latents_w, self.latents_l])
        with torch.no_grad():
            return encode(torch.cat([self.media_w, self.media_l]))
