"""Fixtures for the one-step distillation tests: a tiny saved toy teacher, batches, a step runner."""

from __future__ import annotations

import os

import pytest

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")

from onestep_helpers import SIZE  # noqa: E402

from flowalign.models import load_flow_model  # noqa: E402
from flowalign.models.toy import save_toy_model  # noqa: E402


@pytest.fixture(autouse=True)
def _one_thread(one_thread):
    """Every test in this folder runs on one thread (the shared ``one_thread`` fixture)."""


@pytest.fixture(scope="session")
def teacher_dir(tmp_path_factory):
    """A random-init tiny toy image model (24x24, width 32, 2 layers) saved in diffusers' layout."""
    return save_toy_model(
        tmp_path_factory.mktemp("toy-teacher"), "image", size=SIZE, width=32, num_layers=2, text_width=16
    )


@pytest.fixture
def teacher(teacher_dir):
    """A fresh copy of the tiny teacher (methods modify it: LoRA fake scores, frozen flags)."""
    return load_flow_model(teacher_dir)
