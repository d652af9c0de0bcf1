"""Fixture builders for tests/data: tiny media files written into tmp dirs."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

from flowalign.data.media import save_image, save_video


def colour_image(seed: int, h: int = 8, w: int = 8) -> torch.Tensor:
    """A random image whose values are multiples of 1/255 (exact through PNG)."""
    g = torch.Generator().manual_seed(seed)
    return torch.randint(0, 256, (3, h, w), generator=g).float() / 255.0  # [3, H, W]


def colour_video(seed: int, t: int = 3, h: int = 8, w: int = 8) -> torch.Tensor:
    """A random video of a few colours (exact through GIF's palette and through .npy)."""
    g = torch.Generator().manual_seed(seed)
    palette = torch.randint(0, 256, (8, 3), generator=g)
    idx = torch.randint(0, 8, (t, h, w), generator=g)
    return palette[idx].permute(0, 3, 1, 2).float() / 255.0  # [T, 3, H, W]


@pytest.fixture
def images(tmp_path: Path) -> dict[str, torch.Tensor]:
    """Four distinct 8x8 PNGs img0..img3 under tmp_path/media, returned by relative path."""
    out = {}
    for k in range(4):
        rel = f"media/img{k}.png"
        out[rel] = colour_image(k)
        save_image(out[rel], tmp_path / rel)
    return out


@pytest.fixture
def videos(tmp_path: Path) -> dict[str, torch.Tensor]:
    """Two 3-frame GIFs and two 3-frame .npy videos under tmp_path/media."""
    out = {}
    for k, ext in enumerate([".gif", ".gif", ".npy", ".npy"]):
        rel = f"media/vid{k}{ext}"
        out[rel] = colour_video(10 + k)
        save_video(out[rel], tmp_path / rel)
    return out


@pytest.fixture
def make_image():
    """The colour_image builder, for tests that need more images."""
    return colour_image


@pytest.fixture
def make_video():
    """The colour_video builder."""
    return colour_video
