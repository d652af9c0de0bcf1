"""Properties of flowalign.objectives.dpo (docs/algorithms.md 1B and 5.1)."""

from __future__ import annotations

import math

import pytest
import torch
import torch.nn.functional as F

from flowalign import flow
from flowalign.objectives.dpo import (
    check_shared_pair_noise,
    diffusion_dpo_loss,
    dpo_inside,
    flow_dpo_beta,
    flow_dpo_loss,
    split_pairs,
    velocity_errors_for_pairs,
)
from flowalign.objectives.flow_matching import per_sample_mse


def _errors(p: int = 6, seed: int = 0, dtype=torch.float32):
    g = torch.Generator().manual_seed(seed)
    return [torch.rand(p, generator=g, dtype=dtype) for _ in range(4)]


@pytest.mark.parametrize("schedule", ["constant", "t2"])
def test_policy_equal_reference_gives_log2_and_half_slope(schedule):
    err_w, err_l, _, _ = _errors()
    err_w.requires_grad_()
    err_l.requires_grad_()
    t = torch.rand(6, generator=torch.Generator().manual_seed(1))
    beta = 7.0
    loss, metrics = flow_dpo_loss(
        err_w, err_l, err_w.detach().clone(), err_l.detach().clone(), beta=beta, t=t, beta_schedule=schedule
    )
    assert torch.equal(loss, torch.full_like(loss, math.log(2.0)))
    assert metrics["inside"] == 0 and metrics["implicit_acc"] == 0
    # inside = -(beta_t / 2)(e_w - ...) so d loss/d e_w = (d loss/d inside)(-beta_t / 2) = beta_t / 4 iff slope = -1/2
    loss.sum().backward()
    beta_t = torch.full((6,), beta) if schedule == "constant" else beta * (1 - t) ** 2
    torch.testing.assert_close(err_w.grad, beta_t / 4)
    torch.testing.assert_close(err_l.grad, -beta_t / 4)


def test_swapping_chosen_and_rejected_flips_inside():
    err_w, err_l, ref_w, ref_l = _errors(p=64, seed=2)
    inside = dpo_inside(err_w, err_l, ref_w, ref_l, beta=50.0)
    swapped = dpo_inside(err_l, err_w, ref_l, ref_w, beta=50.0)
    torch.testing.assert_close(swapped, -inside)
    loss_wl, m_wl = flow_dpo_loss(err_w, err_l, ref_w, ref_l, beta=50.0)
    loss_lw, m_lw = flow_dpo_loss(err_l, err_w, ref_l, ref_w, beta=50.0)
    torch.testing.assert_close(loss_wl, F.softplus(-inside))
    torch.testing.assert_close(loss_lw, F.softplus(inside))
    torch.testing.assert_close(loss_wl - loss_lw, -inside)  # softplus(-u) - softplus(u) = -u
    assert (inside != 0).all()
    torch.testing.assert_close(m_wl["implicit_acc"] + m_lw["implicit_acc"], torch.tensor(1.0))
    torch.testing.assert_close(m_wl["reward_margin"], -m_lw["reward_margin"])


def test_flow_dpo_with_t2_equals_diffusion_dpo_on_epsilon_errors():
    g = torch.Generator().manual_seed(3)
    p, shape = 5, (4, 3, 6, 6)
    kw = {"generator": g, "dtype": torch.float64}
    x0_w, x0_l = torch.randn(p, *shape, **kw), torch.randn(p, *shape, **kw)
    noise = torch.randn(p, *shape, **kw)
    t = torch.rand(p, **kw) * 0.98 + 0.01
    v_hat = {k: torch.randn(p, *shape, **kw) for k in ("w", "l", "ref_w", "ref_l")}
    x_t = {"w": flow.interpolate(x0_w, noise, t), "l": flow.interpolate(x0_l, noise, t)}
    v = {"w": flow.velocity_target(x0_w, noise), "l": flow.velocity_target(x0_l, noise)}

    def errs(reduction):
        ev, ee = {}, {}
        for k in v_hat:
            m = k[-1]
            ev[k] = per_sample_mse(v_hat[k], v[m], reduction=reduction)
            eps_hat = flow.noise_from_velocity(x_t[m], v_hat[k], t)
            ee[k] = per_sample_mse(eps_hat, noise, reduction=reduction)
        return ev, ee

    for reduction, beta in (("sum", 0.02), ("mean", 400.0)):
        ev, ee = errs(reduction)
        torch.testing.assert_close(ee["w"], (1 - t) ** 2 * ev["w"], rtol=1e-12, atol=0)
        flow_loss, _ = flow_dpo_loss(
            ev["w"], ev["l"], ev["ref_w"], ev["ref_l"], beta=beta, t=t, beta_schedule="t2"
        )
        diff_loss, _ = diffusion_dpo_loss(ee["w"], ee["l"], ee["ref_w"], ee["ref_l"], beta=beta)
        torch.testing.assert_close(flow_loss, diff_loss, rtol=1e-12, atol=1e-14)
        assert flow_loss.std() > 0.01  # non-degenerate: losses differ across pairs
        # and it equals the reference-code formula for Diffusion-DPO
        model_diff, ref_diff = ee["w"] - ee["l"], ee["ref_w"] - ee["ref_l"]
        torch.testing.assert_close(diff_loss, -F.logsigmoid(-0.5 * beta * (model_diff - ref_diff)))


