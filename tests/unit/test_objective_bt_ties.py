"""Properties of flowalign.objectives.bt_ties (docs/algorithms.md 1A)."""

from __future__ import annotations

import math

import pytest
import torch
import torch.nn.functional as F

from flowalign.objectives.bt_ties import (
    btt_loss,
    btt_probabilities,
    pairwise_accuracy,
    tie_calibrated_accuracy,
)


def _data(b: int = 16, k: int = 3, seed: int = 0, missing: bool = True):
    g = torch.Generator().manual_seed(seed)
    a = torch.randn(b, k, generator=g, dtype=torch.float64) * 2
    bb = torch.randn(b, k, generator=g, dtype=torch.float64) * 2
    choices = torch.tensor([1, -1, 0, -2] if missing else [1, -1, 0])
    labels = choices[torch.randint(len(choices), (b, k), generator=g)]
    return a, bb, labels


@pytest.mark.parametrize("theta", [1.0, 1.5, 5.0, 40.0])
def test_probabilities_sum_to_one(theta):
    a, b, _ = _data(b=64)
    p = btt_probabilities(a, b, theta=theta)
    torch.testing.assert_close(p.a_better + p.b_better + p.tie, torch.ones_like(a))
    assert (p.tie >= 0).all() and (p.a_better > 0).all()


def test_probabilities_match_the_rao_kupper_formulas_and_theta_one_is_plain_bt():
    a, b, _ = _data()
    theta = 5.0
    p = btt_probabilities(a, b, theta=theta)
    ea, eb = a.exp(), b.exp()
    torch.testing.assert_close(p.a_better, ea / (ea + theta * eb))
    torch.testing.assert_close(p.b_better, eb / (eb + theta * ea))
    torch.testing.assert_close(p.tie, (theta**2 - 1) * ea * eb / ((ea + theta * eb) * (eb + theta * ea)))
    p1 = btt_probabilities(a, b, theta=1.0)
    torch.testing.assert_close(p1.a_better, torch.sigmoid(a - b))
    assert torch.equal(p1.tie, torch.zeros_like(a))


def test_loss_is_negative_log_probability_of_the_label():
    a, b, labels = _data(b=32, k=1, missing=False)
    a, b, labels = a[:, 0], b[:, 0], labels[:, 0]
    loss, _ = btt_loss(a, b, labels, theta=5.0)
    p = btt_probabilities(a, b, theta=5.0)
    prob = torch.where(labels == 1, p.a_better, torch.where(labels == -1, p.b_better, p.tie))
    torch.testing.assert_close(loss, -prob.log())


def test_theta_one_non_tie_loss_is_plain_bradley_terry():
    a, b, labels = _data(missing=False)
    labels = torch.where(labels == 0, torch.ones_like(labels), labels)
    loss, _ = btt_loss(a, b, labels, theta=1.0)
    chosen_minus_rejected = torch.where(labels == 1, a - b, b - a)
    torch.testing.assert_close(loss, (-F.logsigmoid(chosen_minus_rejected)).mean(dim=1))


@pytest.mark.parametrize("theta", [1.5, 5.0, 12.0])
def test_values_at_zero_margin_and_tie_loss_shape(theta):
    zero = torch.zeros(1, dtype=torch.float64)
    non_tie, _ = btt_loss(zero, zero, torch.tensor([1]), theta=theta)
    tie, _ = btt_loss(zero, zero, torch.tensor([0]), theta=theta)
    assert non_tie.item() == pytest.approx(math.log(1 + theta), rel=1e-12)
    assert tie.item() == pytest.approx(math.log((theta + 1) / (theta - 1)), rel=1e-12)
    deltas = torch.linspace(-4, 4, 81, dtype=torch.float64)
    tie_curve, _ = btt_loss(deltas, torch.zeros_like(deltas), torch.zeros(81, dtype=torch.long), theta=theta)
    torch.testing.assert_close(tie_curve, tie_curve.flip(0))  # symmetric in Delta
    assert tie_curve.argmin().item() == 40  # minimised at Delta = 0
    if theta == 5.0:
        assert tie.item() == pytest.approx(0.4055, abs=1e-4) and non_tie.item() == pytest.approx(
            1.7918, abs=1e-4
        )


def test_swapping_a_and_b_with_flipped_labels_leaves_the_loss_unchanged():
    a, b, labels = _data(seed=3)
    flipped = torch.where(labels.abs() == 1, -labels, labels)  # 1 <-> -1; ties and missing stay
    for average in ("all_slots", "valid"):
        loss, m = btt_loss(a, b, labels, average=average)
        loss_swapped, m_swapped = btt_loss(b, a, flipped, average=average)
        torch.testing.assert_close(loss, loss_swapped)
        torch.testing.assert_close(m["accuracy"], m_swapped["accuracy"])


def test_missing_labels_give_zero_loss_and_zero_gradient_even_for_nan_rewards():
    a, b, labels = _data(seed=4)
    labels[0] = -2
    labels[1, 1] = -2
    a[labels == -2] = math.nan
    a.requires_grad_()
    b.requires_grad_()
    loss, _ = btt_loss(a, b, labels)
    assert loss[0].item() == 0 and torch.isfinite(loss).all()
    loss.sum().backward()
    missing = labels == -2
    assert torch.equal(a.grad[missing], torch.zeros(int(missing.sum()), dtype=a.dtype))
    assert torch.equal(b.grad[missing], torch.zeros(int(missing.sum()), dtype=b.dtype))
    assert (a.grad[~missing] != 0).all()
    # the rewards at missing slots do not matter
    a2 = torch.where(missing, torch.zeros_like(a), a.detach())
    torch.testing.assert_close(btt_loss(a2, b.detach(), labels)[0], loss.detach())


