"""Flow-NRG guidance transforms (docs/algorithms.md 1D tests): no-op cases, the sign and size of the term, errors."""

from __future__ import annotations

import pytest
import torch
from nrg_helpers import IMAGE_PROMPTS

from flowalign.flow import expand_t
from flowalign.pipelines import FlowPipeline
from flowalign.rewards.latent import LatentRewardLoadError, LatentRewardModel
from flowalign.sampling import sample_euler, sample_heun, uniform_time_grid
from flowalign.sampling.nrg import (
    guidance_factor,
    latent_reward_fn,
    latent_reward_guidance,
    pixel_reward_guidance,
    reward_gradient,
    reward_guidance,
)


def gaussian_velocity(m: float, s: float):
    """Exact marginal velocity when data ~ N(m, s^2 I) (as in tests/unit/test_sampling.py)."""

    def v_fn(x, t):
        t = expand_t(t, x)
        var = (1 - t) ** 2 * s**2 + t**2
        return (t - (1 - t) * s**2) / var * (x - (1 - t) * m) - m

    return v_fn


@pytest.fixture(scope="module")
def guide(toy_image):
    return LatentRewardModel.from_flow_model(toy_image, dimensions=("vq", "ta"), num_blocks=1, head_hidden=16)


def test_factor_is_zero_at_data_exact_in_between_and_clamped_near_noise():
    t = torch.tensor([0.0, 0.25, 0.5, 0.9, 0.98, 0.99, 1.0])
    f = guidance_factor(t, t_max=0.98)
    assert f[0] == 0
    torch.testing.assert_close(f[1:4], t[1:4] / (1 - t[1:4]))
    assert f[4] == f[5] == f[6] == pytest.approx(49.0, rel=1e-5)
    assert (f[1:] >= f[:-1]).all()
    assert torch.isfinite(guidance_factor(torch.ones(3), t_max=0.999)).all()


def test_strength_zero_returns_the_input_function_and_the_sampler_bit_for_bit():
    v_fn = gaussian_velocity(1.0, 0.5)
    reward = lambda x, t: x.sum(dim=1)  # noqa: E731
    assert reward_guidance(reward, strength=0.0)(v_fn) is v_fn
    noise = torch.randn(16, 3, generator=torch.Generator().manual_seed(0))
    ts = uniform_time_grid(10)
    guided = sample_euler(reward_guidance(reward, strength=0.0)(v_fn), noise, ts)
    assert torch.equal(guided, sample_euler(v_fn, noise, ts))


@pytest.mark.parametrize("strength, weights", [(0.0, {"ta": 1.0}), (2.0, {"vq": 0.0, "ta": 0.0}), (2.0, {})])
def test_no_op_latent_guidance_reproduces_the_pipeline_bit_for_bit(toy_image, guide, strength, weights):
    kwargs = dict(num_inference_steps=3, guidance_scale=2.0, height=24, width=24, output_type="latent")
    plain = FlowPipeline(toy_image)(
        IMAGE_PROMPTS, generator=torch.Generator().manual_seed(3), **kwargs
    ).latents
    nrg = latent_reward_guidance(toy_image, guide, IMAGE_PROMPTS, weights, strength=strength)
    out = FlowPipeline(toy_image)(
        IMAGE_PROMPTS, generator=torch.Generator().manual_seed(3), velocity_transforms=[nrg], **kwargs
    ).latents
    assert torch.equal(out, plain)


def test_guided_pipeline_differs_and_raises_the_latent_reward_at_the_last_step(toy_image, guide):
    """Guidance on: samples change, and the guided final latent scores higher under the guide at small t."""
    kwargs = dict(num_inference_steps=4, guidance_scale=1.0, height=24, width=24, output_type="latent")
    plain = FlowPipeline(toy_image)(
        IMAGE_PROMPTS, generator=torch.Generator().manual_seed(1), **kwargs
    ).latents
    nrg = latent_reward_guidance(toy_image, guide, IMAGE_PROMPTS, {"ta": 1.0}, strength=0.5)
    guided = FlowPipeline(toy_image)(
        IMAGE_PROMPTS, generator=torch.Generator().manual_seed(1), velocity_transforms=[nrg], **kwargs
    ).latents
    assert not torch.equal(guided, plain)
    cond, _ = toy_image.encode_prompt(IMAGE_PROMPTS)
    with torch.no_grad():
        t = torch.full((2,), 0.05)
        assert (guide(guided, t, cond)["ta"] > guide(plain, t, cond)["ta"]).all()


