"""CDT tokenizer: shapes, causality, chunked == single pass, 1-step DDIM, save/load, bad inputs."""

from __future__ import annotations

import json

import pytest
import torch
from cdt_testing import make_model, tiny_config, video

from flowalign.tokenizers.cdt import (
    CDTConfig,
    ConditionedDiffusionTokenizer,
    VideoShapeError,
    cosine_alphas_cumprod,
    ddim_step,
    ddim_timesteps,
    decode_video,
    default_chunk_sizes,
    encode_video,
    initial_noise,
)
from flowalign.tokenizers.layers import FeatureCache, TimeDownsample, TimeUpsample

# Chunked and single-pass runs convolve differently shaped tensors, so float32 sums reassociate.
TOL = dict(rtol=1e-4, atol=1e-4)


def _noise(x: torch.Tensor, seed: int = 0) -> torch.Tensor:
    b, _, t, h, w = x.shape
    return initial_noise(b, t, h, w, generator=torch.Generator().manual_seed(seed))


@pytest.fixture(params=["small", "base"])
def any_model(request, model, base_layout_model):
    return model if request.param == "small" else base_layout_model


# ---------------------------------------------------------------------------------------- shapes


@pytest.mark.parametrize("frames", [1, 5, 13])
def test_shapes_round_trip(any_model, frames):
    x = video(2, frames, 16, 24)
    with torch.no_grad():
        post = any_model.encode(x)
        rec = any_model.decode(post.mean, generator=torch.Generator().manual_seed(0))
    assert post.mean.shape == (2, 4, 1 + (frames - 1) // 4, 2, 3) == any_model.latent_shape(tuple(x.shape))
    assert post.logvar.shape == post.mean.shape
    assert rec.shape == x.shape
    assert torch.isfinite(rec).all()


def test_default_presets_compress_8x_space_4x_time():
    for cfg in (CDTConfig.base(), CDTConfig.small(), CDTConfig.toy()):
        with torch.device("meta"):
            m = ConditionedDiffusionTokenizer.from_cdt_config(cfg)
        assert (m.space_factor, m.time_factor) == (8, 4)
        assert m.latent_shape((1, 3, 17, 256, 256)) == (1, cfg.latent_channels, 5, 32, 32)
    assert CDTConfig.base().latent_channels == CDTConfig.small().latent_channels == 16


def test_images_are_one_frame_videos(model):
    images = (video(2, 1, 16, 16)[:, :, 0] + 1) / 2  # [B, 3, H, W] in [0, 1]
    with torch.no_grad():
        z_img = encode_video(model, images)
        z_vid = encode_video(model, images[:, None])
        rec = decode_video(model, z_img, generator=torch.Generator().manual_seed(0))
    assert z_img.shape == (2, 4, 1, 2, 2)
    torch.testing.assert_close(z_img, z_vid, rtol=0, atol=0)
    assert rec.shape == (2, 1, 3, 16, 16) and rec.min() >= 0 and rec.max() <= 1


def test_time_layers_initialise_to_average_and_repeat():
    frames = torch.arange(9.0).view(1, 1, 9, 1, 1).repeat(1, 2, 1, 1, 1)  # frame f holds f
    down = TimeDownsample(2)(frames)  # out j = mean(frames 2j - 1, 2j), frame 0 alone (zero pad)
    assert down[0, 0, :, 0, 0].tolist() == [0.0, 1.5, 3.5, 5.5, 7.5]
    up = TimeUpsample(2)(down)  # each frame twice, the first copy of frame 0 dropped: 1 + 2m frames
    assert up[0, 1, :, 0, 0].tolist() == [0.0, 1.5, 1.5, 3.5, 3.5, 5.5, 5.5, 7.5, 7.5]


# ---------------------------------------------------------------------------------------- causality


def test_encoder_is_causal_per_latent_group(any_model):
    x = video(1, 13, 16, 16)
    y = x.clone()
    y[:, :, 5:] = -y[:, :, 5:]  # change every frame after i = 4
    with torch.no_grad():
        zx, zy = any_model.encode(x).mean, any_model.encode(y).mean
    # latent 0 covers frame 0 and latent 1 frames 1-4: both unchanged; latent 2 (frames 5-8) changes
    torch.testing.assert_close(zx[:, :, :2], zy[:, :, :2], rtol=0, atol=0)
    assert (zx[:, :, 2] - zy[:, :, 2]).abs().max() > 1e-3


def test_reconstruction_is_causal_per_latent_group(any_model):
    x = video(1, 13, 16, 16)
    y = x.clone()
    y[:, :, 5:] = torch.flip(y[:, :, 5:], dims=[-1])
    noise = _noise(x)
    with torch.no_grad():
        rx = any_model.decode(any_model.encode(x).mean, noise=noise, num_inference_steps=2)
        ry = any_model.decode(any_model.encode(y).mean, noise=noise, num_inference_steps=2)
    torch.testing.assert_close(rx[:, :, :5], ry[:, :, :5], rtol=0, atol=0)
    assert (rx[:, :, 5:] - ry[:, :, 5:]).abs().max() > 1e-3


def test_decoded_frames_ignore_later_noise_and_latents(model):
    z = torch.randn(1, 4, 4, 2, 2, generator=torch.Generator().manual_seed(3))
    z2 = z.clone()
    z2[:, :, 2:] += 1.0
    noise = _noise(torch.zeros(1, 3, 13, 16, 16))
    noise2 = noise.clone()
    noise2[:, :, 5:] = torch.randn(noise2[:, :, 5:].shape, generator=torch.Generator().manual_seed(9))
    with torch.no_grad():
        a = model.decode(z, noise=noise)
        b = model.decode(z2, noise=noise2)
    torch.testing.assert_close(a[:, :, :5], b[:, :, :5], rtol=0, atol=0)
    assert (a[:, :, 5:] - b[:, :, 5:]).abs().max() > 1e-3


# ---------------------------------------------------------------------------------------- chunking


@pytest.mark.parametrize("chunk_frames", [4, 8, 12])
def test_chunked_encode_equals_single_pass(any_model, chunk_frames):
    x = video(2, 13, 16, 16)
    with torch.no_grad():
        full = any_model.encode(x)
        chunked = any_model.encode(x, chunk_frames=chunk_frames)
    torch.testing.assert_close(chunked.mean, full.mean, **TOL)
    torch.testing.assert_close(chunked.logvar, full.logvar, **TOL)


@pytest.mark.parametrize(("chunk_latents", "steps"), [(1, 1), (2, 1), (1, 3)])
def test_chunked_decode_equals_single_pass(any_model, chunk_latents, steps):
    z = torch.randn(2, 4, 4, 2, 2, generator=torch.Generator().manual_seed(1))
    noise = _noise(torch.zeros(2, 3, 13, 16, 16))
    with torch.no_grad():
        full = any_model.decode(z, noise=noise, num_inference_steps=steps)
        chunked = any_model.decode(z, noise=noise, num_inference_steps=steps, chunk_latents=chunk_latents)
    # each DDIM step feeds the rounding differences of the last one through the denoiser again
    torch.testing.assert_close(chunked, full, rtol=1e-4, atol=1e-4 * steps * 2)
    assert full.abs().mean() > 0.05  # not a trivially small output


def test_generator_noise_does_not_depend_on_chunking(model):
    z = torch.randn(1, 4, 3, 2, 2, generator=torch.Generator().manual_seed(2))
    with torch.no_grad():
        a = model.decode(z, generator=torch.Generator().manual_seed(5))
        b = model.decode(z, generator=torch.Generator().manual_seed(5), chunk_latents=1)
        c = model.decode(z, generator=torch.Generator().manual_seed(6))
    torch.testing.assert_close(a, b, **TOL)
    assert (a - c).abs().max() > 1e-3


def test_cache_memory_is_bounded_in_video_length(model):
    sizes = []
    for frames in (9, 33):
        cache = FeatureCache()
        x = video(1, frames, 16, 16)
        with torch.no_grad():
            for a in [0, *range(1, frames, 4)]:
                model.encoder(x[:, :, a : a + (1 if a == 0 else 4)], cache)
        sizes.append(cache.num_bytes())
    assert sizes[0] == sizes[1] > 0


def test_bad_chunk_sizes_are_refused(model):
    with pytest.raises(ValueError, match="multiple of 4"):
        model.encode(video(1, 9), chunk_frames=6)
    with pytest.raises(ValueError, match="chunk_latents"):
        model.decode(torch.zeros(1, 4, 3, 2, 2), chunk_latents=0)


def test_default_chunk_sizes_follow_area():
    assert default_chunk_sizes(1024, 1024) == (4, 1)
    assert default_chunk_sizes(512, 512) == (16, 4)
    assert default_chunk_sizes(2048, 2048) == (4, 1)


# ---------------------------------------------------------------------------------------- sampling


def test_one_ddim_step_equals_raw_x0_prediction(any_model):
    z = torch.randn(2, 4, 3, 2, 2, generator=torch.Generator().manual_seed(4))
    eps = _noise(torch.zeros(2, 3, 9, 16, 16))
    cfg = any_model.config
    with torch.no_grad():
        rec = any_model.decode(z, noise=eps, num_inference_steps=1)
        t = torch.full((2,), (cfg.num_train_timesteps - 1) / cfg.num_train_timesteps)
        raw = any_model.predict_x0(cfg.sample_gamma * eps, t, any_model.condition(z))
    torch.testing.assert_close(rec, raw, rtol=0, atol=0)


def test_multi_step_ddim_is_deterministic_given_noise(model):
    z = torch.randn(1, 4, 2, 2, 2, generator=torch.Generator().manual_seed(4))
    eps = _noise(torch.zeros(1, 3, 5, 16, 16))
    with torch.no_grad():
        a = model.decode(z, noise=eps, num_inference_steps=4)
        b = model.decode(z, noise=eps, num_inference_steps=4)
        one = model.decode(z, noise=eps, num_inference_steps=1)
    torch.testing.assert_close(a, b, rtol=0, atol=0)
    assert (a - one).abs().max() > 1e-3


def test_ddim_step_and_timesteps():
    x_t, x0 = torch.randn(3, 4), torch.randn(3, 4)
    torch.testing.assert_close(ddim_step(x_t, x0, 0.3, 1.0), x0, rtol=0, atol=0)
    # eps_hat is preserved: stepping to abar_prev re-noises x0 with the same implied noise
    eps = torch.randn(3, 4)
    x_t = 0.5**0.5 * x0 + 0.5**0.5 * eps
    torch.testing.assert_close(ddim_step(x_t, x0, 0.5, 0.9), 0.9**0.5 * x0 + 0.1**0.5 * eps)
    assert ddim_timesteps(8192, 1).tolist() == [8191]
    steps = ddim_timesteps(1000, 5)
    assert steps[0] == 0 and steps[-1] == 999 and (steps.diff() > 0).all()
    with pytest.raises(ValueError):
        ddim_timesteps(1000, 0)


def test_cosine_schedule():
    abar = cosine_alphas_cumprod(8192)
    betas = 1 - abar[1:] / abar[:-1]
    assert abar.shape == (8192,) and (abar.diff() < 0).all()
    assert 0.9999 < abar[0] < 1 and abar[-1] < 1e-6 and betas.max() <= 0.999 + 1e-12
    # abar(u) ~ cos^2(pi/2 (u + s)/(1 + s)) / cos^2(pi/2 s/(1 + s)) away from the clipped end
    u = torch.tensor(0.5, dtype=torch.float64)
    f = lambda v: torch.cos((v + 0.008) / 1.008 * torch.pi / 2) ** 2  # noqa: E731
    torch.testing.assert_close(
        abar[4095], f(u) / f(torch.tensor(0.0, dtype=torch.float64)), rtol=1e-3, atol=0
    )


# ---------------------------------------------------------------------------------------- baseline, training pass


def test_vae_decoder_is_deterministic_and_same_size(model):
    vae = make_model("small", decoder_type="vae")
    n_cdt = sum(p.numel() for p in model.parameters())
    n_vae = sum(p.numel() for p in vae.parameters())
    assert abs(n_cdt - n_vae) / n_cdt < 0.1
    z = torch.randn(1, 4, 2, 2, 2, generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        a = vae.decode(z, generator=torch.Generator().manual_seed(0))
        b = vae.decode(z, generator=torch.Generator().manual_seed(1))
        c = vae.decode(z, chunk_latents=1)
    torch.testing.assert_close(a, b, rtol=0, atol=0)
    torch.testing.assert_close(a, c, **TOL)


def test_training_forward_reaches_every_parameter(model):
    m = make_model("small", seed=3).train()
    x = video(2, 5, 16, 16)
    out = m(
        x,
        timesteps=torch.tensor([10, 900]),
        noise=torch.randn_like(x),
        latent_noise=torch.randn(m.latent_shape(tuple(x.shape))),
    )
    ((out.x0_pred - x) ** 2).mean().backward()
    missing = [n for n, p in m.named_parameters() if p.grad is None or p.grad.abs().max() == 0]
    assert not missing
    assert out.x0_pred.shape == x.shape and out.mean.shape == (2, 4, 2, 2, 2)


def test_training_forward_noise_level_matters(model):
    x = video(1, 5, 16, 16)
    noise = torch.randn_like(x)
    with torch.no_grad():
        low = model(x, timesteps=torch.tensor([0]), noise=noise).x0_pred
        high = model(x, timesteps=torch.tensor([999]), noise=noise).x0_pred
    assert (low - high).abs().max() > 1e-3
    with pytest.raises(ValueError, match="timesteps and noise"):
        model(x)


# ---------------------------------------------------------------------------------------- save / load


def test_save_and_load_give_identical_outputs(model, tmp_path):
    model.save_pretrained(tmp_path / "cdt")
    assert {p.name for p in (tmp_path / "cdt").iterdir()} >= {
        "config.json",
        "diffusion_pytorch_model.safetensors",
    }
    loaded = ConditionedDiffusionTokenizer.from_pretrained(tmp_path / "cdt").eval()
    assert loaded.cdt_config == model.cdt_config == tiny_config("small")
    assert json.loads((tmp_path / "cdt" / "config.json").read_text())["decoder_type"] == "diffusion"
    saved, restored = model.state_dict(), loaded.state_dict()
    assert saved.keys() == restored.keys() and all(torch.equal(saved[k], restored[k]) for k in saved)
    x = video(1, 9, 16, 16)
    noise = _noise(x)
    with torch.no_grad():
        z = model.encode(x).mean
        # bitwise-equal weights; memory-mapped tensors can take differently vectorised CPU kernels,
        # which reorders float32 sums (~1e-6)
        torch.testing.assert_close(loaded.encode(x).mean, z, rtol=1e-5, atol=1e-5)
        torch.testing.assert_close(
            loaded.decode(z, noise=noise), model.decode(z, noise=noise), rtol=1e-5, atol=1e-5
        )


def test_config_dataclass_matches_model_signature():
    import dataclasses
    import inspect

    params = inspect.signature(ConditionedDiffusionTokenizer.__init__).parameters
    fields = {f.name: f.default for f in dataclasses.fields(CDTConfig)}
    assert set(fields) == set(params) - {"self"}
    assert all(params[k].default == v for k, v in fields.items())


# ---------------------------------------------------------------------------------------- bad input


@pytest.mark.parametrize("frames", [2, 3, 4, 6, 8])
def test_wrong_frame_counts_are_refused(model, frames):
    with pytest.raises(VideoShapeError, match=rf"{frames} frames.*1 \+ 4k"):
        model.encode(video(1, frames, 16, 16))


@pytest.mark.parametrize(("h", "w"), [(20, 16), (16, 12), (4, 16)])
def test_sizes_not_divisible_by_8_are_refused(model, h, w):
    with pytest.raises(VideoShapeError, match="multiples of 8"):
        model.encode(torch.zeros(1, 3, 5, h, w))


def test_other_bad_shapes_are_refused(model):
    with pytest.raises(VideoShapeError, match="channels second"):
        model.encode(torch.zeros(1, 5, 3, 16, 16))
    with pytest.raises(VideoShapeError, match="channels second"):
        model.encode(torch.zeros(3, 5, 16, 16))
    with pytest.raises(VideoShapeError, match="latent must be"):
        model.decode(torch.zeros(1, 7, 2, 2, 2))
    with pytest.raises(VideoShapeError, match="noise must be"):
        model.decode(torch.zeros(1, 4, 2, 2, 2), noise=torch.zeros(1, 3, 4, 16, 16))
    with pytest.raises(VideoShapeError, match="media must be"):
        encode_video(model, torch.zeros(1, 5, 16, 16))


def test_bad_configs_are_refused():
    with pytest.raises(ValueError, match="space_down"):
        CDTConfig(space_down=(True, True))
    with pytest.raises(ValueError, match="decoder_type"):
        CDTConfig(decoder_type="gan")
    with pytest.raises(ValueError, match="unet_channels"):
        CDTConfig(unet_channels=(8, 8))


# ---------------------------------------------------------------------------------------- precision, memory


def test_gradient_checkpointing_gives_the_same_gradients():
    x = video(1, 5, 16, 16)
    kwargs = dict(timesteps=torch.tensor([500]), noise=torch.randn_like(x))
    grads = []
    for checkpointing in (False, True):
        m = make_model("small", seed=5).train()
        if checkpointing:
            m.enable_gradient_checkpointing()
        ((m(x, **kwargs).x0_pred - x) ** 2).mean().backward()
        grads.append({n: p.grad.clone() for n, p in m.named_parameters()})
    assert all(torch.allclose(grads[0][n], grads[1][n], rtol=1e-5, atol=1e-7) for n in grads[0])


def test_bfloat16_weights_run_and_stay_close_to_float32(model):
    low = make_model("small").to(torch.bfloat16)
    x = video(1, 5, 16, 16)
    noise = _noise(x)
    with torch.no_grad():
        z = model.encode(x).mean
        z_low = low.encode(x.bfloat16()).mean
        rec, rec_low = model.decode(z, noise=noise), low.decode(z, noise=noise)
    assert z_low.dtype == torch.float32 and rec_low.dtype == torch.float32  # moments and DDIM math in fp32
    # bf16 keeps ~3 digits; through ~40 random layers the mean error grows to ~10 %
    assert (z_low - z).abs().mean() < 0.05 * z.abs().mean()
    assert (rec_low - rec).abs().mean() < 0.25 * rec.abs().mean()
