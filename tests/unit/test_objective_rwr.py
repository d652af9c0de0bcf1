"""Properties of flowalign.objectives.rwr (docs/algorithms.md 1C)."""

from __future__ import annotations

import math

import pytest
import torch

from flowalign.objectives.flow_matching import flow_matching_loss, velocity_error
from flowalign.objectives.rwr import flow_rwr_loss, rwr_weights

GROUPS = torch.tensor([7, 7, 7, -1, -1, 3, 3, 3, 3, 7])  # non-contiguous ids, interleaved members


def _group_sums(w: torch.Tensor, ids: torch.Tensor) -> dict[int, float]:
    return {int(g): float(w[ids == g].sum()) for g in ids.unique()}


def _rewards(seed: int = 0, n: int = 10) -> torch.Tensor:
    # distinct rewards with gaps of at least 0.1 (so beta -> 0 has a unique winner per group)
    perm = torch.randperm(n, generator=torch.Generator().manual_seed(seed))
    return perm.to(torch.float64) * 0.1 - 0.3


@pytest.mark.parametrize("temperature", [0.0, 0.05, 1.0, math.inf])
def test_equal_rewards_give_unit_weights_and_plain_flow_matching(temperature):
    rewards = torch.full((10,), 0.37)
    w = rwr_weights(rewards, temperature=temperature, group_ids=GROUPS)
    assert torch.equal(w, torch.ones(10))
    g = torch.Generator().manual_seed(1)
    v_pred, v_tgt = torch.randn(10, 3, 4, generator=g), torch.randn(10, 3, 4, generator=g)
    loss, _ = flow_rwr_loss(velocity_error(v_pred, v_tgt), w)
    fm_loss, _ = flow_matching_loss(v_pred, v_tgt)
    torch.testing.assert_close(loss, fm_loss, rtol=0, atol=0)


@pytest.mark.parametrize("temperature", [0.0, 0.3, 2.0])
def test_invariant_to_a_constant_added_to_each_groups_rewards(temperature):
    r = _rewards(2)
    shift = {7: 5.0, -1: -100.0, 3: 0.25}
    shifted = r + torch.tensor([shift[int(g)] for g in GROUPS], dtype=r.dtype)
    torch.testing.assert_close(
        rwr_weights(shifted, temperature=temperature, group_ids=GROUPS),
        rwr_weights(r, temperature=temperature, group_ids=GROUPS),
    )


def test_weights_are_group_softmax_times_group_size():
    r = _rewards(3)
    w = rwr_weights(r, temperature=0.4, group_ids=GROUPS)
    for g in GROUPS.unique():
        m = GROUPS == g
        torch.testing.assert_close(w[m], int(m.sum()) * torch.softmax(r[m] / 0.4, dim=0))
    sums = _group_sums(w, GROUPS)
    assert sums == pytest.approx({7: 4.0, -1: 2.0, 3: 4.0})
    # no group ids: the whole batch is one group
    torch.testing.assert_close(rwr_weights(r, temperature=0.4), 10 * torch.softmax(r / 0.4, dim=0))


def test_small_temperature_picks_the_best_of_each_group():
    r = _rewards(4)
    best = torch.zeros(10, dtype=torch.float64)
    for g in GROUPS.unique():
        idx = torch.nonzero(GROUPS == g).flatten()
        best[idx[r[idx].argmax()]] = len(idx)
    torch.testing.assert_close(rwr_weights(r, temperature=1e-3, group_ids=GROUPS), best, rtol=0, atol=1e-12)
    assert torch.equal(rwr_weights(r, temperature=0.0, group_ids=GROUPS), best)
    # best-of-N SFT: the weighted loss is n_g times the winners' flow-matching error
    err = torch.rand(10, generator=torch.Generator().manual_seed(5), dtype=torch.float64)
    loss, _ = flow_rwr_loss(err, rwr_weights(r, temperature=0.0, group_ids=GROUPS))
    torch.testing.assert_close(loss, best * err)


