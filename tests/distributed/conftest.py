from __future__ import annotations

import pytest

from flowalign.models.toy import save_toy_model


@pytest.fixture(scope="session")
def toy_dist_dir(tmp_path_factory):
    """A tiny random-init toy image model (2 layers, width 64) saved in diffusers' layout."""
    return save_toy_model(tmp_path_factory.mktemp("toy-dist"), "image", width=64, num_layers=2)
