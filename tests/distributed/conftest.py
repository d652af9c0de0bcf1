from __future__ import annotations

import pytest

from flowalign.models.toy import save_toy_model


@pytest.fixture(scope="session")
def toy_dist_dir(tmp_path_factory):
    """A tiny random-init toy image model (2 layers, width 64) saved in diffusers' layout."""
    return save_toy_model(tmp_path_factory.mktemp("toy-dist"), "image", width=64, num_layers=2)


@pytest.fixture(scope="session")
def toy_teacher_dir(tmp_path_factory):
    """A tiny toy teacher for the one-step methods (24x24, width 32, 2 layers)."""
    return save_toy_model(
        tmp_path_factory.mktemp("toy-teacher"), "image", size=24, width=32, num_layers=2, text_width=16
    )
