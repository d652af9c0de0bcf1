"""Bradley-Terry with ties (Rao-Kupper) for multi-dimensional reward models (docs/algorithms.md 1A).

Labels (per pair and reward dimension), as long integers:
    1 = A better, -1 = B better, 0 = tie, -2 = missing (the reference data uses 22 for missing).

With Delta = r(A) - r(B) and the tie parameter theta > 1:

    P(A > B) = sigmoid(Delta - log theta)
    P(B > A) = sigmoid(-Delta - log theta)
    P(A ~ B) = (theta^2 - 1) sigmoid(Delta - log theta) sigmoid(-Delta - log theta)

and the loss of a labelled slot is -log P(label). theta = 1 is plain Bradley-Terry (ties impossible).
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Literal

import torch
import torch.nn.functional as F
from torch import Tensor

from flowalign.objectives._common import check_choice, check_floating, check_same_shape, upcast

LABEL_A_BETTER = 1
LABEL_B_BETTER = -1
LABEL_TIE = 0
LABEL_MISSING = -2
LABELS: tuple[int, ...] = (LABEL_A_BETTER, LABEL_B_BETTER, LABEL_TIE, LABEL_MISSING)

Average = Literal["all_slots", "valid"]
AVERAGES: tuple[str, ...] = ("all_slots", "valid")


@dataclass(frozen=True)
class BTTProbabilities:
    """The three outcome probabilities of the Rao-Kupper model; they sum to 1 elementwise.

    Attributes:
        a_better: P(A > B), shape of the rewards.
        b_better: P(B > A).
        tie: P(A ~ B).
    """

    a_better: Tensor
    b_better: Tensor
    tie: Tensor


def _check_theta(fn: str, theta: float) -> None:
    if not (theta >= 1) or math.isinf(theta):
        raise ValueError(f"{fn}: theta must be a finite value >= 1 (1 = plain Bradley-Terry), got {theta}")


def btt_probabilities(reward_a: Tensor, reward_b: Tensor, *, theta: float = 5.0) -> BTTProbabilities:
    """Outcome probabilities of Bradley-Terry with ties (Rao & Kupper 1967; VideoAlign Sec. 3, docs/algorithms.md 1A).

        P(A > B) = e^a / (e^a + theta e^b) = sigmoid(a - b - log theta)
        P(B > A) = sigmoid(b - a - log theta)
        P(A ~ B) = (theta^2 - 1) P(A > B) P(B > A)

    Args:
        reward_a: rewards of A, any shape (e.g. [B, K]).
        reward_b: rewards of B, same shape.
        theta: tie parameter >= 1 (5.0 in the VideoReward code; 1 gives plain Bradley-Terry, no ties).

    Returns:
        :class:`BTTProbabilities` with three tensors of the rewards' shape (fp32 or fp64).

    Raises:
        ValueError: shapes differ or theta < 1.
    """
    fn = "btt_probabilities"
    check_same_shape(fn, [("reward_a", reward_a), ("reward_b", reward_b)])
    check_floating(fn, "reward_a", reward_a)
    _check_theta(fn, theta)
    delta = upcast(reward_a) - upcast(reward_b)
    log_theta = math.log(theta)
    p_a = torch.sigmoid(delta - log_theta)
    p_b = torch.sigmoid(-delta - log_theta)
    return BTTProbabilities(a_better=p_a, b_better=p_b, tie=(theta**2 - 1) * p_a * p_b)


def _check_labels(fn: str, labels: Tensor, like: Tensor) -> None:
    if labels.is_floating_point() or labels.is_complex() or labels.dtype == torch.bool:
        raise ValueError(f"{fn}: labels must be an integer tensor (1, -1, 0, -2), got dtype {labels.dtype}")
    if labels.shape != like.shape:
        raise ValueError(
            f"{fn}: labels must have the shape of the rewards {list(like.shape)}, got {list(labels.shape)}"
        )
    allowed = torch.tensor(LABELS, device=labels.device, dtype=labels.dtype)
    bad = ~torch.isin(labels, allowed)
    if bool(bad.any()):
        pos = tuple(int(i) for i in torch.nonzero(bad)[0])
        raise ValueError(
            f"{fn}: labels must be 1 (A better), -1 (B better), 0 (tie) or -2 (missing); "
            f"got {int(labels[pos])} at index {list(pos)} ({int(bad.sum())} bad value(s))"
        )


def btt_loss(
    reward_a: Tensor,
    reward_b: Tensor,
    labels: Tensor,
    *,
    theta: float = 5.0,
    average: Average = "all_slots",
) -> tuple[Tensor, dict[str, Tensor]]:
    """Bradley-Terry-with-ties negative log-likelihood per pair (VideoAlign, docs/algorithms.md 1A).

    Per pair i and reward dimension k, with the chosen-minus-rejected margin s = +-(a - b) and
    Delta = a - b:

        A or B better: l = -log sigmoid(s - log theta)                            = -log P(label)
        tie:           l = -log sigmoid(Delta - log theta) - log sigmoid(-Delta - log theta)
                           - log(theta^2 - 1)                                     = -log P(tie)
        missing:       l = 0 (and zero gradient, even if the rewards there are NaN)

    Averaging (the per-pair values are scaled so that ``loss.mean()`` is the requested average):
        "all_slots" (default, the reference code): loss_i = sum_k l_ik / K, so loss.mean() =
            sum l / (B K), masked slots counting in the denominator;
        "valid": loss_i = sum_k l_ik * B / N_valid, so loss.mean() = sum l / N_valid (0 if none valid).

    Args:
        reward_a: rewards of A [B, K] (K reward dimensions, e.g. VQ, MQ, TA) or [B] (K = 1).
        reward_b: rewards of B, same shape.
        labels: integer labels, same shape: 1 A better, -1 B better, 0 tie, -2 missing.
        theta: tie parameter (> 1 when ties are present; 1 = plain Bradley-Terry).
        average: "all_slots" or "valid".

    Returns:
        loss: per-pair loss [B].
        metrics: detached scalars "loss"; "accuracy" = C / (C + D) over labelled non-tie slots
            (sign of a - b, a difference of exactly 0 counts as wrong; NaN if there are none);
            "accuracy_with_ties" = the tie-calibrated accuracy of :func:`tie_calibrated_accuracy`
            per reward dimension, averaged over dimensions with labelled slots (NaN if none);
            "valid_fraction" = labelled slots / (B K).

    Raises:
        ValueError: shapes or dtypes are wrong, a label is not one of 1, -1, 0, -2, theta < 1, or
            theta = 1 with tie labels present.
    """
    fn = "btt_loss"
    check_same_shape(fn, [("reward_a", reward_a), ("reward_b", reward_b)])
    check_floating(fn, "reward_a", reward_a)
    check_floating(fn, "reward_b", reward_b)
    if reward_a.ndim not in (1, 2):
        raise ValueError(f"{fn}: reward_a must have shape [B, K] or [B], got {list(reward_a.shape)}")
    check_choice(fn, "average", average, AVERAGES)
    _check_theta(fn, theta)
    _check_labels(fn, labels, reward_a)
    a, b = upcast(reward_a), upcast(reward_b)
    if a.ndim == 1:
        a, b, labels = a[:, None], b[:, None], labels[:, None]  # [B, 1]
    labels = labels.to(a.device)
    valid = labels != LABEL_MISSING
    is_tie = labels == LABEL_TIE
    if theta == 1 and bool((is_tie & valid).any()):
        raise ValueError(
            f"{fn}: theta = 1 (plain Bradley-Terry) gives ties probability 0, but labels contain ties"
        )

    # Zero the margin of missing slots before any nonlinearity so NaN rewards there give zero gradient.
    delta = torch.where(valid, a - b, torch.zeros_like(a))  # [B, K]
    signed = torch.where(labels == LABEL_B_BETTER, -delta, delta)  # chosen minus rejected
    log_theta = math.log(theta)
    nontie = F.softplus(log_theta - signed)  # -log sigmoid(s - log theta)
    if theta > 1:
        tie = F.softplus(log_theta - delta) + F.softplus(log_theta + delta) - math.log(theta**2 - 1)
        slot = torch.where(is_tie, tie, nontie)
    else:
        slot = nontie
    slot = torch.where(valid, slot, torch.zeros_like(slot))  # [B, K]

    num_pairs, num_dims = slot.shape
    if average == "all_slots":
        loss = slot.sum(dim=1) / num_dims
    else:
        num_valid = valid.sum().to(slot.dtype)
        loss = slot.sum(dim=1) * num_pairs / num_valid.clamp_min(1)

    with torch.no_grad():
        per_dim = [tie_calibrated_accuracy(a[:, k], b[:, k], labels[:, k])[0] for k in range(num_dims)]
        per_dim_t = torch.stack(per_dim)
        metrics = {
            "loss": loss.detach().mean(),
            "accuracy": pairwise_accuracy(a, b, labels),
            "accuracy_with_ties": per_dim_t[~torch.isnan(per_dim_t)].mean(),
            "valid_fraction": valid.to(slot.dtype).mean(),
        }
    return loss, metrics


def _flat_valid(fn: str, reward_a: Tensor, reward_b: Tensor, labels: Tensor) -> tuple[Tensor, Tensor]:
    check_same_shape(fn, [("reward_a", reward_a), ("reward_b", reward_b)])
    check_floating(fn, "reward_a", reward_a)
    _check_labels(fn, labels, reward_a)
    labels = labels.to(reward_a.device).reshape(-1)
    delta = (upcast(reward_a) - upcast(reward_b)).detach().reshape(-1)
    keep = labels != LABEL_MISSING
    return delta[keep], labels[keep]


def _correct_sign(delta: Tensor, labels: Tensor) -> Tensor:
    return ((labels == LABEL_A_BETTER) & (delta > 0)) | ((labels == LABEL_B_BETTER) & (delta < 0))


def pairwise_accuracy(reward_a: Tensor, reward_b: Tensor, labels: Tensor) -> Tensor:
    """Preference accuracy without ties: C / (C + D) over labelled non-tie slots (docs/algorithms.md 1A).

    A slot is concordant when sign(a - b) matches the label; a difference of exactly 0 is discordant
    (as in VideoAlign's ``calc_accuracy.py``).

    Args:
        reward_a: rewards of A, any shape.
        reward_b: rewards of B, same shape.
        labels: integer labels, same shape (1, -1, 0, -2); ties and missing slots are skipped.

    Returns:
        Accuracy as a 0-d tensor in [0, 1]; NaN when there is no labelled non-tie slot.
    """
    delta, labels = _flat_valid("pairwise_accuracy", reward_a, reward_b, labels)
    decided = labels != LABEL_TIE
    if not bool(decided.any()):
        return torch.tensor(math.nan, dtype=delta.dtype, device=delta.device)
    return _correct_sign(delta[decided], labels[decided]).to(delta.dtype).mean()


def tie_calibrated_accuracy(reward_a: Tensor, reward_b: Tensor, labels: Tensor) -> tuple[Tensor, Tensor]:
    """Accuracy with ties after tie calibration (Deutsch et al. 2023; VideoAlign ``calc_accuracy.py``).

    For a threshold eps the model predicts a tie when |a - b| <= eps, else the sign of a - b; then

        acc(eps) = (C + T_hm) / (C + D + T_h + T_m + T_hm)   (= correct predictions / labelled slots)

    and the result is max over eps of acc(eps), sweeping eps over every observed |a - b|. We also
    include eps = -inf (no predicted ties), so the result is never below the plain accuracy over all
    labelled pairs (the reference sweeps only the observed values; this can differ from it only when
    predicting no tie at all beats every threshold).

    Args:
        reward_a: rewards of A, any shape (pool one reward dimension at a time).
        reward_b: rewards of B, same shape.
        labels: integer labels, same shape (1, -1, 0, -2); missing slots are skipped.

    Returns:
        (accuracy, threshold) as 0-d tensors; the threshold is -inf when predicting no ties is best.
        Both are NaN when no slot is labelled.
    """
    delta, labels = _flat_valid("tie_calibrated_accuracy", reward_a, reward_b, labels)
    n = delta.shape[0]
    if n == 0:
        nan = torch.tensor(math.nan, dtype=delta.dtype, device=delta.device)
        return nan, nan.clone()
    abs_d, order = delta.abs().sort()
    human_tie = (labels[order] == LABEL_TIE).to(delta.dtype)
    correct_sign = _correct_sign(delta[order], labels[order]).to(delta.dtype)
    total_sign = correct_sign.sum()
    # predicting a tie for the k+1 smallest |delta|: correct = human ties among them + right signs after them
    acc = (human_tie.cumsum(0) + total_sign - correct_sign.cumsum(0)) / n  # [N]
    last_of_run = torch.ones(n, dtype=torch.bool, device=delta.device)
    last_of_run[:-1] = abs_d[1:] != abs_d[:-1]  # a threshold includes every slot with the same |delta|
    acc = torch.where(last_of_run, acc, torch.full_like(acc, -math.inf))
    best = int(acc.argmax())
    no_tie = total_sign / n
    if no_tie >= acc[best]:
        return no_tie, torch.tensor(-math.inf, dtype=delta.dtype, device=delta.device)
    return acc[best], abs_d[best]


def labels_from_scores(scores_a: Tensor, scores_b: Tensor, *, tie_margin: float = 0.0) -> Tensor:
    """Preference labels from clean-reward scores: 1 if a - b > margin, -1 if b - a > margin, else 0 (tie).

    Args:
        scores_a: teacher scores of A, any shape (e.g. [B, K]).
        scores_b: teacher scores of B, same shape.
        tie_margin: differences within +-margin are ties (>= 0).

    Returns:
        long tensor of the scores' shape; -2 (missing) where either score is NaN.
    """
    if scores_a.shape != scores_b.shape:
        raise ValueError(
            f"labels_from_scores: shapes differ, {tuple(scores_a.shape)} vs {tuple(scores_b.shape)}"
        )
    if tie_margin < 0:
        raise ValueError(f"labels_from_scores: tie_margin must be >= 0, got {tie_margin}")
    diff = scores_a.double() - scores_b.double()
    labels = (diff > tie_margin).long() - (diff < -tie_margin).long()
    return torch.where(torch.isnan(diff), torch.full_like(labels, LABEL_MISSING), labels)
