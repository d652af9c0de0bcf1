"""Properties of flowalign.objectives.distar (Diff-Instruct*, docs/algorithms.md 3 and the checks listed in 3.5)."""

from __future__ import annotations

import math

import pytest
import torch

from flowalign import flow
from flowalign.objectives import distar
from flowalign.objectives.distar import (
    distance_grad,
    distar_generator_loss,
    distar_regularizer,
    guided_reference,
    kl_reward_generator_loss,
    online_score_loss,
    pseudo_huber,
    pseudo_huber_grad,
    score_divergence_surrogate,
)
from flowalign.objectives.flow_matching import flow_matching_loss

THETA, SIGMA, N = 0.9, 0.7, 100_000


def _gen(seed: int) -> torch.Generator:
    return torch.Generator().manual_seed(seed)


# --- the distance ----------------------------------------------------------------------------------------------


def test_pseudo_huber_value_gradient_and_bounds():
    y = (
        torch.randn(64, 3, 5, generator=_gen(0), dtype=torch.float64)
        * torch.logspace(-3, 2, 64, dtype=torch.float64)[:, None, None]
    )
    c = 1.7
    assert torch.equal(pseudo_huber(torch.zeros(2, 4), c=c), torch.zeros(2))
    d = pseudo_huber(y, c=c)
    norm = y.reshape(64, -1).norm(dim=1)
    torch.testing.assert_close(d, torch.sqrt(norm**2 + c**2) - c)
    assert (d > 0).all()
    # d' is the gradient of d and has norm < 1
    y_req = y.clone().requires_grad_()
    (auto,) = torch.autograd.grad(pseudo_huber(y_req, c=c).sum(), y_req)
    grad = pseudo_huber_grad(y, c=c)
    torch.testing.assert_close(grad, auto)
    assert (grad.reshape(64, -1).norm(dim=1) < 1).all()


def test_pseudo_huber_limits_in_c():
    y = torch.randn(8, 6, generator=_gen(1), dtype=torch.float64)
    big_c = 1e6
    torch.testing.assert_close(big_c * pseudo_huber_grad(y, c=big_c), y, rtol=1e-6, atol=0)  # -> l2 (scaled)
    unit = y / y.norm(dim=1, keepdim=True)
    torch.testing.assert_close(pseudo_huber_grad(y, c=1e-9), unit, rtol=1e-8, atol=0)  # -> y / ||y||
    torch.testing.assert_close(distance_grad(y, distance="l2"), y)


def test_pseudo_huber_is_accurate_for_tiny_differences_in_fp32():
    y = torch.full((1, 4), 1e-5)  # ||y||^2 = 4e-10 << c^2: the naive formula cancels to 0 in fp32
    assert pseudo_huber(y, c=1.0).item() == pytest.approx(2e-10, rel=1e-5)


# --- CFG reference -----------------------------------------------------------------------------------------------


def test_guided_reference_limits_and_velocity_score_commutation():
    g = _gen(2)
    x_t, v_c, v_u = (torch.randn(3, 2, 4, generator=g, dtype=torch.float64) for _ in range(3))
    t = torch.tensor([0.2, 0.5, 0.9], dtype=torch.float64)
    assert torch.equal(guided_reference(v_c, v_u, guidance_scale=1.0), v_c)
    torch.testing.assert_close(guided_reference(v_c, v_u, guidance_scale=0.0), v_u)
    omega = 7.5
    via_velocity = flow.score_from_velocity(x_t, guided_reference(v_c, v_u, guidance_scale=omega), t)
    s_c, s_u = flow.score_from_velocity(x_t, v_c, t), flow.score_from_velocity(x_t, v_u, t)
    torch.testing.assert_close(via_velocity, guided_reference(s_c, s_u, guidance_scale=omega))


# --- the regulariser ---------------------------------------------------------------------------------------------


def _mlp(seed: int) -> torch.nn.Module:
    torch.manual_seed(seed)
    net = torch.nn.Sequential(torch.nn.Linear(6, 16), torch.nn.Tanh(), torch.nn.Linear(16, 6)).double()
    return net.requires_grad_(False)  # frozen parameters, input gradients still flow


