"""flowalign's generation equals diffusers' own pipelines for the same components, seed and settings."""

from __future__ import annotations

import pytest
import torch

from flowalign.models import load_flow_model
from flowalign.pipelines import FlowPipeline

PROMPTS = ["a small red circle on the left", "a large blue square"]
TOL = 1e-4


def _generate_both(model, *, steps, guidance, height, width, num_frames=None, **extra):
    pipe = model.pipe
    kwargs = dict(num_inference_steps=steps, guidance_scale=guidance, height=height, width=width, **extra)
    if num_frames is not None:
        kwargs["num_frames"] = num_frames
    ref_latents = pipe(
        PROMPTS,
        generator=torch.Generator().manual_seed(7),
        output_type="latent",
        max_sequence_length=model.max_sequence_length,
        **kwargs,
    )
    ref_latents = (
        ref_latents[0]
        if isinstance(ref_latents, tuple)
        else getattr(ref_latents, "images", getattr(ref_latents, "frames", None))
    )
    ref_media = pipe(
        PROMPTS,
        generator=torch.Generator().manual_seed(7),
        output_type="pt",
        max_sequence_length=model.max_sequence_length,
        **kwargs,
    )
    ref_media = getattr(ref_media, "images", None) if hasattr(ref_media, "images") else ref_media.frames
    ours = FlowPipeline(model)(PROMPTS, generator=torch.Generator().manual_seed(7), **kwargs)
    return ref_latents, ref_media, ours


@pytest.mark.parametrize("guidance", [1.0, 4.0])
def test_sd3_matches_diffusers(tiny_model_dir, guidance):
    model = load_flow_model(tiny_model_dir("sd3"))
    model.max_sequence_length = 16
    ref_latents, ref_media, ours = _generate_both(model, steps=3, guidance=guidance, height=64, width=64)
    assert ours.latents.shape == ref_latents.shape == (2, 16, 8, 8)
    assert (ours.latents - ref_latents).abs().max() <= TOL
    assert ours.media.shape == ref_media.shape == (2, 3, 64, 64)
    assert (ours.media - ref_media).abs().max() <= TOL


def test_flux_matches_diffusers(tiny_model_dir):
    model = load_flow_model(tiny_model_dir("flux"))
    model.max_sequence_length = 16
    assert model.uses_guidance_embedding
    ref_packed, ref_media, ours = _generate_both(model, steps=3, guidance=3.5, height=64, width=64)
    from flowalign.models.flux import pack_2x2

    # FluxPipeline returns packed latents for output_type="latent"
    assert (pack_2x2(ours.latents) - ref_packed).abs().max() <= TOL
    assert (ours.media - ref_media).abs().max() <= TOL


def test_flux_true_cfg_matches_diffusers(tiny_model_dir):
    model = load_flow_model(tiny_model_dir("flux"))
    model.max_sequence_length = 16
    kwargs = dict(
        num_inference_steps=2,
        guidance_scale=3.5,
        height=32,
        width=32,
        true_cfg_scale=3.0,
        negative_prompt=["blurry", "ugly"],
    )
    ref = model.pipe(
        PROMPTS,
        generator=torch.Generator().manual_seed(3),
        output_type="pt",
        max_sequence_length=16,
        **kwargs,
    ).images
    ours = FlowPipeline(model)(PROMPTS, generator=torch.Generator().manual_seed(3), **kwargs)
    assert (ours.media - ref).abs().max() <= TOL


@pytest.mark.parametrize("guidance", [1.0, 5.0])
def test_wan_matches_diffusers(tiny_model_dir, guidance):
    model = load_flow_model(tiny_model_dir("wan"))
    model.max_sequence_length = 16
    ref_latents, ref_media, ours = _generate_both(
        model, steps=3, guidance=guidance, height=32, width=32, num_frames=5
    )
    assert ours.latents.shape == ref_latents.shape == (2, 16, 2, 4, 4)
    assert (ours.latents - ref_latents).abs().max() <= TOL
    assert ours.media.shape == (2, 5, 3, 32, 32)
    assert (ours.media - ref_media).abs().max() <= TOL
