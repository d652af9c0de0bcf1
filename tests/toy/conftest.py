"""Shared ground-truth renders for the toy-world tests (rendered once per session)."""

from __future__ import annotations

import pytest
import torch

from flowalign.toy.render import render_images, render_videos
from flowalign.toy.world import Scene, sample_scenes

NUM_GT = 300


@pytest.fixture(autouse=True)
def _one_torch_thread():
    """Run toy tests on one intra-op thread: the oracles issue many small ops, which on the shared 2-core
    machine run several times slower when two threads contend with other jobs."""
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


@pytest.fixture(scope="session")
def gt_images() -> tuple[list[Scene], torch.Tensor]:
    """300 image scenes (half train, half held-out) and their renders [300, 3, 32, 32]."""
    scenes = sample_scenes(NUM_GT // 2, seed=11, split="train", kind="image")
    scenes += sample_scenes(NUM_GT // 2, seed=11, split="heldout", kind="image")
    return scenes, render_images(scenes)


@pytest.fixture(scope="session")
def gt_videos() -> tuple[list[Scene], torch.Tensor]:
    """300 video scenes (half train, half held-out) and their 8-frame renders [300, 8, 3, 32, 32]."""
    scenes = sample_scenes(NUM_GT // 2, seed=12, split="train", kind="video")
    scenes += sample_scenes(NUM_GT // 2, seed=12, split="heldout", kind="video")
    return scenes, render_videos(scenes, num_frames=8)