@pytest.mark.parametrize("dist", ["pseudo_huber", "l2"])
def test_online_score_equal_to_reference_gives_zero_generator_gradient(dist):
    g = _gen(3)
    theta = torch.randn(6, dtype=torch.float64, requires_grad=True)
    z, noise = (
        torch.randn(16, 6, generator=g, dtype=torch.float64),
        torch.randn(16, 6, generator=g, dtype=torch.float64),
    )
    t = torch.rand(16, generator=g, dtype=torch.float64) * 0.8 + 0.1
    x_t = flow.interpolate(theta + z, noise, t)
    net = _mlp(0)
    loss, m = distar_regularizer(net(x_t), net(x_t), x_t, noise, t, distance=dist, c=0.5)
    loss.sum().backward()
    assert torch.equal(theta.grad, torch.zeros(6, dtype=torch.float64))
    assert m["score_diff_norm"] == 0
    # a different reference network does give a gradient (the test can fail)
    theta.grad = None
    x_t = flow.interpolate(theta + z, noise, t)
    distar_regularizer(net(x_t), _mlp(1)(x_t), x_t, noise, t, distance=dist, c=0.5)[0].sum().backward()
    assert theta.grad.abs().max() > 1e-6


def _mc(per_sample_grad: torch.Tensor) -> tuple[float, float]:
    return per_sample_grad.mean().item(), per_sample_grad.std().item() / math.sqrt(per_sample_grad.numel())


def _check_a_grads(seed: int = 4) -> torch.Tensor:
    # VE path x_t = x0 + sigma eps, generator x0 = theta + z, data N(0, 1); v = 1 + sigma^2.
    g = _gen(seed)
    z, eps = (
        torch.randn(N, 1, generator=g, dtype=torch.float64),
        torch.randn(N, 1, generator=g, dtype=torch.float64),
    )
    theta = torch.full((N, 1), THETA, dtype=torch.float64, requires_grad=True)  # per-sample copies
    v = 1 + SIGMA**2
    x_t = theta + z + SIGMA * eps
    s_online = -(x_t - THETA) / v  # student score at the current (frozen) theta, a function of x_t
    s_ref = -x_t / v
    loss, _ = score_divergence_surrogate(s_online, s_ref, -eps / SIGMA, distance="l2")
    loss.sum().backward()
    return theta.grad[:, 0]


def _check_b_grads(seed: int = 5) -> torch.Tensor:
    # VE path, generator x0 = theta z, data N(0, 1); a = theta^2 + sigma^2, b = 1 + sigma^2.
    g = _gen(seed)
    z, eps = (
        torch.randn(N, 1, generator=g, dtype=torch.float64),
        torch.randn(N, 1, generator=g, dtype=torch.float64),
    )
    theta = torch.full((N, 1), THETA, dtype=torch.float64, requires_grad=True)
    a, b = THETA**2 + SIGMA**2, 1 + SIGMA**2
    x_t = theta * z + SIGMA * eps
    loss, _ = score_divergence_surrogate(-x_t / a, -x_t / b, -eps / SIGMA, distance="l2")
    loss.sum().backward()
    return theta.grad[:, 0]


EXPECTED_A = THETA / (1 + SIGMA**2) ** 2  # 0.40539
_A, _B = THETA**2 + SIGMA**2, 1 + SIGMA**2
EXPECTED_B = -2 * THETA * (1 / _A - 1 / _B) / _A  # -0.13582


def test_closed_form_checks_a_and_b():
    assert EXPECTED_A == pytest.approx(0.40539, abs=1e-5) and EXPECTED_B == pytest.approx(-0.13582, abs=1e-5)
    for grads, expected in ((_check_a_grads(), EXPECTED_A), (_check_b_grads(), EXPECTED_B)):
        mean, se = _mc(grads)
        assert abs(mean - expected) < 5 * se + 1e-12, (mean, expected, se)


def test_half_gradient_variant_fails_check_b(monkeypatch):
    # the bug: stopping the gradient through d'(y(x_t)); check B must reject it (it gives half the gradient)
    original = distar.distance_grad
    monkeypatch.setattr(distar, "distance_grad", lambda y, **kw: original(y.detach(), **kw))
    mean_b, se_b = _mc(_check_b_grads())
    assert abs(mean_b - EXPECTED_B) > 20 * se_b
    assert mean_b == pytest.approx(EXPECTED_B / 2, abs=5 * se_b)  # -0.06790
    mean_a, se_a = _mc(_check_a_grads())  # check A alone cannot tell (y is constant in x there)
    assert abs(mean_a - EXPECTED_A) < 5 * se_a + 1e-12


