"""Wan 2.2 (A14B, TI2V-5B) and Wan image-to-video: flowalign's sampler equals diffusers' pipelines (fp32)."""

from __future__ import annotations

import numpy as np
import PIL.Image
import pytest
import torch

from flowalign.models import load_flow_model
from flowalign.models.tiny_conditioned import save_tiny_conditioned
from flowalign.pipelines import FlowPipeline

pytestmark = pytest.mark.usefixtures("one_thread")

PROMPTS = ["a small red circle on the left", "a large blue square"]
TOL = 1e-4  # fp32 end to end; the two paths differ only in op order (batched CFG, batched encodes)


@pytest.fixture(scope="module")
def tiny_dir(tmp_path_factory):
    cache: dict[str, object] = {}

    def get(name: str):
        if name not in cache:
            cache[name] = save_tiny_conditioned(name, tmp_path_factory.mktemp(f"tiny-{name}"))
        return cache[name]

    return get


def condition_image(seed: int = 0, size: int = 32) -> PIL.Image.Image:
    pixels = np.random.default_rng(seed).integers(0, 256, size=(size, size, 3), dtype=np.uint8)
    return PIL.Image.fromarray(pixels)


def run_both(model, *, image=None, guidance=5.0, steps=3, height=32, width=32, num_frames=5):
    kwargs = dict(num_inference_steps=steps, guidance_scale=guidance, height=height, width=width)
    kwargs["num_frames"] = num_frames
    extra = {} if image is None else {"image": image}
    ref = {}
    for output_type in ("latent", "pt"):
        out = model.pipe(
            prompt=PROMPTS,
            generator=torch.Generator().manual_seed(7),
            output_type=output_type,
            max_sequence_length=model.max_sequence_length,
            **kwargs,
            **extra,
        )
        ref[output_type] = out.frames
    ours = FlowPipeline(model)(PROMPTS, generator=torch.Generator().manual_seed(7), **kwargs, **extra)
    return ref["latent"], ref["pt"], ours


def check(ref_latents, ref_media, ours):
    assert ours.latents.shape == ref_latents.shape
    assert (ours.latents - ref_latents).abs().max() <= TOL
    assert ours.media.shape == ref_media.shape
    assert (ours.media - ref_media).abs().max() <= TOL


def load(tiny_dir, name):
    model = load_flow_model(tiny_dir(name))
    model.max_sequence_length = 16
    return model


@pytest.mark.parametrize("guidance", [1.0, 5.0])
def test_wan21_i2v_matches_diffusers(tiny_dir, guidance):
    model = load(tiny_dir, "wan-i2v")
    assert model.family == "wan-i2v" and model.uses_clip_image
    check(*run_both(model, image=condition_image(), guidance=guidance))


def test_wan22_i2v_matches_diffusers(tiny_dir):
    model = load(tiny_dir, "wan22-i2v")
    assert model.two_experts and not model.uses_clip_image
    check(*run_both(model, image=condition_image(1), steps=4))


def test_wan22_a14b_matches_diffusers(tiny_dir):
    model = load(tiny_dir, "wan22")
    assert model.two_experts and model.boundary_timestep == 875.0
    check(*run_both(model, steps=4))


def test_wan22_ti2v_text_to_video_matches_diffusers(tiny_dir):
    model = load(tiny_dir, "wan22-ti2v")
    assert model.pipe.vae.config.z_dim == 48 and model.pipe.vae_scale_factor_spatial == 16
    ref_latents, ref_media, ours = run_both(model, height=64, width=64)
    assert ours.latents.shape == (2, 48, 2, 4, 4)
    check(ref_latents, ref_media, ours)


def test_wan22_ti2v_image_to_video_matches_diffusers(tiny_dir):
    from diffusers import WanImageToVideoPipeline

    model = load(tiny_dir, "wan22-ti2v")
    i2v = WanImageToVideoPipeline(**model.pipe.components, expand_timesteps=True)
    i2v.set_progress_bar_config(disable=True)
    image = condition_image(2, 64)
    kwargs = dict(num_inference_steps=3, guidance_scale=5.0, height=64, width=64, num_frames=5)
    ref = {
        kind: i2v(
            prompt=PROMPTS,
            image=image,
            generator=torch.Generator().manual_seed(7),
            output_type=kind,
            max_sequence_length=16,
            **kwargs,
        ).frames
        for kind in ("latent", "pt")
    }
    ours = FlowPipeline(model)(PROMPTS, image=image, generator=torch.Generator().manual_seed(7), **kwargs)
    check(ref["latent"], ref["pt"], ours)


def _expert_calls(model, run):
    """Which expert ("high"/"low") ran at each transformer call of ``run()``."""
    calls = []
    hooks = [
        model.pipe.transformer.register_forward_hook(lambda *a: calls.append("high")),
        model.pipe.transformer_2.register_forward_hook(lambda *a: calls.append("low")),
    ]
    try:
        run()
    finally:
        for hook in hooks:
            hook.remove()
    return calls


@pytest.mark.parametrize("name", ["wan22", "wan22-i2v"])
def test_expert_at_each_step_is_diffusers_choice(tiny_dir, name):
    model = load(tiny_dir, name)
    image = {} if name == "wan22" else {"image": condition_image()}
    kwargs = dict(num_inference_steps=6, guidance_scale=1.0, height=32, width=32, num_frames=5, **image)
    theirs = _expert_calls(model, lambda: model.pipe(prompt=PROMPTS[:1], output_type="latent", **kwargs))
    ours = _expert_calls(model, lambda: FlowPipeline(model)(PROMPTS[:1], output_type="latent", **kwargs))
    assert theirs == ours and "high" in ours and "low" in ours  # the grid crosses the boundary
    ts = model.time_grid(6, height=32, width=32, num_frames=5)[:-1]
    assert ours == ["high" if 1000 * t >= model.boundary_timestep else "low" for t in ts.tolist()]


def test_mixed_batch_runs_each_sample_through_its_expert(tiny_dir):
    model = load(tiny_dir, "wan22")
    cond, _ = model.encode_prompt(PROMPTS)
    x = torch.randn(2, 16, 2, 4, 4, generator=torch.Generator().manual_seed(0))
    t = torch.tensor([0.95, 0.3])  # one sample on each side of the 0.875 boundary
    both = model.velocity(x, t, cond)
    for i, expert in enumerate([model.pipe.transformer, model.pipe.transformer_2]):
        alone = model.velocity(x[i : i + 1], t[i : i + 1], cond.index([i]), net=expert)
        assert (both[i : i + 1] - alone).abs().max() <= TOL


@pytest.mark.parametrize("name", ["wan-i2v", "wan22-i2v", "wan22", "wan22-ti2v"])
def test_bf16_generation_runs(tiny_dir, name):
    model = load_flow_model(tiny_dir(name), torch_dtype=torch.bfloat16)
    model.max_sequence_length = 16
    assert model.pipe.text_encoder.dtype == torch.bfloat16 and model.pipe.vae.dtype == torch.float32
    side = 64 if name == "wan22-ti2v" else 32
    image = {} if name == "wan22" else {"image": condition_image(3, side)}
    out = FlowPipeline(model)(
        PROMPTS, num_inference_steps=2, height=side, width=side, num_frames=5, guidance_scale=5.0, **image
    )
    assert out.latents.dtype == torch.float32 and torch.isfinite(out.latents).all()
    assert out.media.shape == (2, 5, 3, side, side) and torch.isfinite(out.media).all()
