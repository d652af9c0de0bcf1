"""Image grids for reports and the demo."""

from __future__ import annotations

import math

import torch
from torch import Tensor


def image_grid(images: Tensor, *, nrow: int | None = None, pad: int = 2, pad_value: float = 1.0) -> Tensor:
    """Tile images ``[B, 3, H, W]`` (videos ``[B, T, 3, H, W]``: first, middle and last frame side by side)
    into one ``[3, H', W']`` picture, ``nrow`` images per row."""
    if images.ndim == 5:
        t = images.shape[1]
        images = torch.cat([images[:, 0], images[:, t // 2], images[:, -1]], dim=-1)  # [B, 3, H, 3W]
    if images.ndim != 4 or images.shape[1] != 3:
        raise ValueError(f"expected images [B, 3, H, W], got {tuple(images.shape)}")
    b, c, h, w = images.shape
    nrow = nrow or math.ceil(math.sqrt(b))
    rows = math.ceil(b / nrow)
    grid = torch.full((c, rows * (h + pad) + pad, nrow * (w + pad) + pad), pad_value, dtype=images.dtype)
    for i in range(b):
        r, col = divmod(i, nrow)
        top, left = pad + r * (h + pad), pad + col * (w + pad)
        grid[:, top : top + h, left : left + w] = images[i]
    return grid


def upscale_nearest(image: Tensor, factor: int) -> Tensor:
    """Enlarge a [3, H, W] picture by an integer factor without blurring (to look at 32x32 samples)."""
    return image.repeat_interleave(factor, dim=-2).repeat_interleave(factor, dim=-1)
