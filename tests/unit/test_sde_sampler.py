"""The SDE sampler of Flow-GRPO: one step against an independent Gaussian computation, and its
marginals against the ODE sampler's on data N(m, s^2), whose exact velocity is known in closed form."""

from __future__ import annotations

import math

import pytest
import torch
from torch.distributions import Normal

from flowalign import flow
from flowalign.sampling.samplers import sample_euler
from flowalign.sampling.sde import sample_sde, sde_sigma, sde_step_log_prob, sde_step_mean_std

pytestmark = pytest.mark.usefixtures("one_thread")

M, S = 1.5, 0.5  # data N(M, S^2)


def gaussian_velocity(x: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
    """E[noise - x0 | x_t] for x0 ~ N(M, S^2): x_t ~ N((1-t) M, V), V = (1-t)^2 S^2 + t^2."""
    tt = flow.expand_t(t, x)
    var = (1 - tt) ** 2 * S**2 + tt**2
    return (tt - (1 - tt) * S**2) / var * (x - (1 - tt) * M) - M


@pytest.mark.parametrize("t, t_next", [(1.0, 0.9), (0.6, 0.55), (0.05, 0.0)])
def test_step_mean_and_log_prob_equal_independent_gaussian(t, t_next):
    g = torch.Generator().manual_seed(0)
    x = torch.randn(4, 3, 5, generator=g, dtype=torch.float64)
    v = torch.randn(4, 3, 5, generator=g, dtype=torch.float64)
    x_next = torch.randn(4, 3, 5, generator=g, dtype=torch.float64)
    eta = 0.7
    tb = torch.full((4,), t, dtype=torch.float64)
    lp, mean, std = sde_step_log_prob(
        x, x_next, v, tb, torch.tensor(t_next, dtype=torch.float64), eta=eta, reduction="sum"
    )
    # independent route: reverse-time SDE dx = [-v + sigma^2/2 * score] ds + sigma dW in s = 1 - t,
    # score from flow.score_from_velocity (guarded at t = 0 where sigma^2 * score -> -eta^2 noise_hat)
    delta = t - t_next
    tc = min(t, 0.98)
    sigma2 = eta**2 * tc / (1 - tc)
    if t > 0:
        score = flow.score_from_velocity(x, v, t)
        expected_mean = x + delta * (-v + 0.5 * sigma2 * score)
    else:
        expected_mean = x - delta * v
    expected_std = math.sqrt(sigma2 * delta)
    expected_lp = Normal(expected_mean, expected_std).log_prob(x_next).flatten(1).sum(1)
    eps = torch.finfo(torch.float64).eps
    torch.testing.assert_close(mean, expected_mean, rtol=0, atol=100 * eps)
    torch.testing.assert_close(
        std, torch.full((4,), expected_std, dtype=torch.float64), rtol=10 * eps, atol=0
    )
    torch.testing.assert_close(lp, expected_lp, rtol=1e-12, atol=1e-10)
    lp_mean, _, _ = sde_step_log_prob(
        x, x_next, v, tb, torch.tensor(t_next, dtype=torch.float64), eta=eta, reduction="mean"
    )
    torch.testing.assert_close(lp_mean, expected_lp / 15, rtol=1e-12, atol=1e-12)


def test_fp32_step_matches_fp64_within_rounding():
    g = torch.Generator().manual_seed(1)
    x, v, xn = (torch.randn(8, 16, generator=g) for _ in range(3))
    t = torch.full((8,), 0.7)
    lp32, _, _ = sde_step_log_prob(x.bfloat16(), xn, v.bfloat16(), t, torch.tensor(0.6), eta=0.5)
    lp64, _, _ = sde_step_log_prob(x.bfloat16().double(), xn.double(), v.bfloat16().double(),
                                   t.double(), torch.tensor(0.6, dtype=torch.float64), eta=0.5)  # fmt: skip
    assert lp32.dtype == torch.float32
    # bf16 inputs are upcast before any arithmetic: fp32 rounding only (|lp| ~ 10, eps32 ~ 1.2e-7)
    torch.testing.assert_close(lp32.double(), lp64, rtol=0, atol=1e-4)


def test_eta_zero_is_the_euler_step_and_sigma_is_finite_at_one():
    x, v = torch.randn(3, 4), torch.randn(3, 4)
    mean, std = sde_step_mean_std(x, v, torch.tensor(0.5), torch.tensor(0.4), eta=0.0)
    torch.testing.assert_close(mean, x - 0.1 * v, rtol=0, atol=1e-6)
    assert bool((std == 0).all())
    assert torch.isfinite(sde_sigma(torch.tensor([1.0, 0.0]), 0.7)).all()
    with pytest.raises(ValueError, match="eta"):
        sde_sigma(torch.tensor([0.5]), -1.0)


def _exact_moments(ts, eta):
    """Mean and variance after the sampler's N steps, propagated exactly (every step is affine in x)."""
    mean, var = torch.tensor(0.0, dtype=torch.float64), torch.tensor(1.0, dtype=torch.float64)
    for i in range(len(ts) - 1):
        pts = torch.tensor([[0.0], [1.0]], dtype=torch.float64)
        t = ts[i].expand(2)
        mu, std = sde_step_mean_std(pts, gaussian_velocity(pts, t), t, ts[i + 1], eta=eta)
        a, b = mu[1, 0] - mu[0, 0], mu[0, 0]
        mean, var = a * mean + b, a * a * var + std[0] ** 2
    return float(mean), float(var)


def test_sde_marginals_match_the_ode_sampler_on_a_gaussian():
    n_steps, n = 100, 20000
    ts = torch.linspace(1.0, 0.0, n_steps + 1, dtype=torch.float64)
    g = torch.Generator().manual_seed(0)
    x1 = torch.randn(n, 1, generator=g, dtype=torch.float64)
    ode = sample_euler(gaussian_velocity, x1, ts)
    z = torch.randn(n_steps, n, 1, generator=g, dtype=torch.float64)
    x1b = torch.randn(n, 1, generator=g, dtype=torch.float64)
    traj = sample_sde(gaussian_velocity, x1b, ts, eta=0.7, step_noise=z)
    assert traj.log_probs.shape == (n, n_steps) and torch.isfinite(traj.log_probs).all()
    # exact discrete-time moments: both samplers reach the data's (M, S^2) up to the O(1/N) Euler error
    ode_m, ode_v = _exact_moments(ts, 0.0)
    sde_m, sde_v = _exact_moments(ts, 0.7)
    assert abs(ode_m - M) < 0.02 and abs(sde_m - M) < 0.02
    assert abs(ode_v / S**2 - 1) < 0.05 and abs(sde_v / S**2 - 1) < 0.05
    # the samples: difference of means / variances within 4 s.e. plus the exact discretisation gap
    m_ode, v_ode = ode.mean().item(), ode.var().item()
    m_sde, v_sde = traj.x0.mean().item(), traj.x0.var().item()
    se_mean = math.sqrt(v_ode / n + v_sde / n)
    se_var = math.sqrt(2 / (n - 1)) * math.sqrt(v_ode**2 + v_sde**2)
    assert abs(m_sde - m_ode) < 4 * se_mean + abs(sde_m - ode_m)
    assert abs(v_sde - v_ode) < 4 * se_var + abs(sde_v - ode_v)
    # a control that fails: noise without the score correction inflates the variance
    noisy = sample_sde(lambda x, t: gaussian_velocity(x, t) - 0.0, x1b, ts, eta=0.7, step_noise=z, window=[])
    assert abs(noisy.x0.var().item() - v_ode) < 4 * se_var  # window=[] is the ODE itself
    naive = x1b.clone()
    for i in range(n_steps):
        t = ts[i].expand(n)
        dt = ts[i] - ts[i + 1]
        naive = naive - dt * gaussian_velocity(naive, t) + sde_sigma(t, 0.7)[:, None] * dt.sqrt() * z[i]
    assert naive.var().item() > v_ode + 10 * se_var
