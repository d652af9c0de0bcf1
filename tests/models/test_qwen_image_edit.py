"""Qwen-Image-Edit-Plus and Qwen-Image-Edit: flowalign's sampler equals diffusers' edit pipelines (fp32).

The pipelines show the condition image to the VAE at an area of 1024 x 1024 and (Plus) to the text
encoder at 384 x 384, whatever the output size. The fast tests shrink those two areas in diffusers'
module (``small_edit_areas``); the adapter reads them from there at call time, so both paths see the
same sizes. The slow tests run the released areas. fp32 end to end: both paths do the same
arithmetic in another order (per-row vs batched encodes), differences ~1e-6 on O(1) values.
"""

from __future__ import annotations

import numpy as np
import PIL.Image
import pytest
import torch

from flowalign.models import load_flow_model
from flowalign.models.flux import pack_2x2
from flowalign.pipelines import FlowPipeline

pytestmark = pytest.mark.usefixtures("one_thread")

PROMPT = "make the circle red"
TOL = 1e-4
MAX_LEN = 64  # "Picture 1: ", 4 image tokens of a 56 x 56 view, the prompt's bytes, the template's tail


def edit_image(seed: int = 0, height: int = 48, width: int = 32) -> PIL.Image.Image:
    pixels = np.random.default_rng(seed).integers(0, 256, size=(height, width, 3), dtype=np.uint8)
    return PIL.Image.fromarray(pixels)


@pytest.fixture
def small_edit_areas(monkeypatch):
    """The edit pipelines' image areas shrunk for tiny models: VL view 56 x 56 (the Qwen2-VL
    processor's minimum), VAE image 64 x 96 pixels (Plus's module constants; the first release's area is a
    literal in its ``__call__``, so its ``calculate_dimensions`` is wrapped)."""
    from diffusers.pipelines.qwenimage import pipeline_qwenimage_edit as edit_module
    from diffusers.pipelines.qwenimage import pipeline_qwenimage_edit_plus as plus_module

    monkeypatch.setattr(plus_module, "CONDITION_IMAGE_SIZE", 56 * 56)
    monkeypatch.setattr(plus_module, "VAE_IMAGE_SIZE", 64 * 96)
    released = edit_module.calculate_dimensions
    monkeypatch.setattr(edit_module, "calculate_dimensions", lambda area, ratio: released(64 * 96, ratio))


def load(tiny_model_dir, family: str, **kwargs):
    model = load_flow_model(tiny_model_dir(family), **kwargs)
    model.max_sequence_length = MAX_LEN
    return model


def run_both(model, image, *, guidance, steps=3, height=64, width=48):
    kwargs = dict(num_inference_steps=steps, height=height, width=width)
    cfg = {"true_cfg_scale": guidance, "negative_prompt": " "} if guidance > 1 else {}
    ref = {
        kind: model.pipe(
            image=image,
            prompt=PROMPT,
            generator=torch.Generator().manual_seed(7),
            output_type=kind,
            **kwargs,
            **cfg,
        ).images
        for kind in ("latent", "pt")
    }
    ours = FlowPipeline(model)(
        [PROMPT], image=image, generator=torch.Generator().manual_seed(7), guidance_scale=guidance, **kwargs
    )
    return ref["latent"], ref["pt"], ours


def check(ref_latents, ref_media, ours):
    latents = pack_2x2(ours.latents)  # the pipeline returns its packed tokens for output_type="latent"
    assert latents.shape == ref_latents.shape
    assert (latents - ref_latents).abs().max() <= TOL
    assert ours.media.shape == ref_media.shape
    assert (ours.media - ref_media).abs().max() <= TOL


@pytest.mark.usefixtures("small_edit_areas")
@pytest.mark.parametrize(
    ("family", "guidance"),
    [("qwen-image-edit-plus", 4.0), ("qwen-image-edit-plus", 1.0), ("qwen-image-edit", 4.0)],
)
def test_sampler_matches_the_edit_pipeline(tiny_model_dir, family, guidance):
    model = load(tiny_model_dir, family)
    assert model.family == family and model.requires_images
    ref_latents, ref_media, ours = run_both(model, edit_image(), guidance=guidance)
    assert ours.latents.shape == (1, 16, 8, 6)
    check(ref_latents, ref_media, ours)


