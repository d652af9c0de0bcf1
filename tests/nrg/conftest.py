"""Fixtures for the Flow-NRG tests: tiny toy models (built in memory), a differentiable pixel reward."""

from __future__ import annotations

import os

import pytest

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")

from nrg_helpers import tiny_toy  # noqa: E402
from stand_ins import BrightnessReward  # noqa: E402

from flowalign.models.toy import ToyModel  # noqa: E402


@pytest.fixture(autouse=True)
def _one_thread(one_thread):
    """Every test in this folder runs on one thread (the shared ``one_thread`` fixture)."""


@pytest.fixture(scope="session")
def toy_image() -> ToyModel:
    return tiny_toy("image")


@pytest.fixture(scope="session")
def toy_video() -> ToyModel:
    return tiny_toy("video")


@pytest.fixture
def brightness() -> BrightnessReward:
    return BrightnessReward()