def test_zero_temperature_splits_ties_at_the_maximum():
    w = rwr_weights(torch.tensor([1.0, 3.0, 3.0, 0.0]), temperature=0.0)
    torch.testing.assert_close(w, torch.tensor([0.0, 2.0, 2.0, 0.0]))


def test_large_temperature_is_uniform():
    r = _rewards(6)
    torch.testing.assert_close(
        rwr_weights(r, temperature=1e7, group_ids=GROUPS),
        torch.ones(10, dtype=torch.float64),
        rtol=0,
        atol=1e-6,
    )
    assert torch.equal(
        rwr_weights(r, temperature=math.inf, group_ids=GROUPS), torch.ones(10, dtype=torch.float64)
    )


def test_weights_increase_with_reward_within_a_group_and_are_permutation_equivariant():
    r = _rewards(7)
    w = rwr_weights(r, temperature=0.5, group_ids=GROUPS)
    for g in GROUPS.unique():
        m = GROUPS == g
        order = r[m].argsort()
        assert (w[m][order].diff() > 0).all()
    perm = torch.randperm(10, generator=torch.Generator().manual_seed(8))
    torch.testing.assert_close(rwr_weights(r[perm], temperature=0.5, group_ids=GROUPS[perm]), w[perm])


def test_clipping_caps_weights_without_renormalising():
    r = torch.tensor([0.0, 0.0, 0.0, 3.0, 1.0, 1.2])
    ids = torch.tensor([0, 0, 0, 0, 1, 1])
    raw = rwr_weights(r, temperature=0.5, group_ids=ids)
    clipped = rwr_weights(r, temperature=0.5, group_ids=ids, max_weight=2.0)
    assert raw[3] > 2.0 and clipped[3] == 2.0
    keep = raw <= 2.0
    torch.testing.assert_close(clipped[keep], raw[keep])  # others untouched: no re-normalisation
    assert clipped[ids == 0].sum() < 4.0
    assert clipped.max() <= 2.0


def test_loss_gradient_does_not_reach_the_weights_and_metrics():
    err = torch.tensor([1.0, 2.0, 3.0, 4.0], requires_grad=True)
    w = torch.tensor([0.0, 0.0, 2.0, 2.0], requires_grad=True)
    loss, m = flow_rwr_loss(err, w)
    loss.sum().backward()
    torch.testing.assert_close(err.grad, w.detach())
    assert w.grad is None
    torch.testing.assert_close(m["loss"], torch.tensor(3.5))
    torch.testing.assert_close(m["mse"], torch.tensor(2.5))
    torch.testing.assert_close(m["ess"], torch.tensor(0.5))  # two of four samples carry all the weight
    assert m["weight_max"] == 2.0 and m["weight_min"] == 0.0


@pytest.mark.parametrize(
    ("call", "match"),
    [
        (lambda: rwr_weights(torch.rand(3), temperature=-1.0), "temperature must be >= 0"),
        (lambda: rwr_weights(torch.rand(3), temperature=1.0, max_weight=0.5), "max_weight must be >= 1"),
        (lambda: rwr_weights(torch.tensor([0.0, math.nan]), temperature=1.0), "1 non-finite value"),
        (
            lambda: rwr_weights(torch.rand(3, 1), temperature=1.0),
            r"rewards must have shape \[B\], got \[3, 1\]",
        ),
        (
            lambda: rwr_weights(torch.rand(3), temperature=1.0, group_ids=torch.zeros(3)),
            "group_ids must be an integer tensor",
        ),
        (
            lambda: rwr_weights(torch.rand(3), temperature=1.0, group_ids=torch.zeros(2, dtype=torch.long)),
            r"group_ids must have shape \[B\] = \[3\]",
        ),
        (lambda: flow_rwr_loss(torch.rand(3), torch.rand(4)), r"weights must have shape \[B\] = \[3\]"),
    ],
)
def test_bad_inputs_raise_clear_errors(call, match):
    with pytest.raises(ValueError, match=match):
        call()
