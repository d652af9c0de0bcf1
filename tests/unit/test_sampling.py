"""Stateless samplers, time grids and CFG (docs/algorithms.md 5.2 tests)."""

from __future__ import annotations

import pytest
import torch
from diffusers import FlowMatchEulerDiscreteScheduler

from flowalign.sampling import (
    sample_euler,
    sample_heun,
    sample_one_step,
    scheduler_time_grid,
    uniform_time_grid,
)
from flowalign.sampling.guidance import apply_transforms, cfg_combine


def test_one_euler_step_with_exact_velocity_of_a_point_returns_it():
    point = torch.randn(3, 5)
    noise = torch.randn(3, 5)

    def v_fn(x, t):  # exact velocity field of a single data point: v = (x - x0) / t
        return (x - point) / t.view(-1, 1)

    out = sample_euler(v_fn, noise, torch.tensor([1.0, 0.0]))
    torch.testing.assert_close(out, point)


def test_euler_converges_to_analytic_gaussian_ode():
    # data ~ N(m, s^2): the marginal velocity is linear and the ODE solution is
    # x(0) = m + s * noise for a start x(1) = noise.
    m, s = 2.0, 0.5
    noise = torch.randn(4096, 1, generator=torch.Generator().manual_seed(0), dtype=torch.float64)

    def v_fn(x, t):
        t = t.view(-1, 1)
        var = (1 - t) ** 2 * s**2 + t**2
        return (t - (1 - t) * s**2) / var * (x - (1 - t) * m) - m

    exact = m + s * noise
    errs = []
    for n in (10, 40, 160):
        out = sample_euler(v_fn, noise, torch.linspace(1, 0, n + 1, dtype=torch.float64))
        errs.append((out - exact).abs().max().item())
    # first order: 4x the steps gives about 4x less error
    assert errs[0] / errs[1] > 3 and errs[1] / errs[2] > 3 and errs[2] < 0.02
    heun = sample_heun(v_fn, noise, torch.linspace(1, 0, 41, dtype=torch.float64))
    assert (heun - exact).abs().max() < errs[1]  # second order beats first order at equal steps


def test_constant_velocity_is_exact_for_every_sampler():
    noise = torch.randn(2, 3)
    c = torch.randn(2, 3)
    ts = uniform_time_grid(7, shift=3.0)
    for sampler in (sample_euler, sample_heun):
        torch.testing.assert_close(sampler(lambda x, t: c, noise, ts), noise - c, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(sample_one_step(lambda x, t: c, noise), noise - c)


@pytest.mark.parametrize("shift", [1.0, 3.0])
def test_scheduler_grid_matches_diffusers_and_is_monotone(shift):
    sched = FlowMatchEulerDiscreteScheduler(shift=shift)
    ts = scheduler_time_grid(sched, 10)
    ref = FlowMatchEulerDiscreteScheduler(shift=shift)
    ref.set_timesteps(10)
    torch.testing.assert_close(ts, ref.sigmas)
    assert ts[-1] == 0 and abs(ts[0] - 1) < 1e-6 and (ts[1:] < ts[:-1]).all()
    assert sched.sigmas.shape[0] == 1000  # the given scheduler was not modified


def test_grid_rejects_zero_steps():
    with pytest.raises(ValueError, match="num_inference_steps"):
        uniform_time_grid(0)


def test_cfg_scale_one_is_conditional_and_zero_unconditional():
    u, c = torch.randn(2, 4), torch.randn(2, 4)
    torch.testing.assert_close(cfg_combine(u, c, 1.0), c)
    torch.testing.assert_close(cfg_combine(u, c, 0.0), u)


def test_transforms_apply_in_order():
    base = lambda x, t: x  # noqa: E731
    add_one = lambda f: lambda x, t: f(x, t) + 1  # noqa: E731
    double = lambda f: lambda x, t: f(x, t) * 2  # noqa: E731
    v = apply_transforms(base, [add_one, double])
    assert v(torch.tensor([1.0]), torch.tensor([0.5])).item() == 4.0
    assert apply_transforms(base, None) is base


def test_samplers_backpropagate():
    w = torch.tensor(0.3, requires_grad=True)
    out = sample_euler(lambda x, t: w * x, torch.ones(2, 2), uniform_time_grid(4))
    out.sum().backward()
    assert w.grad is not None and w.grad != 0