def test_average_modes():
    a, b, labels = _data(b=8, k=3, seed=5)
    num_valid = int((labels != -2).sum())
    assert 0 < num_valid < 24
    all_slots, _ = btt_loss(a, b, labels, average="all_slots")
    valid, _ = btt_loss(a, b, labels, average="valid")
    # per-slot losses summed: the two means differ exactly by the denominator
    total = all_slots.sum() * 3
    torch.testing.assert_close(all_slots.mean(), total / 24)
    torch.testing.assert_close(valid.mean(), total / num_valid)
    # with nothing missing they coincide; with everything missing the loss is 0
    a2, b2, full = _data(b=8, k=3, seed=6, missing=False)
    torch.testing.assert_close(btt_loss(a2, b2, full)[0], btt_loss(a2, b2, full, average="valid")[0])
    none_valid = torch.full((8, 3), -2)
    assert torch.equal(btt_loss(a2, b2, none_valid, average="valid")[0], torch.zeros(8, dtype=a2.dtype))


def test_accuracy_metrics_on_a_hand_made_batch():
    a = torch.tensor([2.0, 0.0, 1.0, 0.1, 0.0, 5.0])
    b = torch.tensor([1.0, 1.0, 1.0, 0.0, 3.0, 0.0])
    labels = torch.tensor([1, 1, -1, 0, -1, -2])  # deltas: 1, -1, 0, 0.1, -3, (missing)
    # non-tie labelled: (1, +1) ok, (-1, +1) wrong, (0, -1) wrong (zero counts as wrong), (-3, -1) ok
    assert pairwise_accuracy(a, b, labels).item() == pytest.approx(0.5)
    # ties predicted for |delta| <= 0.1: slots 3 (tie, right) and 2 (B better, wrong); others by sign: 2 right
    acc, eps = tie_calibrated_accuracy(a, b, labels)
    assert acc.item() == pytest.approx(3 / 5) and eps.item() == pytest.approx(0.1)
    _, m = btt_loss(a, b, labels)
    assert m["accuracy"].item() == pytest.approx(0.5)
    assert m["accuracy_with_ties"].item() == pytest.approx(0.6)
    assert m["valid_fraction"].item() == pytest.approx(5 / 6)


def _predict(delta: torch.Tensor, eps: float) -> torch.Tensor:
    # tie within eps, else the sign; an exact zero outside the tie band is wrong for every label (2)
    by_sign = torch.where(delta > 0, 1, torch.where(delta < 0, -1, 2))
    return torch.where(delta.abs() <= eps, 0, by_sign)


def _brute_force_tie_accuracy(delta: torch.Tensor, labels: torch.Tensor) -> float:
    return max(
        (_predict(delta, eps) == labels).double().mean().item() for eps in [-math.inf, *delta.abs().tolist()]
    )


@pytest.mark.parametrize("seed", range(4))
def test_tie_calibrated_accuracy_equals_brute_force_and_bounds_plain_accuracy(seed):
    g = torch.Generator().manual_seed(seed)
    delta = torch.randint(-4, 5, (40,), generator=g).double() / 2  # many repeated |delta| values and zeros
    labels = torch.tensor([1, -1, 0])[torch.randint(3, (40,), generator=g)]
    acc, eps = tie_calibrated_accuracy(delta, torch.zeros_like(delta), labels)
    assert acc.item() == pytest.approx(_brute_force_tie_accuracy(delta, labels))
    no_tie_over_all = ((labels == 1) & (delta > 0) | (labels == -1) & (delta < 0)).double().mean().item()
    assert acc.item() >= no_tie_over_all
    assert (_predict(delta, eps.item()) == labels).double().mean().item() == pytest.approx(
        acc.item()
    )  # eps reproduces acc


def test_undefined_accuracies_are_nan():
    zeros = torch.zeros(3)
    assert math.isnan(pairwise_accuracy(zeros, zeros, torch.tensor([0, 0, -2])).item())
    acc, eps = tie_calibrated_accuracy(zeros, zeros, torch.full((3,), -2))
    assert math.isnan(acc.item()) and math.isnan(eps.item())


@pytest.mark.parametrize(
    ("call", "match"),
    [
        (lambda a, b, lab: btt_loss(a, b, torch.full_like(lab, 22)), r"got 22 at index \[0, 0\]"),
        (lambda a, b, lab: btt_loss(a, b, lab.double()), "labels must be an integer tensor"),
        (
            lambda a, b, lab: btt_loss(a, b, lab[:, :2]),
            r"labels must have the shape of the rewards \[16, 3\]",
        ),
        (lambda a, b, lab: btt_loss(a, b[:, :2], lab), r"reward_b must have the shape of reward_a \[16, 3\]"),
        (lambda a, b, lab: btt_loss(a, b, lab, theta=0.5), "theta must be a finite value >= 1"),
        (lambda a, b, lab: btt_loss(a, b, torch.zeros_like(lab), theta=1.0), "ties probability 0"),
        (
            lambda a, b, lab: btt_loss(a, b, lab, average="batch"),
            "average must be one of 'all_slots', 'valid'",
        ),
        (lambda a, b, lab: btt_loss(a[..., None], b[..., None], lab[..., None]), r"shape \[B, K\] or \[B\]"),
    ],
)
def test_bad_inputs_raise_clear_errors(call, match):
    with pytest.raises(ValueError, match=match):
        call(*_data())
