"""The time convention, conversions, shifts and time densities (docs/algorithms.md 0.1, 5.2)."""

from __future__ import annotations

import math

import pytest
import torch

from flowalign import flow

G = torch.Generator().manual_seed(0)


def _batch(shape=(6, 4, 3, 3)):
    return torch.randn(shape, generator=G), torch.randn(shape, generator=G), torch.rand(shape[0], generator=G)


def test_true_velocity_recovers_x0_and_noise():
    x0, noise, t = _batch()
    x_t = flow.interpolate(x0, noise, t)
    v = flow.velocity_target(x0, noise)
    torch.testing.assert_close(flow.x0_from_velocity(x_t, v, t), x0, rtol=0, atol=1e-5)
    torch.testing.assert_close(flow.noise_from_velocity(x_t, v, t), noise, rtol=0, atol=1e-5)
    torch.testing.assert_close(flow.velocity_from_x0(x_t, x0, t), v, rtol=0, atol=1e-4)


def test_interpolate_endpoints():
    x0, noise, _ = _batch()
    torch.testing.assert_close(flow.interpolate(x0, noise, torch.zeros(6)), x0)
    torch.testing.assert_close(flow.interpolate(x0, noise, torch.ones(6)), noise)


def test_score_velocity_round_trip_and_gaussian_score():
    x0, noise, t = _batch()
    t = t.clamp(0.05, 0.95)
    x_t = flow.interpolate(x0, noise, t)
    v = flow.velocity_target(x0, noise)
    score = flow.score_from_velocity(x_t, v, t)
    # conditional score of N(x_t; (1-t) x0, t^2 I) is -noise / t
    torch.testing.assert_close(score, -noise / t.view(-1, 1, 1, 1), rtol=1e-4, atol=1e-4)
    torch.testing.assert_close(flow.velocity_from_score(x_t, score, t), v, rtol=1e-4, atol=1e-4)


def test_epsilon_error_equals_scaled_velocity_error():
    x0, noise, t = _batch()
    x_t = flow.interpolate(x0, noise, t)
    v_hat = torch.randn_like(x0)
    eps_hat = flow.noise_from_velocity(x_t, v_hat, t)
    lhs = (noise - eps_hat).pow(2).flatten(1).sum(1)
    rhs = (1 - t) ** 2 * (flow.velocity_target(x0, noise) - v_hat).pow(2).flatten(1).sum(1)
    torch.testing.assert_close(lhs, rhs, rtol=1e-4, atol=1e-4)


def test_timesteps_round_trip():
    t = torch.rand(100, generator=G)
    torch.testing.assert_close(flow.timesteps_to_t(flow.t_to_timesteps(t)), t)
    assert flow.t_to_timesteps(torch.tensor(1.0)) == 1000


@pytest.mark.parametrize("shift", [0.5, 1.0, 3.0, 7.0])
def test_shift_fixes_endpoints_and_is_monotone(shift):
    t = torch.linspace(0, 1, 1001, dtype=torch.float64)
    s = flow.shift_time(t, shift)
    assert s[0] == 0 and s[-1] == 1
    assert (s[1:] > s[:-1]).all()
    if shift == 1.0:
        torch.testing.assert_close(s, t)
    if shift > 1:
        assert (s[1:-1] > t[1:-1]).all()  # mass moves to high noise


def test_exponential_shift_equals_static_shift_with_exp_mu():
    t = torch.linspace(0, 1, 101, dtype=torch.float64)
    mu = 0.8
    torch.testing.assert_close(flow.shift_time_exponential(t, mu), flow.shift_time(t, math.exp(mu)))


def test_flux_mu_endpoints():
    assert flow.flux_mu(256) == pytest.approx(0.5)
    assert flow.flux_mu(4096) == pytest.approx(1.15)


def test_logit_normal_median_is_half_and_densities_in_range():
    for density in ("logit_normal", "uniform", "mode"):
        t = flow.sample_t(20000, density=density, generator=torch.Generator().manual_seed(1))
        assert t.min() >= 0 and t.max() <= 1
    t = flow.sample_t(20000, generator=torch.Generator().manual_seed(2))
    assert abs(t.median().item() - 0.5) < 0.02
    shifted = flow.sample_t(20000, shift=3.0, generator=torch.Generator().manual_seed(2))
    assert shifted.median() > 0.7


def test_unknown_density_is_named():
    with pytest.raises(ValueError, match="bogus"):
        flow.sample_t(4, density="bogus")
