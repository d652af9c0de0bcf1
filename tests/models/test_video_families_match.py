"""HunyuanVideo 1.5 and LTX-2 (video): flowalign's sampler equals the family's diffusers pipeline.

fp32, the family's default scheduler settings, tiny random models (flowalign.models.tiny_video_families).
Both sides run the same operations on the same weights in fp32: what differs is only the order of a few
float operations (one batched CFG forward here, two forwards there), so latents and decoded frames agree
to about 1e-6; 1e-4 is the acceptance bound.
"""

from __future__ import annotations

import pytest
import torch
from diffusers import ClassifierFreeGuidance

from flowalign.models import load_flow_model
from flowalign.pipelines import FlowPipeline

pytestmark = pytest.mark.usefixtures("one_thread")

TOL = 1e-4
PROMPTS = ["a red ball rolls left", 'a sign that reads "OPEN"']


def short_hunyuan(model):
    """Shorter text and image-token slots (pipeline attributes both samplers read), for CPU speed."""
    model.pipe.tokenizer_max_length = 24
    model.pipe.tokenizer_2_max_length = 16
    model.pipe.vision_num_semantic_tokens = 8
    return model


@pytest.fixture(scope="module")
def hunyuan(tiny_model_dir):
    return short_hunyuan(load_flow_model(tiny_model_dir("hunyuan_video15")))


def _hunyuan_reference(model, prompts, *, guidance, output_type, **kwargs):
    pipe = model.pipe
    pipe.register_modules(guider=ClassifierFreeGuidance(guidance_scale=guidance))
    out = pipe(prompts, generator=torch.Generator().manual_seed(7), output_type=output_type, **kwargs)
    return out.frames


@pytest.mark.parametrize("guidance", [1.0, 6.0])
def test_hunyuan_video15_matches_diffusers(hunyuan, guidance):
    kwargs = dict(num_inference_steps=3, height=32, width=32, num_frames=5)
    ref = _hunyuan_reference(hunyuan, PROMPTS, guidance=guidance, output_type="latent", **kwargs)
    ours = FlowPipeline(hunyuan)(
        PROMPTS,
        generator=torch.Generator().manual_seed(7),
        guidance_scale=guidance,
        output_type="latent",
        **kwargs,
    )
    assert ours.latents.shape == ref.shape == (2, 8, 2, 2, 2)
    assert (ours.latents - ref).abs().max() <= TOL
    # decoded frames: one prompt (diffusers' VAE decode fails on batches > 1, see decode_latents)
    ref_media = _hunyuan_reference(hunyuan, PROMPTS[1:], guidance=guidance, output_type="pt", **kwargs)
    ours = FlowPipeline(hunyuan)(
        PROMPTS[1:], generator=torch.Generator().manual_seed(7), guidance_scale=guidance, **kwargs
    )
    assert ours.media.shape == ref_media.shape == (1, 5, 3, 32, 32)
    assert (ours.media - ref_media).abs().max() <= TOL


def test_hunyuan_video15_default_guidance_is_the_guiders(hunyuan):
    hunyuan.pipe.register_modules(guider=ClassifierFreeGuidance(guidance_scale=6.0))
    assert type(hunyuan)(hunyuan.pipe).default_guidance_scale == 6.0
    hunyuan.pipe.register_modules(guider=ClassifierFreeGuidance(guidance_scale=6.0, guidance_rescale=0.7))
    with pytest.raises(ValueError, match="guidance_rescale"):
        type(hunyuan)(hunyuan.pipe)
    hunyuan.pipe.register_modules(guider=ClassifierFreeGuidance(guidance_scale=6.0))


def test_hunyuan_video15_bf16_runs(hunyuan, tiny_model_dir):
    model = short_hunyuan(load_flow_model(tiny_model_dir("hunyuan_video15"), torch_dtype=torch.bfloat16))
    out = FlowPipeline(model)(
        PROMPTS[:1],
        generator=torch.Generator().manual_seed(0),
        num_inference_steps=2,
        height=32,
        width=32,
        num_frames=5,
    )
    assert out.latents.dtype == torch.float32 and torch.isfinite(out.latents).all()
    assert out.media.shape == (1, 5, 3, 32, 32) and torch.isfinite(out.media).all()
