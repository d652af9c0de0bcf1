"""The size guard: its lower bound, the VAE width it reads, and the refusal message."""

from __future__ import annotations

import sys

import pytest
import torch

import flowalign.pipelines.memory_guard as guard
from flowalign.models import load_flow_model


def test_lower_bound_is_the_decoded_batch_plus_one_frame_of_full_resolution_vae_activation():
    assert guard.media_bytes(64, 32, 1, 3) == 3 * 64 * 32 * 3 * 4
    assert guard.media_bytes(64, 32, 5, 2, vae=(128, 2)) == 2 * 64 * 32 * 5 * 3 * 4 + 64 * 32 * 128 * 2


@pytest.mark.parametrize(("family", "dtype"), [("sd3", torch.bfloat16), ("wan", torch.bfloat16)])
def test_vae_width_and_bytes_are_read_from_the_model(family, dtype, tiny_model_dir):
    model = load_flow_model(tiny_model_dir(family), torch_dtype=dtype)
    c0, nbytes = guard.vae_channels(model)
    config = model.pipe.vae.config
    assert c0 == (config.block_out_channels[0] if family == "sd3" else config.base_dim)
    assert nbytes == (2 if family == "sd3" else 4)  # Wan's VAE stays fp32 whatever the compute dtype


def test_refusal_names_both_numbers(monkeypatch):
    monkeypatch.setattr(guard, "available_memory", lambda device: 2 * guard.GIB)
    guard.check_media_fits(256, 256, 1, 4, "cpu")  # 3 MiB: fits
    with pytest.raises(ValueError, match=r"at 16384x16384 with batch 2 needs at least 6\.0 GiB but 2\.0 GiB"):
        guard.check_media_fits(16384, 16384, 1, 2, "cpu")


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="reads /proc/meminfo")
def test_host_memory_is_read():
    room = guard.available_memory("cpu")
    assert isinstance(room, int) and 0 < room <= guard._host_available()
