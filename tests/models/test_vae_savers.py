"""VAE slicing and tiling: the switches reach the VAE and leave the decoded output unchanged where the
arithmetic says they must (slicing always; tiling on latents no larger than one tile)."""

from __future__ import annotations

import pytest
import torch
from typer.testing import CliRunner

from flowalign.config import TrainConfig
from flowalign.models.sd3 import SD3Model
from flowalign.models.tiny import tiny_sd3_pipeline, tiny_wan_pipeline
from flowalign.models.vae_savers import enable_vae_savers
from flowalign.models.wan import WanModel
from flowalign.training.runs import load_training_model

# fp64 decode: sliced and batched runs do the same per-sample operations, and a reordered reduction
# could move each output by at most (number of terms summed, < 10^4 for these nets) x eps64 x |x|, so
# 1e-10 bounds any difference with a wide margin while still catching a wrong sample or order.
FP64_TOL = 1e-10


def _decode(model, latents: torch.Tensor) -> torch.Tensor:
    with torch.no_grad():
        return model.decode_latents(latents)


@pytest.mark.parametrize("family", ["sd3", "wan"])
def test_sliced_and_single_tile_decode_equal_the_plain_decode(family):
    if family == "sd3":
        model = SD3Model(tiny_sd3_pipeline())
        latents = torch.randn(2, 16, 8, 8, generator=torch.Generator().manual_seed(0))  # 64 px: one tile
    else:
        model = WanModel(tiny_wan_pipeline())
        latents = torch.randn(2, 16, 2, 8, 8, generator=torch.Generator().manual_seed(0))  # 5 frames, 64 px
    model.pipe.vae.to(torch.float64)
    plain = _decode(model, latents.double())
    enable_vae_savers(model, slicing=True, tiling=True)
    vae = model.pipe.vae
    assert vae.use_slicing and vae.use_tiling
    saved = _decode(model, latents.double())
    assert saved.shape == plain.shape
    torch.testing.assert_close(saved, plain, atol=FP64_TOL, rtol=0)


def test_tiling_changes_the_path_above_one_tile():
    # the switch is live: a 128 px decode (four 64 px tiles) goes through the blended-tile path
    model = SD3Model(tiny_sd3_pipeline())
    latents = torch.randn(1, 16, 16, 16, generator=torch.Generator().manual_seed(1))
    plain = _decode(model, latents)
    enable_vae_savers(model, tiling=True)
    tiled = _decode(model, latents)
    assert tiled.shape == plain.shape and not torch.equal(tiled, plain)


def test_training_config_keys_reach_the_vae_and_toy_is_refused(tiny_model_dir):
    train = TrainConfig(cpu=True, vae_slicing=True, vae_tiling=True)
    model = load_training_model(str(tiny_model_dir("sd3")), train)
    assert model.pipe.vae.use_slicing and model.pipe.vae.use_tiling
    with pytest.raises(ValueError, match=r"^train\.vae_tiling: the toy model has no VAE"):
        load_training_model("toy:image", TrainConfig(cpu=True, vae_tiling=True))


def test_vae_class_without_the_switch_is_refused_naming_the_key():
    model = SD3Model(tiny_sd3_pipeline())
    model.pipe.vae.enable_slicing = None  # a VAE class without the switch
    with pytest.raises(ValueError, match=r"^vae_slicing: .*AutoencoderKL\) has no enable_slicing"):
        enable_vae_savers(model, slicing=True)


def test_generate_refuses_vae_tiling_on_the_toy_model_in_one_line(tmp_path):
    from flowalign.cli.app import app
    from flowalign.models.toy import ToyModel, build_toy_pipeline

    folder = tmp_path / "toy"
    ToyModel(build_toy_pipeline("image")).pipe.save_pretrained(folder)
    result = CliRunner().invoke(
        app,
        ["generate", "--model", str(folder), "--out", str(tmp_path / "o"), "--prompt", "a", "--vae-tiling"],
    )
    assert result.exit_code != 0
    assert "error: --vae-tiling: the toy model has no VAE" in result.output


def test_the_loop_turns_the_savers_on_for_a_teacher_and_refuses_runs_without_a_flow_model():
    from flowalign.training.savers import enable_run_vae_savers

    class Distill:  # a one-step method holds its teacher as a FlowModel attribute
        def __init__(self) -> None:
            self.teacher = SD3Model(tiny_sd3_pipeline())

    method = Distill()
    enable_run_vae_savers(method, TrainConfig(vae_slicing=True))
    assert method.teacher.pipe.vae.use_slicing and not method.teacher.pipe.vae.use_tiling
    with pytest.raises(ValueError, match=r"^train\.vae_tiling: this run \(object\) trains no flow model"):
        enable_run_vae_savers(object(), TrainConfig(vae_tiling=True))
