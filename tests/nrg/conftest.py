"""Fixtures for the Flow-NRG tests: tiny toy models (built in memory), a differentiable pixel reward."""

from __future__ import annotations

import os

import pytest
from torch import Tensor

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")

from flowalign.models.toy import ToyModel, build_toy_pipeline  # noqa: E402
from flowalign.rewards.base import RewardModel  # noqa: E402

IMAGE_PROMPTS = ["a small red circle in the center", "a large blue square in the top left"]
VIDEO_PROMPTS = [
    "a small red circle in the center moving left",
    "a large blue square in the top left staying still",
]


@pytest.fixture(autouse=True)
def _one_thread(one_thread):
    """Every test in this folder runs on one thread (the shared ``one_thread`` fixture)."""


def tiny_toy(kind: str = "image", *, seed: int = 0, width: int = 32) -> ToyModel:
    """A freshly initialised toy model small enough for millisecond forwards (24x24 images, 4-frame clips)."""
    pipe = build_toy_pipeline(
        kind, size=24, num_frames=4, width=width, num_layers=2, text_width=16, seed=seed
    )
    return ToyModel(pipe)


@pytest.fixture(scope="session")
def toy_image() -> ToyModel:
    return tiny_toy("image")


@pytest.fixture(scope="session")
def toy_video() -> ToyModel:
    return tiny_toy("video")


class BrightnessReward(RewardModel):
    """Differentiable pixel reward: "vq" = mean brightness, "ta" = mean red minus mean blue."""

    name = "brightness"
    dimensions = ("vq", "ta")
    needs_prompts = False

    def _score_images(self, images: Tensor, prompts: list[str] | None) -> dict[str, Tensor]:
        return {"vq": images.mean(dim=(1, 2, 3)), "ta": (images[:, 0] - images[:, 2]).mean(dim=(1, 2))}


@pytest.fixture
def brightness() -> BrightnessReward:
    return BrightnessReward()
