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


# ---------------------------------------------------------------------- LTX-2 (video stream)
LTX_SIZE = dict(height=64, width=64, num_frames=9)
# diffusers' defaults besides the audio stream's coupling: its extra guidance terms (STG, modality
# guidance, x0 rescale), which flowalign does not reproduce, are switched off.
LTX_PLAIN_CFG = dict(
    stg_scale=0.0,
    audio_stg_scale=0.0,
    modality_scale=1.0,
    audio_modality_scale=1.0,
    guidance_rescale=0.0,
    audio_guidance_rescale=0.0,
)


@pytest.fixture(scope="module")
def ltx(tiny_model_dir):
    model = load_flow_model(tiny_model_dir("ltx2"))
    model.max_sequence_length = 16
    return model


def isolated(transformer):
    """Make ``transformer`` run with modality isolation (video reads no audio), as flowalign runs it."""
    forward = transformer.forward

    def run(*args, **kwargs):
        kwargs["isolate_modalities"] = True
        return forward(*args, **kwargs)

    return run


def _ltx_reference(model, monkeypatch, *, guidance, output_type):
    monkeypatch.setattr(model.pipe.transformer, "forward", isolated(model.pipe.transformer))
    out = model.pipe(
        PROMPTS,
        generator=torch.Generator().manual_seed(7),
        num_inference_steps=3,
        guidance_scale=guidance,
        audio_guidance_scale=guidance,
        max_sequence_length=model.max_sequence_length,
        output_type=output_type,
        **LTX_PLAIN_CFG,
        **LTX_SIZE,
    )
    monkeypatch.undo()
    return out.frames


@pytest.mark.parametrize("guidance", [1.0, 3.0])
def test_ltx2_matches_diffusers_with_isolated_audio(ltx, monkeypatch, guidance):
    ref_latents = _ltx_reference(ltx, monkeypatch, guidance=guidance, output_type="latent")
    ref_media = _ltx_reference(ltx, monkeypatch, guidance=guidance, output_type="pt")
    ours = FlowPipeline(ltx)(
        PROMPTS,
        generator=torch.Generator().manual_seed(7),
        num_inference_steps=3,
        guidance_scale=guidance,
        **LTX_SIZE,
    )
    # output_type="latent" returns denormalised VAE latents; ours are normalised
    mean, std, scale = ltx._stats(ours.latents)
    assert ours.latents.shape == ref_latents.shape == (2, 16, 2, 2, 2)
    assert (ours.latents * std / scale + mean - ref_latents).abs().max() <= TOL
    assert ours.media.shape == ref_media.shape == (2, 9, 3, 64, 64)
    assert (ours.media - ref_media).abs().max() <= TOL


def test_ltx2_isolated_video_reads_no_audio(ltx):
    """With isolation the video prediction ignores the audio tokens; without it, it reads them."""
    x = torch.randn(ltx.latent_shape(1, **LTX_SIZE), generator=torch.Generator().manual_seed(1))
    cond, _ = ltx.encode_prompt(PROMPTS[:1])
    tokens = ltx._pack(x)
    config = ltx.transformer.config
    outs = {}
    for isolate in (True, False):
        for seed in (0, 1):
            audio = torch.randn(1, 3, config.audio_in_channels, generator=torch.Generator().manual_seed(seed))
            with torch.no_grad():
                outs[isolate, seed] = ltx.transformer(
                    hidden_states=tokens,
                    audio_hidden_states=audio,
                    encoder_hidden_states=cond.embeds,
                    audio_encoder_hidden_states=cond.embeds,
                    timestep=torch.tensor([500.0]),
                    sigma=torch.tensor([500.0]),
                    encoder_attention_mask=cond.mask,
                    num_frames=2,
                    height=2,
                    width=2,
                    audio_num_frames=3,
                    isolate_modalities=isolate,
                    use_cross_timestep=True,
                    return_dict=False,
                )[0]
    assert torch.equal(outs[True, 0], outs[True, 1])
    assert (outs[False, 0] - outs[False, 1]).abs().max() > 1e-3


def ltx_mu(model, *, tokens):
    from diffusers.pipelines.ltx2.pipeline_ltx2 import calculate_shift

    cfg = model.pipe.scheduler.config
    return calculate_shift(
        tokens, cfg.base_image_seq_len, cfg.max_image_seq_len, cfg.base_shift, cfg.max_shift
    )


def test_ltx2_time_grid_is_the_pipelines(ltx):
    import numpy as np

    scheduler = ltx.pipe.scheduler
    ts = ltx.time_grid(5, **LTX_SIZE)
    scheduler.set_timesteps(sigmas=np.linspace(1.0, 1 / 5, 5), mu=ltx_mu(ltx, tokens=8))
    assert torch.equal(ts, scheduler.sigmas.to(torch.float32))
    assert ts[-2] == pytest.approx(scheduler.config.shift_terminal)  # the terminal stretch applies


def test_ltx2_refuses_audio_options():
    from flowalign.models.ltx2 import refuse_audio_options

    refuse_audio_options({"guidance_scale": 3.0})
    with pytest.raises(ValueError, match="audio_guidance_scale is an audio option"):
        refuse_audio_options({"audio_guidance_scale": 7.0})


def test_ltx2_bf16_runs(tiny_model_dir):
    model = load_flow_model(tiny_model_dir("ltx2"), torch_dtype=torch.bfloat16)
    model.max_sequence_length = 16
    out = FlowPipeline(model)(
        PROMPTS[:1], generator=torch.Generator().manual_seed(0), num_inference_steps=2, **LTX_SIZE
    )
    assert out.latents.dtype == torch.float32 and torch.isfinite(out.latents).all()
    assert out.media.shape == (1, 9, 3, 64, 64) and torch.isfinite(out.media).all()


@pytest.mark.parametrize(
    ("family", "size", "bad_frames"),
    [("hunyuan", dict(height=32, width=32, num_frames=5), 6), ("ltx", LTX_SIZE, 5)],
)
def test_sizes_and_media_round_trip(request, family, size, bad_frames):
    model = request.getfixturevalue(family)
    with pytest.raises(ValueError, match="height"):
        model.check_size(size["height"] - 8, size["width"], size["num_frames"])
    with pytest.raises(ValueError, match="num_frames"):
        model.check_size(size["height"], size["width"], bad_frames)
    media = torch.rand(
        2, size["num_frames"], 3, size["height"], size["width"], generator=torch.Generator().manual_seed(0)
    )
    with torch.no_grad():
        z = model.encode_media(media)
        assert z.shape == model.latent_shape(2, **size)
        out = model.decode_latents(z)
        # batched = one at a time (HunyuanVideo 1.5 runs its VAE per video; LTX-2's is batched)
        torch.testing.assert_close(model.encode_media(media[1:]), z[1:], rtol=0, atol=1e-5)
    assert out.shape == media.shape and out.min() >= 0 and out.max() <= 1