def test_mean_with_beta_equals_sum_with_beta_over_d():
    g = torch.Generator().manual_seed(4)
    p, shape = 4, (2, 3, 5, 7)  # video-like [C, F, H, W]
    d = math.prod(shape)
    v_pred = torch.randn(2 * p, *shape, generator=g, dtype=torch.float64)
    v_ref = v_pred + 0.3 * torch.randn(2 * p, *shape, generator=g, dtype=torch.float64)
    v_tgt = torch.randn(2 * p, *shape, generator=g, dtype=torch.float64)
    losses = {}
    for reduction, beta in (("mean", 100.0), ("sum", 100.0 / d)):
        err_w, err_l = velocity_errors_for_pairs(v_pred, v_tgt, reduction=reduction)
        ref_w, ref_l = velocity_errors_for_pairs(v_ref, v_tgt, reduction=reduction)
        losses[reduction], _ = flow_dpo_loss(err_w, err_l, ref_w, ref_l, beta=beta)
    torch.testing.assert_close(losses["mean"], losses["sum"])
    assert not torch.allclose(losses["mean"], torch.full_like(losses["mean"], math.log(2)))


@pytest.mark.parametrize("beta", [1.0, 100.0])
def test_gradient_moves_chosen_prediction_toward_its_target_and_rejected_away(beta):
    g = torch.Generator().manual_seed(5)
    p = 3
    kw = {"generator": g, "dtype": torch.float64}
    v_tgt = torch.randn(2 * p, 4, 8, **kw)
    v_ref = v_tgt + torch.randn(2 * p, 4, 8, **kw)
    v_pred = (v_ref + 0.01 * torch.randn(2 * p, 4, 8, **kw)).requires_grad_()
    err_w, err_l = velocity_errors_for_pairs(v_pred, v_tgt)
    ref_w, ref_l = velocity_errors_for_pairs(v_ref, v_tgt)
    loss, _ = flow_dpo_loss(err_w, err_l, ref_w, ref_l, beta=beta)
    loss.sum().backward()
    step = -v_pred.grad.reshape(2 * p, -1)
    to_target = (v_tgt - v_pred.detach()).reshape(2 * p, -1)
    cos = F.cosine_similarity(step, to_target, dim=1)
    torch.testing.assert_close(cos[:p], torch.ones(p, dtype=torch.float64))
    torch.testing.assert_close(cos[p:], -torch.ones(p, dtype=torch.float64))
    # a small step along -grad lowers the loss
    with torch.no_grad():
        new_w, new_l = velocity_errors_for_pairs(v_pred - 1e-3 / beta * v_pred.grad, v_tgt)
        new_loss, _ = flow_dpo_loss(new_w, new_l, ref_w, ref_l, beta=beta)
    assert (new_loss < loss.detach()).all()