def test_guidance_term_matches_finite_differences_of_the_latent_reward(toy_image, guide):
    guide64 = LatentRewardModel.from_flow_model(
        toy_image, dimensions=("vq", "ta"), num_blocks=1, head_hidden=16
    )
    guide64 = guide64.double().eval()
    cond, _ = toy_image.encode_prompt(IMAGE_PROMPTS)
    cond = cond.to(dtype=torch.float64)
    weights = {"vq": 0.7, "ta": -1.3}
    guide64.set_normalisation({"vq": (0.1, 2.0), "ta": (-0.2, 0.5)})
    reward = latent_reward_fn(guide64, cond, weights)
    g = torch.Generator().manual_seed(0)
    x = torch.randn(2, 3, 24, 24, generator=g, dtype=torch.float64)
    t = torch.tensor([0.3, 0.7], dtype=torch.float64)
    base = torch.randn(2, 3, 24, 24, generator=g, dtype=torch.float64)
    w = 0.8
    guided = reward_guidance(reward, strength=w)(lambda x_, t_: base)(x, t)
    term = (guided - base).double()  # = -w t/(1-t) grad r
    grad = -term / (w * (t / (1 - t))).view(2, 1, 1, 1)
    for _ in range(3):
        d = torch.randn(x.shape, generator=g, dtype=torch.float64)
        eps = 1e-5
        with torch.no_grad():
            fd = (reward(x + eps * d, t) - reward(x - eps * d, t)) / (2 * eps)  # [B] directional derivatives
        torch.testing.assert_close((grad * d).sum(dim=(1, 2, 3)), fd, rtol=1e-4, atol=1e-6)
    assert grad.abs().sum() > 0


def test_linear_reward_moves_the_gaussian_terminal_mean_along_a():
    """r(x) = a^T x on N(m, s^2 I) data: the guided ODE's endpoint shifts along +a, more with more strength."""
    m, s = 0.5, 0.7
    a = torch.tensor([1.0, -2.0, 0.5], dtype=torch.float64)
    v_fn = gaussian_velocity(m, s)
    noise = torch.randn(512, 3, generator=torch.Generator().manual_seed(0), dtype=torch.float64)
    ts = torch.linspace(1, 0, 201, dtype=torch.float64)
    plain = sample_euler(v_fn, noise, ts)
    shifts = []
    for w in (0.05, 0.1):
        guided = sample_euler(reward_guidance(lambda x, t: x @ a, strength=w)(v_fn), noise, ts)
        shift = (guided - plain).mean(dim=0)
        cosine = torch.dot(shift, a) / (shift.norm() * a.norm())
        assert cosine > 0.9999
        shifts.append(torch.dot(shift, a).item())
        assert (guided @ a).mean() > (plain @ a).mean()
    assert shifts[1] > 1.5 * shifts[0] > 0
    heun = sample_heun(reward_guidance(lambda x, t: x @ a, strength=0.1)(v_fn), noise, ts[::4])
    assert torch.dot((heun - plain).mean(dim=0), a) > 0  # every sampler gets the same sign


def test_step_range_guides_only_inside_it():
    base = lambda x, t: torch.zeros_like(x)  # noqa: E731
    v = reward_guidance(lambda x, t: x.sum(dim=1), strength=1.0, step_range=(0.2, 0.6))(base)
    x = torch.randn(3, 4)
    assert torch.equal(v(x, torch.full((3,), 0.8)), torch.zeros(3, 4))
    assert torch.equal(v(x, torch.full((3,), 0.1)), torch.zeros(3, 4))
    inside = v(x, torch.full((3,), 0.5))
    torch.testing.assert_close(inside, torch.full((3, 4), -1.0))  # -w t/(1-t) * 1 at t = 0.5
    mixed = v(x, torch.tensor([0.5, 0.9, 0.2]))
    torch.testing.assert_close(mixed[:, 0], torch.tensor([-1.0, 0.0, -0.25]))


def test_gradient_is_fp32_and_taken_even_under_no_grad():
    x = torch.randn(2, 5, dtype=torch.bfloat16)
    with torch.no_grad():
        g = reward_gradient(lambda x_, t_: (x_**2).sum(dim=1), x, torch.zeros(2))
    assert g.dtype == torch.float32
    torch.testing.assert_close(g, 2 * x.float())
    v = reward_guidance(lambda x_, t_: x_.sum(dim=1), strength=1.0)(lambda x_, t_: torch.zeros_like(x_))
    with torch.no_grad():
        assert v(x, torch.full((2,), 0.5)).dtype == torch.bfloat16