@pytest.mark.usefixtures("small_edit_areas")
def test_condition_reaches_the_text_encoder_and_the_transformer(tiny_model_dir):
    """The condition image's tokens sit inside the text embeddings and its latents in image_latents
    (of its own size, not the output's); another image changes both."""
    model = load(tiny_model_dir, "qwen-image-edit-plus")
    a, _ = model.encode_prompt([PROMPT], images=[edit_image(0)], height=32, width=32)
    b, _ = model.encode_prompt([PROMPT], images=[edit_image(1)], height=32, width=32)
    assert a.image_latents.shape == (1, 16, 12, 8)  # 64 x 96 pixels at 2:3: 64 wide, 96 high
    assert torch.equal(a.mask, b.mask) and (a.embeds - b.embeds).abs().max() > 1e-3
    assert (a.image_latents - b.image_latents).abs().max() > 1e-3


@pytest.mark.usefixtures("small_edit_areas")
def test_a_batch_of_prompts_each_with_its_image_equals_one_call_per_prompt(tiny_model_dir):
    """The Plus pipeline takes one prompt per call; flowalign batches rows, each with its own image."""
    model = load(tiny_model_dir, "qwen-image-edit-plus")
    images = [edit_image(0), edit_image(1)]
    prompts = [PROMPT, "turn the square blue"]
    noise = torch.randn(2, 16, 4, 4, generator=torch.Generator().manual_seed(3))
    kwargs = dict(num_inference_steps=2, height=32, width=32)
    ours = FlowPipeline(model)(prompts, image=images, latents=noise, guidance_scale=4.0, **kwargs)
    for i in range(2):
        theirs = model.pipe(
            image=images[i],
            prompt=prompts[i],
            negative_prompt=" ",
            true_cfg_scale=4.0,
            latents=pack_2x2(noise[i : i + 1]),
            output_type="pt",
            **kwargs,
        ).images
        assert (ours.media[i : i + 1] - theirs).abs().max() <= TOL


@pytest.mark.usefixtures("small_edit_areas")
def test_bad_conditions_are_refused_with_one_clear_error(tiny_model_dir):
    model = load(tiny_model_dir, "qwen-image-edit-plus")
    with pytest.raises(ValueError, match="edits an image"):
        model.encode_prompt([PROMPT])
    with pytest.raises(ValueError, match="pass image="):
        FlowPipeline(model)([PROMPT], num_inference_steps=1, height=32, width=32)
    with pytest.raises(
        ValueError, match=r"condition images 0 \(32x48\) and 1 \(48x32\) have different aspect"
    ):
        model.encode_prompt([PROMPT, PROMPT], images=[edit_image(0), edit_image(1, 32, 48)])
    model.max_sequence_length = 30  # "x" with its image: 22 tokens
    with pytest.raises(ValueError, match="prompt 1 with its condition image is .* tokens, more than"):
        model.encode_prompt(["x", PROMPT * 3], images=[edit_image(0)] * 2)


@pytest.mark.usefixtures("small_edit_areas")
@pytest.mark.parametrize("family", ["qwen-image-edit-plus", "qwen-image-edit"])
def test_bf16_generation_runs(tiny_model_dir, family):
    model = load(tiny_model_dir, family, torch_dtype=torch.bfloat16)
    assert model.dtype == torch.bfloat16 and model.pipe.text_encoder.dtype == torch.bfloat16
    out = FlowPipeline(model)(
        [PROMPT, "turn the square blue"],
        image=edit_image(2),
        num_inference_steps=2,
        height=32,
        width=32,
        guidance_scale=4.0,
        generator=torch.Generator().manual_seed(1),
    )
    assert out.latents.dtype == torch.float32 and torch.isfinite(out.latents).all()
    assert out.media.shape == (2, 3, 32, 32) and torch.isfinite(out.media).all()


@pytest.mark.slow
@pytest.mark.parametrize("family", ["qwen-image-edit-plus", "qwen-image-edit"])
def test_sampler_matches_the_edit_pipeline_at_the_released_image_areas(tiny_model_dir, family):
    """The released areas: the VAE sees the condition at ~1024 x 1024 (64 x 64 condition tokens), the
    VL encoder at 384 x 384 (Plus) or at the VAE size (first release)."""
    model = load(tiny_model_dir, family)
    model.max_sequence_length = 1536
    ref_latents, ref_media, ours = run_both(model, edit_image(), guidance=4.0, steps=2, height=32, width=32)
    check(ref_latents, ref_media, ours)
