from __future__ import annotations

import pytest

from flowalign.models import load_flow_model
from flowalign.models.toy import save_toy_model


@pytest.fixture(scope="session")
def toy_image_dir(tmp_path_factory):
    """A tiny random-init toy image model (2 layers, width 64) saved in diffusers' layout."""
    return save_toy_model(tmp_path_factory.mktemp("toy-image"), "image", width=64, num_layers=2)


@pytest.fixture()
def toy_model(toy_image_dir):
    return load_flow_model(toy_image_dir)
