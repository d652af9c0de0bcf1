"""Input checks of the toy oracles: media shape, size, dtype and range, and one caption per sample.

Frames are refused above ``MAX_SIZE`` before any pixel is read: the oracle's connected components
spread labels by iterated 3x3 max filters, so their cost grows with (component path length) x (pixels),
up to ~S^4 for a serpentine stroke (measured on CPU: 0.07 s at 64 px, 0.4 s at 128 px, 9 s at 256 px).
The toy world renders at 32 px; 128 px leaves 4x headroom and bounds the worst frame below half a second.
"""

from __future__ import annotations

import math
from collections.abc import Sequence

from torch import Tensor

from flowalign.toy.world import Attributes, parse_caption

MIN_SIZE = 24  # below this the small shapes are too few pixels to tell apart
MAX_SIZE = 128  # above this the connected components may take seconds per frame (module docstring)


def check_media(media: Tensor, *, ndim: int, name: str) -> None:
    """Raise ValueError unless ``media`` is float [B, 3, S, S] (ndim 4) or [B, T, 3, S, S] (ndim 5) in [0, 1].

    Shape and size are checked first, so an oversized input is refused without reading its pixels.
    """
    expected = "[B, 3, H, W]" if ndim == 4 else "[B, T, 3, H, W]"
    if not isinstance(media, Tensor):
        raise ValueError(f"toy oracle: {name} must be a torch.Tensor {expected}, got {type(media).__name__}")
    if media.ndim != ndim or media.shape[-3] != 3 or media.shape[0] == 0:
        raise ValueError(
            f"toy oracle: {name} must have shape {expected} with B >= 1, got {tuple(media.shape)}"
        )
    h, w = media.shape[-2:]
    if h != w or h < MIN_SIZE:
        raise ValueError(f"toy oracle: {name} frames must be square and >= {MIN_SIZE} px, got H={h}, W={w}")
    if h > MAX_SIZE:
        raise ValueError(
            f"toy oracle: {name} frames are {h}x{w} px; frames larger than {MAX_SIZE} px are refused "
            f"(the toy world renders at 32 px: resize first)"
        )
    if not media.is_floating_point():
        raise ValueError(f"toy oracle: {name} must be float in [0, 1], got dtype {media.dtype}")
    lo, hi = float(media.min()), float(media.max())
    if not (math.isfinite(lo) and math.isfinite(hi)) or lo < -1e-4 or hi > 1 + 1e-4:
        raise ValueError(f"toy oracle: {name} must be finite and in [0, 1], got min {lo:.4g}, max {hi:.4g}")


def parse_prompts(prompts: Sequence[str], batch: int, *, is_video: bool) -> list[Attributes]:
    """One parsed caption per sample; video captions (with motion) for clips, image captions otherwise."""
    if isinstance(prompts, str) or len(prompts) != batch:
        got = "a str" if isinstance(prompts, str) else f"{len(prompts)} prompts"
        raise ValueError(f"toy oracle: expected a list of {batch} prompts (one per sample), got {got}")
    parsed = []
    for i, prompt in enumerate(prompts):
        try:
            attrs = parse_caption(prompt)
        except ValueError as err:
            raise ValueError(f"toy oracle: prompt {i}: {err}") from None
        if (attrs.motion is not None) != is_video:
            want = "a video caption (with motion)" if is_video else "an image caption (no motion)"
            raise ValueError(f"toy oracle: prompt {i} {prompt!r} is not {want}")
        parsed.append(attrs)
    return parsed