@pytest.mark.parametrize("t_val", [0.3, 0.6])
def test_check_b_in_the_rectified_flow_path_through_velocities(t_val, monkeypatch):
    # x_t = (1 - t) theta z + t eps: a_t = (1 - t)^2 theta^2 + t^2, b_t = (1 - t)^2 + t^2,
    # expected d L_reg / d theta = -2 (1 - t)^2 theta (1/a_t - 1/b_t) / a_t; detached variant: half of it.
    a_t, b_t = (1 - t_val) ** 2 * THETA**2 + t_val**2, (1 - t_val) ** 2 + t_val**2
    expected = -2 * (1 - t_val) ** 2 * THETA * (1 / a_t - 1 / b_t) / a_t

    def grads() -> torch.Tensor:
        g = _gen(6)
        z = torch.randn(N, 1, generator=g, dtype=torch.float64)
        noise = torch.randn(N, 1, generator=g, dtype=torch.float64)
        theta = torch.full((N, 1), THETA, dtype=torch.float64, requires_grad=True)
        t = torch.full((N,), t_val, dtype=torch.float64)
        x_t = flow.interpolate(theta * z, noise, t)
        v_online = flow.velocity_from_score(x_t, -x_t / a_t, t)
        v_ref = flow.velocity_from_score(x_t, -x_t / b_t, t)
        distar_regularizer(v_online, v_ref, x_t, noise, t, distance="l2")[0].sum().backward()
        return theta.grad[:, 0]

    mean, se = _mc(grads())
    assert abs(mean - expected) < 5 * se
    original = distar.distance_grad
    monkeypatch.setattr(distar, "distance_grad", lambda y, **kw: original(y.detach(), **kw))
    mean_half, se_half = _mc(grads())
    assert abs(mean_half - expected) > 20 * se_half


def test_flow_form_equals_score_form_in_value_and_gradient():
    g = _gen(7)
    x0 = torch.randn(5, 6, generator=g, dtype=torch.float64, requires_grad=True)
    noise = torch.randn(5, 6, generator=g, dtype=torch.float64)
    t = torch.rand(5, generator=g, dtype=torch.float64) * 0.8 + 0.1
    on, ref = _mlp(2), _mlp(3)

    def run(form: str):
        x0.grad = None
        x_t = flow.interpolate(x0, noise, t)
        if form == "flow":
            loss, _ = distar_regularizer(on(x_t), ref(x_t), x_t, noise, t, c=0.3)
        else:
            s_on, s_ref = (
                flow.score_from_velocity(x_t, on(x_t), t),
                flow.score_from_velocity(x_t, ref(x_t), t),
            )
            cond = -(x_t - (1 - flow.expand_t(t, x_t)) * x0) / flow.expand_t(t, x_t) ** 2  # -(x_t - a x0)/s^2
            loss, _ = score_divergence_surrogate(s_on, s_ref, cond, c=0.3)
        loss.sum().backward()
        return loss.detach(), x0.grad.clone()

    (l_flow, g_flow), (l_score, g_score) = run("flow"), run("score")
    torch.testing.assert_close(l_flow, l_score)
    torch.testing.assert_close(g_flow, g_score)


def test_large_c_pseudo_huber_regulariser_is_scaled_l2():
    g = _gen(8)
    x_t = torch.randn(4, 6, generator=g, dtype=torch.float64)
    noise = torch.randn(4, 6, generator=g, dtype=torch.float64)
    t = torch.full((4,), 0.5, dtype=torch.float64)
    v_on, v_ref = (
        torch.randn(4, 6, generator=g, dtype=torch.float64),
        torch.randn(4, 6, generator=g, dtype=torch.float64),
    )
    huber, _ = distar_regularizer(v_on, v_ref, x_t, noise, t, c=1e7)
    l2, _ = distar_regularizer(v_on, v_ref, x_t, noise, t, distance="l2")
    torch.testing.assert_close(1e7 * huber, l2, rtol=1e-6, atol=0)


# --- reward and the KL baseline ----------------------------------------------------------------------------------


def _generator_batch(seed: int):
    g = _gen(seed)
    theta = torch.randn(6, dtype=torch.float64, generator=g).requires_grad_()
    z, noise = (
        torch.randn(8, 6, generator=g, dtype=torch.float64),
        torch.randn(8, 6, generator=g, dtype=torch.float64),
    )
    t = torch.rand(8, generator=g, dtype=torch.float64) * 0.8 + 0.1
    x0 = theta + z
    return theta, x0, flow.interpolate(x0, noise, t), noise, t


