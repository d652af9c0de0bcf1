"""One loaded preference pair (:class:`PreferencePair`), the item of every preference dataset."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

from torch import Tensor

__all__ = ["PreferencePair"]


@dataclass(frozen=True)
class PreferencePair:
    """One loaded pair.

    Attributes:
        prompt: the text prompt.
        media_w: float [3, H, W] image or [T, 3, H, W] video in [0, 1] (preferred item for
            single-label datasets; item A for multi-dimensional ones, see module doc).
        media_l: the other item, same layout.
        labels: dimension -> 1 (w better), 0 (tie), -1 (l better) or -2 (missing).
        source: where the row lives, e.g. ``"pairs.jsonl line 3"``.
        meta: extra fields kept from the file (the jsonl ``"meta"`` object), else empty.
        condition: the pair's condition image, float [3, H, W] in [0, 1] (image-to-video first
            frame, edit source), shared by both members; None for text-only data.
    """

    prompt: str
    media_w: Tensor
    media_l: Tensor
    labels: dict[str, int]
    source: str = ""
    meta: dict[str, Any] = field(default_factory=dict)
    condition: Tensor | None = None