def test_pair_layout_is_chosen_then_rejected():
    g = torch.Generator().manual_seed(6)
    v_w, v_l = torch.randn(3, 2, 4, generator=g), torch.randn(3, 2, 4, generator=g)
    tgt_w, tgt_l = torch.randn(3, 2, 4, generator=g), torch.randn(3, 2, 4, generator=g)
    err_w, err_l = velocity_errors_for_pairs(
        torch.cat([v_w, v_l]), torch.cat([tgt_w, tgt_l]), reduction="sum"
    )
    torch.testing.assert_close(err_w, per_sample_mse(v_w, tgt_w, reduction="sum"))
    torch.testing.assert_close(err_l, per_sample_mse(v_l, tgt_l, reduction="sum"))
    x_w, x_l = split_pairs(torch.arange(6))
    assert x_w.tolist() == [0, 1, 2] and x_l.tolist() == [3, 4, 5]


def test_metrics_values():
    err_w = torch.tensor([1.0, 2.0, 3.0, 4.0])
    ref_w = torch.tensor([2.0, 2.0, 2.0, 2.0])  # gaps w: -1, 0, 1, 2
    err_l = torch.tensor([1.0, 1.0, 1.0, 1.0])
    ref_l = torch.tensor([0.0, 0.0, 0.0, 3.0])  # gaps l: 1, 1, 1, -2
    loss, m = flow_dpo_loss(err_w, err_l, ref_w, ref_l, beta=2.0)
    # margin = gap_l - gap_w = 2, 1, 0, -4 ; inside = (beta / 2) * margin
    torch.testing.assert_close(m["reward_margin"], torch.tensor(-0.25))
    torch.testing.assert_close(m["inside"], torch.tensor(-0.25))
    torch.testing.assert_close(m["implicit_acc"], torch.tensor(0.5))
    torch.testing.assert_close(m["err_gap_w"], torch.tensor(0.5))
    torch.testing.assert_close(m["err_gap_l"], torch.tensor(0.25))
    torch.testing.assert_close(m["loss"], loss.mean())
    torch.testing.assert_close(loss, F.softplus(-torch.tensor([2.0, 1.0, 0.0, -4.0])))
    assert not any(v.requires_grad for v in m.values())


def test_half_precision_errors_are_computed_in_fp32():
    errs = [e.half() for e in _errors(seed=7)]
    loss, _ = flow_dpo_loss(*errs, beta=100.0)
    assert loss.dtype == torch.float32
    torch.testing.assert_close(loss, flow_dpo_loss(*[e.float() for e in errs], beta=100.0)[0])


def test_beta_schedule_t2_values():
    t = torch.tensor([0.0, 0.5, 1.0])
    torch.testing.assert_close(flow_dpo_beta(t, beta=8.0, beta_schedule="t2"), torch.tensor([8.0, 2.0, 0.0]))
    assert flow_dpo_beta(t, beta=8.0) == 8.0


def test_shared_pair_noise_check():
    noise = torch.randn(3, 4)
    check_shared_pair_noise(torch.cat([noise, noise]), torch.tensor([0.1, 0.2, 0.3, 0.1, 0.2, 0.3]))
    with pytest.raises(ValueError, match="noise differs"):
        check_shared_pair_noise(torch.cat([noise, noise + 1e-3]))
    with pytest.raises(ValueError, match="t differs"):
        check_shared_pair_noise(torch.cat([noise, noise]), torch.tensor([0.1, 0.2, 0.3, 0.1, 0.2, 0.4]))


@pytest.mark.parametrize(
    ("call", "match"),
    [
        (lambda e: flow_dpo_loss(*e, beta=1.0, beta_schedule="t2"), "needs the per-pair times t"),
        (
            lambda e: flow_dpo_loss(*e, beta=1.0, t=torch.rand(5), beta_schedule="t2"),
            r"t must have shape \[P\] = \[6\]",
        ),
        (lambda e: flow_dpo_loss(*e, beta=1.0, beta_schedule="linear"), "beta_schedule must be one of"),
        (lambda e: flow_dpo_loss(*e, beta=0.0), "beta must be > 0"),
        (
            lambda e: flow_dpo_loss(e[0], e[1][:5], e[2], e[3], beta=1.0),
            r"err_l must have the shape of err_w \[6\]",
        ),
        (lambda e: diffusion_dpo_loss(e[0][:, None], *e[1:], beta=1.0), r"eps_err_w must have shape \[P\]"),
        (lambda e: velocity_errors_for_pairs(torch.zeros(5, 2), torch.zeros(5, 2)), "even size 2P"),
    ],
)
def test_bad_inputs_raise_clear_errors(call, match):
    with pytest.raises(ValueError, match=match):
        call(_errors())
