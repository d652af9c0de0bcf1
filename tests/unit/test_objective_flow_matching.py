"""Properties of flowalign.objectives.flow_matching (docs/algorithms.md 5.2)."""

from __future__ import annotations

import math

import pytest
import torch

from flowalign import flow
from flowalign.objectives.flow_matching import (
    flow_matching_loss,
    per_sample_mse,
    time_loss_weight,
    velocity_error,
)


def _gen(seed: int = 0) -> torch.Generator:
    return torch.Generator().manual_seed(seed)


@pytest.mark.parametrize("shape", [(3, 4), (2, 4, 5, 6), (2, 4, 3, 5, 6)])
def test_sum_equals_mean_times_elements(shape):
    g = _gen()
    pred, target = torch.randn(shape, generator=g), torch.randn(shape, generator=g)
    d = math.prod(shape[1:])
    mean = per_sample_mse(pred, target)
    total = per_sample_mse(pred, target, reduction="sum")
    assert mean.shape == (shape[0],)
    torch.testing.assert_close(total, mean * d)


def test_per_sample_mse_matches_elementwise_definition_per_row():
    g = _gen(1)
    pred, target = torch.randn(4, 3, 8, 8, generator=g), torch.randn(4, 3, 8, 8, generator=g)
    expected = torch.stack([torch.nn.functional.mse_loss(pred[i], target[i]) for i in range(4)])
    torch.testing.assert_close(per_sample_mse(pred, target), expected)
    # a row's error depends only on that row
    pred2 = pred.clone()
    pred2[2] += 1.0
    changed = per_sample_mse(pred2, target) != per_sample_mse(pred, target)
    assert changed.tolist() == [False, False, True, False]


def test_half_precision_inputs_are_computed_in_fp32():
    g = _gen(2)
    pred = torch.randn(3, 64, generator=g).bfloat16()
    target = torch.randn(3, 64, generator=g).bfloat16()
    err = per_sample_mse(pred, target)
    assert err.dtype == torch.float32
    torch.testing.assert_close(err, per_sample_mse(pred.float(), target.float()), rtol=0, atol=0)


def test_exact_velocity_gives_zero_loss_and_wrong_one_positive():
    g = _gen(3)
    x0, noise = torch.randn(5, 2, 4, 4, generator=g), torch.randn(5, 2, 4, 4, generator=g)
    v = flow.velocity_target(x0, noise)
    loss, metrics = flow_matching_loss(v, flow.velocity_target(x0, noise))
    assert torch.equal(loss, torch.zeros(5))
    loss_bad, _ = flow_matching_loss(v + 0.1, v)
    torch.testing.assert_close(loss_bad, torch.full((5,), 0.01))
    assert metrics["mse"] == 0


def test_weights_scale_loss_linearly_and_metrics_are_detached():
    g = _gen(4)
    v_pred = torch.randn(4, 3, 5, generator=g, requires_grad=True)
    v_target = torch.randn(4, 3, 5, generator=g)
    w = torch.tensor([0.0, 1.0, 2.0, 0.5])
    loss, metrics = flow_matching_loss(v_pred, v_target, weights=w)
    torch.testing.assert_close(loss, w * velocity_error(v_pred, v_target))
    torch.testing.assert_close(metrics["loss"], loss.mean().detach())
    torch.testing.assert_close(metrics["mse"], velocity_error(v_pred, v_target).mean().detach())
    assert not any(m.requires_grad for m in metrics.values())
    # d L_i / d v_pred_i = 2 w_i (v_pred_i - v_target_i) / D
    loss.sum().backward()
    expected = 2 * w[:, None, None] * (v_pred.detach() - v_target) / 15
    torch.testing.assert_close(v_pred.grad, expected)


def test_time_weightings_properties():
    t = torch.linspace(0.01, 0.99, 99, dtype=torch.float64)
    torch.testing.assert_close(time_loss_weight(t, "none"), torch.ones_like(t))
    torch.testing.assert_close(time_loss_weight(t, "sigma_sqrt") * t**2, torch.ones_like(t))
    cos = time_loss_weight(t, "cosmap")
    torch.testing.assert_close(cos, time_loss_weight(1 - t, "cosmap"))  # symmetric about t = 1/2
    assert cos.argmax().item() == 49 and cos.max().item() == pytest.approx(4 / math.pi)
    # cosmap is a density on [0, 1] (it integrates to 1)
    grid = torch.linspace(0, 1, 200001, dtype=torch.float64)
    assert torch.trapezoid(time_loss_weight(grid, "cosmap"), grid).item() == pytest.approx(1.0, abs=1e-9)


def test_time_weight_is_detached_from_t():
    t = torch.rand(4, generator=_gen(5)).requires_grad_()
    assert not time_loss_weight(t, "cosmap").requires_grad


@pytest.mark.parametrize(
    ("call", "match"),
    [
        (
            lambda: per_sample_mse(torch.zeros(2, 3), torch.zeros(2, 4)),
            r"target must have the shape of pred \[2, 3\]",
        ),
        (lambda: per_sample_mse(torch.zeros(()), torch.zeros(())), r"pred must have shape \[B, \.\.\.\]"),
        (lambda: per_sample_mse(torch.zeros(2), torch.zeros(2), reduction="max"), "reduction must be one of"),
        (
            lambda: time_loss_weight(torch.rand(3), "logit"),
            "scheme must be one of 'none', 'sigma_sqrt', 'cosmap'",
        ),
        (lambda: time_loss_weight(torch.rand(3, 1), "none"), r"t must have shape \[B\], got \[3, 1\]"),
        (
            lambda: flow_matching_loss(torch.zeros(2, 3), torch.zeros(2, 3), weights=torch.ones(3)),
            r"weights must have shape \[B\] = \[2\], got \[3\]",
        ),
    ],
)
def test_bad_inputs_raise_clear_errors(call, match):
    with pytest.raises(ValueError, match=match):
        call()
