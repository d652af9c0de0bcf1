"""Per-family conventions: shapes, packing, time grids, CFG at scale 1, loading errors."""

from __future__ import annotations

import json

import pytest
import torch

from flowalign import flow
from flowalign.models import ModelLoadError, family_for, load_flow_model
from flowalign.models.flux import pack_2x2, unpack_2x2
from flowalign.sampling.guidance import model_velocity_fn

SIZES = {
    "sd3": dict(height=64, width=64),
    "flux": dict(height=64, width=64),
    "wan": dict(height=32, width=32, num_frames=5),
}


@pytest.fixture(scope="module", params=["sd3", "flux", "wan"])
def model(request, tiny_model_dir):
    m = load_flow_model(tiny_model_dir(request.param))
    m.max_sequence_length = 16
    return m


def test_true_velocity_recovers_x0_in_latent_space(model):
    shape = model.latent_shape(2, **SIZES[model.family])
    x0, noise = torch.randn(shape), torch.randn(shape)
    t = torch.tensor([0.3, 0.9])
    x_t = flow.interpolate(x0, noise, t)
    torch.testing.assert_close(x_t - flow.expand_t(t, x_t) * flow.velocity_target(x0, noise), x0)


def test_velocity_shape_and_cfg_scale_one_is_conditional(model):
    shape = model.latent_shape(2, **SIZES[model.family])
    x = torch.randn(shape, generator=torch.Generator().manual_seed(0))
    t = torch.tensor([0.7, 0.2])
    cond, uncond = model.encode_prompt(["a red circle", "a cat"], with_uncond=True)
    with torch.no_grad():
        v_cond = model.velocity(x, t, cond)
        v_cfg1 = model_velocity_fn(model, cond, uncond=uncond, guidance_scale=1.0)(x, t)
        v_cfg3 = model_velocity_fn(model, cond, uncond=uncond, guidance_scale=3.0)(x, t)
        v_unc = model.velocity(x, t, uncond)
    assert v_cond.shape == x.shape
    torch.testing.assert_close(v_cfg1, v_cond)
    # batched [uncond, cond] forward equals the two separate forwards
    torch.testing.assert_close(v_cfg3, v_unc + 3.0 * (v_cond - v_unc), rtol=1e-4, atol=1e-4)


def test_time_grid_is_decreasing_from_one_to_zero(model):
    ts = model.time_grid(8, **SIZES[model.family])
    assert ts.shape == (9,) and ts[-1] == 0 and abs(ts[0].item() - 1) < 1e-6
    assert (ts[1:] < ts[:-1]).all()


def test_encode_decode_shapes(model):
    size = SIZES[model.family]
    if model.is_video:
        media = torch.rand(1, size["num_frames"], 3, size["height"], size["width"])
    else:
        media = torch.rand(1, 3, size["height"], size["width"])
    with torch.no_grad():
        z = model.encode_media(media)
        assert z.shape == model.latent_shape(1, **size)
        out = model.decode_latents(z)
    assert out.shape == media.shape and out.min() >= 0 and out.max() <= 1


def test_check_size_names_the_bad_value(model):
    with pytest.raises(ValueError, match="height"):
        model.check_size(
            height=60,
            width=64 if model.family != "wan" else 32,
            num_frames=SIZES[model.family].get("num_frames", 1),
        )
    if model.family == "wan":
        with pytest.raises(ValueError, match="num_frames"):
            model.check_size(32, 32, num_frames=6)


def test_flux_pack_round_trip():
    x = torch.randn(2, 16, 8, 6)
    tokens = pack_2x2(x)
    assert tokens.shape == (2, 12, 64)
    torch.testing.assert_close(unpack_2x2(tokens, height=8, width=6), x)


def test_saved_model_reloads_bit_identical(tiny_model_dir, tmp_path):
    m = load_flow_model(tiny_model_dir("sd3"))
    m.save_pretrained(tmp_path / "copy")
    again = load_flow_model(tmp_path / "copy")
    for (name, a), (_, b) in zip(
        m.transformer.state_dict().items(), again.transformer.state_dict().items(), strict=True
    ):
        assert torch.equal(a, b), name


def test_loading_errors_name_the_problem(tmp_path):
    with pytest.raises(ModelLoadError, match="does not exist"):
        family_for(tmp_path / "missing")
    with pytest.raises(ModelLoadError, match="no model_index.json"):
        family_for(tmp_path)
    (tmp_path / "model_index.json").write_text(json.dumps({"_class_name": "StableDiffusionXLPipeline"}))
    with pytest.raises(ModelLoadError, match="StableDiffusionXLPipeline"):
        family_for(tmp_path)