def test_reward_scale_zero_reduces_to_score_divergence_distillation():
    on, ref = _mlp(4), _mlp(5)
    grads = {}
    for key in ("reg", "zero", "with_reward"):
        theta, x0, x_t, noise, t = _generator_batch(9)
        reward = -(x0**2).sum(dim=1)  # differentiable toy reward of the clean sample
        if key == "reg":
            loss, _ = distar_regularizer(on(x_t), ref(x_t), x_t, noise, t, c=0.5)
        else:
            scale = 0.0 if key == "zero" else 2.0
            loss, m = distar_generator_loss(
                reward, on(x_t), ref(x_t), x_t, noise, t, reward_scale=scale, c=0.5
            )
        loss.sum().backward()
        grads[key] = (loss.detach(), theta.grad.clone(), reward.detach())
    torch.testing.assert_close(grads["zero"][0], grads["reg"][0])
    torch.testing.assert_close(grads["zero"][1], grads["reg"][1])
    # with a reward: loss = L_reg - alpha r, gradient adds -alpha d r / d theta = 2 alpha sum_i x0_i
    torch.testing.assert_close(grads["with_reward"][0], grads["reg"][0] - 2.0 * grads["reg"][2])
    theta, x0, *_ = _generator_batch(9)
    torch.testing.assert_close(grads["with_reward"][1] - grads["reg"][1], 2.0 * 2 * x0.detach().sum(dim=0))
    assert m["reward"].item() == pytest.approx(grads["reg"][2].mean().item())


def test_reward_must_carry_grad_and_networks_must_see_the_sample():
    theta, x0, x_t, noise, t = _generator_batch(10)
    net = _mlp(6)
    with pytest.raises(ValueError, match="reward must carry grad"):
        distar_generator_loss(torch.zeros(8), net(x_t), net(x_t), x_t, noise, t, reward_scale=1.0, c=1.0)
    with pytest.raises(ValueError, match="needs the reward"):
        distar_generator_loss(None, net(x_t), net(x_t), x_t, noise, t, reward_scale=1.0, c=1.0)
    with pytest.raises(ValueError, match="v_ref carries no gradient while the sample does"):
        distar_regularizer(net(x_t), net(x_t).detach(), x_t, noise, t, c=1.0)
    with pytest.raises(ValueError, match="needs the scale c > 0"):
        distar_regularizer(net(x_t), net(x_t), x_t, noise, t)
    with pytest.raises(ValueError, match=r"t must have shape \[B\] = \[8\]"):
        distar_regularizer(net(x_t), net(x_t), x_t, noise, t[:4], c=1.0)


@pytest.mark.parametrize("t_val", [0.25, 0.7])
def test_kl_baseline_gradient_is_the_closed_form_kl_gradient(t_val):
    # q_t = N((1 - t) theta, v_t), p_t = N(0, v_t), v_t = (1 - t)^2 + t^2: d/dtheta KL = (1 - t)^2 theta / v_t
    n = 64
    g = _gen(11)
    theta = torch.full((n, 1), THETA, dtype=torch.float64, requires_grad=True)
    z, noise = (
        torch.randn(n, 1, generator=g, dtype=torch.float64),
        torch.randn(n, 1, generator=g, dtype=torch.float64),
    )
    t = torch.full((n,), t_val, dtype=torch.float64)
    v_t = (1 - t_val) ** 2 + t_val**2
    x_t = flow.interpolate(theta + z, noise, t)
    v_online = flow.velocity_from_score(x_t, -(x_t - (1 - t_val) * THETA) / v_t, t)
    v_ref = flow.velocity_from_score(x_t, -x_t / v_t, t)
    loss, _ = kl_reward_generator_loss(None, v_online, v_ref, x_t, t, reward_scale=0.0)
    loss.sum().backward()
    torch.testing.assert_close(
        theta.grad[:, 0], torch.full((n,), (1 - t_val) ** 2 * THETA / v_t, dtype=torch.float64)
    )


def test_online_score_loss_is_flow_matching_with_a_detached_target():
    g = _gen(12)
    x0 = torch.randn(3, 2, 5, generator=g).requires_grad_()
    noise = torch.randn(3, 2, 5, generator=g)
    v = torch.randn(3, 2, 5, generator=g).requires_grad_()
    loss, _ = online_score_loss(v, x0, noise)
    torch.testing.assert_close(loss, flow_matching_loss(v, flow.velocity_target(x0.detach(), noise))[0])
    loss.sum().backward()
    assert x0.grad is None and v.grad is not None