def test_pixel_guidance_uses_the_wrapped_velocity_for_the_one_step_estimate(toy_image, brightness):
    """Constant base velocity c: x0_hat = x - t c, toy decode (x + 1) / 2, r = mean brightness -> known gradient."""
    c = torch.full((2, 3, 24, 24), 0.1)
    nrg = pixel_reward_guidance(toy_image, brightness, {"vq": 1.0}, IMAGE_PROMPTS, strength=0.5)
    x = 0.2 * torch.randn(2, 3, 24, 24, generator=torch.Generator().manual_seed(0))
    t = torch.full((2,), 0.5)
    out = nrg(lambda x_, t_: c)(x, t)
    d_r = 1 / (2 * 3 * 24 * 24)  # d mean((x0 + 1) / 2) / d x0, inside the clamp
    torch.testing.assert_close(out, c - 0.5 * 1.0 * d_r)
    full = pixel_reward_guidance(
        toy_image, brightness, {"vq": 1.0}, IMAGE_PROMPTS, strength=0.5, backprop_through_model=True
    )
    # d x0_hat / d x = I - t dv/dx = I for a constant velocity: the same term
    torch.testing.assert_close(full(lambda x_, t_: c + 0 * x_)(x, t), out)


def test_pixel_guidance_raises_a_pixel_reward_in_the_pipeline(toy_image, brightness):
    kwargs = dict(num_inference_steps=4, guidance_scale=1.0, height=24, width=24)
    plain = FlowPipeline(toy_image)(IMAGE_PROMPTS, generator=torch.Generator().manual_seed(2), **kwargs).media
    nrg = pixel_reward_guidance(toy_image, brightness, {"ta": 1.0}, IMAGE_PROMPTS, strength=5.0)
    guided = FlowPipeline(toy_image)(
        IMAGE_PROMPTS, generator=torch.Generator().manual_seed(2), velocity_transforms=[nrg], **kwargs
    ).media
    assert (brightness.score(guided)["ta"] > brightness.score(plain)["ta"]).all()


@pytest.mark.parametrize("strength", [-0.1, float("nan"), float("inf")])
def test_bad_strength_is_refused(strength, toy_image, guide, brightness):
    with pytest.raises(ValueError, match="strength"):
        reward_guidance(lambda x, t: x.sum(), strength=strength)
    with pytest.raises(ValueError, match="strength"):
        latent_reward_guidance(toy_image, guide, IMAGE_PROMPTS, {"ta": 1.0}, strength=strength)
    with pytest.raises(ValueError, match="strength"):
        pixel_reward_guidance(toy_image, brightness, {"ta": 1.0}, IMAGE_PROMPTS, strength=strength)


def test_bad_t_max_and_step_range_are_refused():
    with pytest.raises(ValueError, match="t_max"):
        reward_guidance(lambda x, t: x.sum(), strength=1.0, t_max=1.0)
    with pytest.raises(ValueError, match="step_range"):
        reward_guidance(lambda x, t: x.sum(), strength=1.0, step_range=(0.8, 0.2))


def test_unknown_dimension_is_named(toy_image, guide, brightness):
    with pytest.raises(ValueError, match=r"unknown dimension\(s\) \['mq'\].*\['vq', 'ta'\]"):
        latent_reward_guidance(toy_image, guide, IMAGE_PROMPTS, {"mq": 1.0}, strength=1.0)
    cond, _ = toy_image.encode_prompt(IMAGE_PROMPTS)
    with pytest.raises(ValueError, match="'aesthetic'"):
        latent_reward_fn(guide, cond, {"aesthetic": 0.5})
    with pytest.raises(ValueError, match="'mq'"):
        pixel_reward_guidance(toy_image, brightness, {"mq": 1.0}, IMAGE_PROMPTS, strength=1.0)
    with pytest.raises(ValueError, match="finite"):
        latent_reward_fn(guide, cond, {"ta": float("nan")})


def test_guide_of_another_model_is_refused(toy_video, guide):
    with pytest.raises(LatentRewardLoadError, match="SD3Transformer2DModel.*WanTransformer3DModel"):
        latent_reward_guidance(
            toy_video, guide, ["a small red circle in the center moving left"], {"ta": 1.0}, strength=1.0
        )


def test_prompt_rows_must_match_the_batch(toy_image, guide):
    reward = latent_reward_fn(guide, IMAGE_PROMPTS, {"ta": 1.0}, model=toy_image)
    with pytest.raises(ValueError, match="2 prompt rows for a batch of 3"):
        reward(torch.randn(3, 3, 24, 24), torch.full((3,), 0.5))
    nrg = latent_reward_guidance(
        toy_image, guide, IMAGE_PROMPTS, {"ta": 1.0}, strength=1.0, num_samples_per_prompt=2
    )
    v = nrg(lambda x, t: torch.zeros_like(x))(torch.randn(4, 3, 24, 24), torch.full((4,), 0.5))
    assert v.shape == (4, 3, 24, 24) and v.abs().sum() > 0
