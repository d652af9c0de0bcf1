"""FLUX.2 (dev, klein), Qwen-Image and Z-Image: flowalign's sampler equals each family's diffusers pipeline.

Tiny random models in fp32 with the family's default scheduler settings: latents and decoded images
agree to 1e-4 (the arithmetic is the same; only the summation order of a few batched ops differs,
errors ~1e-6 on O(1) values). In bf16 the same generation runs and gives finite images.
"""

from __future__ import annotations

import pytest
import torch

from flowalign.models import load_flow_model
from flowalign.models.flux import pack_2x2
from flowalign.pipelines import FlowPipeline

pytestmark = pytest.mark.usefixtures("one_thread")

PROMPTS = ["a small red circle on the left", "a large blue square"]
TOL = 1e-4
MAX_LEN = 96  # the chat template adds ~40 byte tokens to each prompt


def _diffusers_latents(model, out):
    """Our canonical latents in the layout the family's pipeline returns for output_type='latent'."""
    if model.family == "flux2":  # FLUX.2 [dev]: its tokens [B, H W, 4C] as they were sampled
        return out.flatten(2).transpose(1, 2)
    if model.family == "flux2-klein":  # FLUX.2 [klein]: the VAE's latents
        return model.to_vae_latents(out)
    return pack_2x2(out) if model.family == "qwen-image" else out  # Qwen-Image: its packed tokens


def _pipe_kwargs(family: str, guidance: float) -> dict:
    """The family pipeline's arguments for flowalign's guidance scale ``guidance``."""
    if family == "z-image":  # Z-Image's scale g means v_cond + g (v_cond - v_uncond): ours minus one
        return {"guidance_scale": guidance - 1.0}
    if family == "qwen-image":  # true CFG runs when a negative prompt is given
        return {"true_cfg_scale": guidance, "negative_prompt": [" ", " "]} if guidance > 1 else {}
    return {"guidance_scale": guidance}


CASES = [
    ("flux2", 4.0),
    ("flux2-klein", 4.0),
    ("flux2-klein", 1.0),
    ("z-image", 5.0),
    ("z-image", 1.0),
    ("qwen-image", 4.0),
    ("qwen-image", 1.0),
]
FAMILIES = sorted({family for family, _ in CASES})


@pytest.mark.parametrize(("family", "guidance"), CASES)
def test_sampler_matches_the_family_pipeline(tiny_model_dir, family, guidance):
    model = load_flow_model(tiny_model_dir(family))
    model.max_sequence_length = MAX_LEN
    common = dict(num_inference_steps=3, height=64, width=64)
    pipe_kwargs = _pipe_kwargs(family, guidance)

    def reference(output_type):
        out = model.pipe(
            prompt=list(PROMPTS),  # Z-Image's pipeline rewrites the list it is given
            generator=torch.Generator().manual_seed(7),
            output_type=output_type,
            max_sequence_length=MAX_LEN,
            **common,
            **pipe_kwargs,
        )
        return out.images

    ours = FlowPipeline(model)(
        PROMPTS,
        generator=torch.Generator().manual_seed(7),
        guidance_scale=guidance,
        negative_prompt=pipe_kwargs.get("negative_prompt"),
        **common,
    )
    ref_latents, ref_media = reference("latent"), reference("pt")
    latents = _diffusers_latents(model, ours.latents)
    assert latents.shape == ref_latents.shape
    assert (latents - ref_latents).abs().max() <= TOL
    assert ours.media.shape == ref_media.shape == (2, 3, 64, 64)
    assert (ours.media - ref_media).abs().max() <= TOL


@pytest.mark.parametrize("family", FAMILIES)
def test_bf16_generation_runs(tiny_model_dir, family):
    model = load_flow_model(tiny_model_dir(family), torch_dtype=torch.bfloat16)
    model.max_sequence_length = MAX_LEN
    assert model.dtype == torch.bfloat16
    out = FlowPipeline(model)(
        PROMPTS, generator=torch.Generator().manual_seed(1), num_inference_steps=2, height=32, width=32
    )
    assert out.latents.dtype == torch.float32 and out.media.shape == (2, 3, 32, 32)
    assert torch.isfinite(out.media).all()


@pytest.mark.parametrize("family", FAMILIES)
def test_encode_decode_round_trip_layout(tiny_model_dir, family):
    """encode_media gives the canonical latent shape, and decode_latents returns images in [0, 1]."""
    model = load_flow_model(tiny_model_dir(family))
    images = torch.rand(2, 3, 32, 32, generator=torch.Generator().manual_seed(0))
    z = model.encode_media(images)
    assert tuple(z.shape) == model.latent_shape(2, 32, 32)
    back = model.decode_latents(z)
    assert back.shape == images.shape and back.min() >= 0 and back.max() <= 1
    with pytest.raises(ValueError, match="height must be a positive multiple of 16"):
        model.check_size(40, 32)


def test_prompt_cache_keeps_the_token_mask(tiny_model_dir, tmp_path):
    """Z-Image's rows differ in length: the cache (memory and disk) returns each row's mask with its embeddings."""
    from flowalign.training.cache import PromptEmbedCache

    model = load_flow_model(tiny_model_dir("z-image"))
    model.max_sequence_length = MAX_LEN
    prompts = ["a red circle", "a much longer prompt about a large blue square", "x"]
    ref, _ = model.encode_prompt([prompts[1], prompts[2]])
    assert ref.mask.sum(1).tolist()[0] > ref.mask.sum(1).tolist()[1]
    for cache_dir in (None, tmp_path / "cache"):
        got = PromptEmbedCache.build(model, prompts, cache_dir=cache_dir, batch_size=2).lookup(prompts[1:])
        assert got.mask.dtype == torch.bool and torch.equal(got.mask, ref.mask)
        assert torch.equal(got.embeds, ref.embeds)  # the pipeline pads every prompt to max_sequence_length
