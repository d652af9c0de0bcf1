"""Fixtures for the reward tests: tiny CLIP backbones saved once per session (built by ``tiny_clip``)."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
from tiny_clip import write_hf_clip_dir, write_open_clip_dir


@pytest.fixture(scope="session")
def open_clip_dir(tmp_path_factory) -> Path:
    return write_open_clip_dir(tmp_path_factory.mktemp("open_clip_tiny"))


@pytest.fixture(scope="session")
def hf_clip_dir(tmp_path_factory) -> Path:
    return write_hf_clip_dir(tmp_path_factory.mktemp("hf_clip_tiny"))


@pytest.fixture()
def images() -> torch.Tensor:
    """Four 40x48 RGB images in [0, 1], fixed seed."""
    return torch.rand(4, 3, 40, 48, generator=torch.Generator().manual_seed(1))
