"""Evaluation metrics on reward scores: per-dimension statistics, paired win rates, calibration, drift.

All functions are pure (tensors in, plain floats/dicts out), so reports can be recomputed from files.
FID lives in :mod:`flowalign.evals.fid`, diversity in :mod:`flowalign.evals.diversity` and the bootstrap
in :mod:`flowalign.evals.stats`.

Samples of one prompt are correlated (same caption, often near-identical pictures), so confidence
intervals resample *prompts*, not samples, when prompt groups are given (a cluster bootstrap): an
i.i.d. bootstrap over K samples per prompt would claim about sqrt(K) times too much precision.
"""

from __future__ import annotations

import math
from collections.abc import Sequence

import torch
from torch import Tensor

from flowalign.evals.stats import bootstrap_means, group_ids, mean_and_se, percentile_interval, win_rate

__all__ = [
    "dimension_stats",
    "expected_calibration_error",
    "hacking_flags",
    "paired_difference",
    "paired_win_rate",
    "preference_calibration",
]


def dimension_stats(
    values: Tensor,
    groups: Tensor | Sequence | None = None,
    *,
    level: float = 0.95,
    num_resamples: int = 2000,
    seed: int = 0,
) -> dict[str, float]:
    """Mean of one reward dimension with a percentile-bootstrap confidence interval.

    Args:
        values: [N] scores of one model on one dimension.
        groups: N prompt labels: resample prompts (see module docstring); None resamples samples.
        level: confidence level of the interval.
        num_resamples: bootstrap resamples.
        seed: bootstrap seed.

    Returns:
        ``mean``, ``se`` (s/sqrt(N) without groups; the bootstrap standard deviation with groups),
        ``ci_low``, ``ci_high``, ``std`` (of the samples), ``min``, ``max``, ``n`` and ``num_groups``.
    """
    values = values.detach().double().flatten()
    mean, se = mean_and_se(values)
    means = bootstrap_means(values, groups, num_resamples=num_resamples, seed=seed)
    ci_low, ci_high = percentile_interval(means, level)
    ids = group_ids(groups, values.numel())
    if ids is not None:
        se = float(means.std()) if values.numel() > 1 else 0.0
    return {
        "mean": mean,
        "se": se,
        "ci_low": ci_low,
        "ci_high": ci_high,
        "std": float(values.std()) if values.numel() > 1 else 0.0,
        "min": float(values.min()),
        "max": float(values.max()),
        "n": int(values.numel()),
        "num_groups": int(ids.max()) + 1 if ids is not None else int(values.numel()),
    }


def paired_win_rate(
    a: Tensor,
    b: Tensor,
    groups: Tensor | Sequence | None = None,
    *,
    tie_tolerance: float = 0.0,
    level: float = 0.95,
    num_resamples: int = 2000,
    seed: int = 0,
) -> dict[str, float]:
    """Win rate of model A over model B on paired samples (same prompt and seed), ties counted half.

        win_rate_with_ties = P(a - b > tol) + 1/2 P(|a - b| <= tol)

    Args:
        a: [N] scores of A.
        b: [N] scores of B on the same N (prompt, seed) pairs.
        groups: N prompt labels for a cluster-bootstrap interval (None: resample pairs).
        tie_tolerance: differences within this are ties (0: only exact equality; set it for
            continuous rewards whose noise floor is known).
        level: confidence level of the interval on ``win_rate_with_ties``.
        num_resamples: bootstrap resamples.
        seed: bootstrap seed.

    Returns:
        ``win``, ``tie``, ``loss`` (fractions summing to 1), ``win_rate_with_ties``, its ``ci_low`` and
        ``ci_high``, and ``n``.
    """
    if tie_tolerance < 0:
        raise ValueError(f"tie_tolerance must be >= 0, got {tie_tolerance}")
    diff = a.detach().double().flatten() - b.detach().double().flatten()
    points = (diff > tie_tolerance).double() + 0.5 * (
        diff.abs() <= tie_tolerance
    ).double()  # [N] in {0, .5, 1}
    ci_low, ci_high = percentile_interval(
        bootstrap_means(points, groups, num_resamples=num_resamples, seed=seed), level
    )
    out = win_rate(a, b, tie_tolerance=tie_tolerance)
    # counted, not 1 - win - loss, so an exact 0 stays 0 (stats.win_rate's subtraction leaves 1e-17s)
    out["tie"] = float((diff.abs() <= tie_tolerance).double().mean())
    out["win_rate_with_ties"] = float(points.mean())
    return {**out, "ci_low": ci_low, "ci_high": ci_high, "n": int(diff.numel())}


def paired_difference(
    model: Tensor,
    base: Tensor,
    groups: Tensor | Sequence | None = None,
    *,
    level: float = 0.95,
    num_resamples: int = 2000,
    seed: int = 0,
) -> dict[str, float]:
    """Mean change of a reward against a base model on paired samples, with a bootstrap interval.

        delta = mean(model_i - base_i);  delta_std = delta / std(base)  (an effect size comparable
        across dimensions with different scales)

    Args:
        model: [N] scores of the tuned model.
        base: [N] scores of the base model on the same (prompt, seed) pairs.
        groups: N prompt labels for a cluster-bootstrap interval.
        level: confidence level.
        num_resamples: bootstrap resamples.
        seed: bootstrap seed.

    Returns:
        ``delta``, ``ci_low``, ``ci_high``, ``delta_std`` and ``n``.
    """
    if model.shape != base.shape:
        raise ValueError(
            f"paired scores must have the same shape, got {tuple(model.shape)} and {tuple(base.shape)}"
        )
    diff = model.detach().double().flatten() - base.detach().double().flatten()
    ci_low, ci_high = percentile_interval(
        bootstrap_means(diff, groups, num_resamples=num_resamples, seed=seed), level
    )
    base_std = float(base.double().std()) if base.numel() > 1 else 0.0
    delta = float(diff.mean())
    return {
        "delta": delta,
        "ci_low": ci_low,
        "ci_high": ci_high,
        "delta_std": delta / base_std if base_std > 0 else 0.0,
        "n": int(diff.numel()),
    }


def hacking_flags(
    deltas: dict[str, dict[str, float]], *, trained: Sequence[str], heldout: Sequence[str]
) -> list[str]:
    """Reward-hacking warnings from per-dimension changes against the base model.

    A model that gained on the rewards it was trained on while a held-out reward (one not used in
    training) fell, with both intervals excluding 0, is flagged: the gain does not transfer. A
    held-out reward falling on its own is flagged too.

    Args:
        deltas: ``{dimension: paired_difference(...)}``.
        trained: dimensions used as training rewards.
        heldout: dimensions not used in training.

    Returns:
        Human-readable warnings (empty when nothing looks wrong).
    """
    rose = [d for d in trained if d in deltas and deltas[d]["ci_low"] > 0]
    flags = []
    for dim in heldout:
        if dim not in deltas or not deltas[dim]["ci_high"] < 0:
            continue
        change = f"{deltas[dim]['delta']:+.4g} (95% CI {deltas[dim]['ci_low']:+.4g} to {deltas[dim]['ci_high']:+.4g})"
        if rose:
            flags.append(f"held-out reward {dim!r} fell by {change} while trained reward(s) {rose} rose")
        else:
            flags.append(f"held-out reward {dim!r} fell by {change}")
    return flags


def expected_calibration_error(
    confidence: Tensor, correct: Tensor, *, num_bins: int = 10
) -> tuple[float, list[dict[str, float]]]:
    """Expected calibration error over equal-width confidence bins (Guo et al. 2017, eq. 3).

        ECE = sum_b (n_b / N) |acc_b - conf_b|

    Args:
        confidence: [N] predicted probability of the predicted outcome, in [0, 1].
        correct: [N] bool (or 0/1), whether the predicted outcome happened.
        num_bins: number of equal-width bins over [0, 1].

    Returns:
        (ECE, bins) with one ``{"low", "high", "confidence", "accuracy", "count"}`` per non-empty bin.
    """
    confidence = confidence.detach().double().flatten()
    correct = correct.detach().double().flatten()
    if confidence.numel() == 0:
        return math.nan, []
    if confidence.shape != correct.shape:
        raise ValueError(
            f"confidence {tuple(confidence.shape)} and correct {tuple(correct.shape)} differ in shape"
        )
    edges = torch.linspace(0, 1, num_bins + 1, dtype=torch.float64)
    which = torch.clamp(torch.bucketize(confidence, edges[1:-1], right=True), 0, num_bins - 1)
    ece, bins = 0.0, []
    for b in range(num_bins):
        mask = which == b
        count = int(mask.sum())
        if not count:
            continue
        conf, acc = float(confidence[mask].mean()), float(correct[mask].mean())
        ece += count / confidence.numel() * abs(acc - conf)
        bins.append({"low": float(edges[b]), "high": float(edges[b + 1]), "confidence": conf, "accuracy": acc,
                     "count": count})  # fmt: skip
    return ece, bins


def _predictions(delta: Tensor, labels: Tensor, theta: float) -> tuple[Tensor, Tensor, Tensor]:
    """(confidence, correct, log-likelihood) of the BT (theta = 1, ties dropped) or BTT prediction."""
    from flowalign.objectives.bt_ties import LABEL_A_BETTER, LABEL_B_BETTER, LABEL_TIE

    log_theta = math.log(theta)
    log_a = torch.nn.functional.logsigmoid(delta - log_theta)  # log P(A > B)
    log_b = torch.nn.functional.logsigmoid(-delta - log_theta)
    if theta == 1:
        keep = labels != LABEL_TIE
        delta, labels, log_a, log_b = delta[keep], labels[keep], log_a[keep], log_b[keep]
        p_a = log_a.exp()
        confidence = torch.maximum(p_a, 1 - p_a)
        correct = torch.where(p_a >= 0.5, labels == LABEL_A_BETTER, labels == LABEL_B_BETTER)
        loglik = torch.where(labels == LABEL_A_BETTER, log_a, log_b)
        return confidence, correct, loglik
    log_tie = math.log(theta**2 - 1) + log_a + log_b
    logp = torch.stack([log_a, log_b, log_tie], dim=1)  # [N, 3]: A better, B better, tie
    target = torch.where(labels == LABEL_A_BETTER, 0, torch.where(labels == LABEL_B_BETTER, 1, 2))
    confidence, predicted = logp.exp().max(dim=1)
    loglik = logp.gather(1, target[:, None])[:, 0]
    return confidence, predicted == target, loglik


def _golden_section_minimum(fn, lo: float, hi: float, *, tol: float = 1e-6) -> float:
    """Argmin of a unimodal function on [lo, hi] by golden-section search (the BT/BTT NLL in log T is convex)."""
    ratio = (math.sqrt(5) - 1) / 2
    a, b = lo, hi
    c, d = b - ratio * (b - a), a + ratio * (b - a)
    fc, fd = fn(c), fn(d)
    while b - a > tol:
        if fc < fd:
            b, d, fd = d, c, fc
            c = b - ratio * (b - a)
            fc = fn(c)
        else:
            a, c, fc = c, d, fd
            d = a + ratio * (b - a)
            fd = fn(d)
    return (a + b) / 2


def preference_calibration(
    reward_a: Tensor,
    reward_b: Tensor,
    labels: Tensor,
    *,
    theta: float = 1.0,
    temperature: float = 1.0,
    num_bins: int = 10,
    fit_temperature: bool = True,
) -> dict[str, object]:
    """Accuracy and calibration of a reward model against human-labelled pairs.

    The reward difference is read as a Bradley-Terry logit, P(A > B) = sigmoid((a - b) / T), or with
    ``theta`` > 1 as Bradley-Terry with ties (Rao-Kupper, docs/algorithms.md 1A) over three outcomes.
    ECE compares the predicted outcome's probability with how often it happens. Rewards not trained
    as logits (CLIP similarity, oracle scores) are miscalibrated at T = 1 by construction, so the
    temperature minimising the negative log-likelihood is also fitted and the ECE after it reported.

    Args:
        reward_a: [N] rewards of item A.
        reward_b: [N] rewards of item B.
        labels: [N] long labels, 1 = A better, -1 = B better, 0 = tie, -2 = missing (skipped).
        theta: tie parameter (1: plain BT, ties left out of ECE; > 1: three-outcome BTT).
        temperature: T applied before the ECE at the given temperature.
        num_bins: ECE bins.
        fit_temperature: also fit T by maximum likelihood (log T in [-12, 12]).

    Returns:
        ``accuracy`` (no ties, ties in the label skipped), ``accuracy_with_ties`` and ``tie_threshold``
        (tie-calibrated), ``ece``, ``bins``, ``nll`` at ``temperature``; with fitting also
        ``fitted_temperature``, ``ece_fitted``, ``nll_fitted``; and ``num_pairs``, ``num_ties``.
    """
    from flowalign.objectives.bt_ties import LABEL_MISSING, pairwise_accuracy, tie_calibrated_accuracy

    if temperature <= 0:
        raise ValueError(f"temperature must be > 0, got {temperature}")
    labels = labels.flatten().long()
    accuracy = float(pairwise_accuracy(reward_a.flatten().double(), reward_b.flatten().double(), labels))
    acc_ties, threshold = tie_calibrated_accuracy(
        reward_a.flatten().double(), reward_b.flatten().double(), labels
    )
    keep = labels != LABEL_MISSING
    delta = (reward_a.flatten().double() - reward_b.flatten().double())[keep]
    labels = labels[keep]
    confidence, correct, loglik = _predictions(delta / temperature, labels, theta)
    ece, bins = expected_calibration_error(confidence, correct, num_bins=num_bins)
    out: dict[str, object] = {
        "accuracy": accuracy,
        "accuracy_with_ties": float(acc_ties),
        "tie_threshold": float(threshold),
        "ece": ece,
        "bins": bins,
        "nll": float(-loglik.mean()) if loglik.numel() else math.nan,
        "temperature": temperature,
        "theta": theta,
        "num_pairs": int(labels.numel()),
        "num_ties": int((labels == 0).sum()),
    }
    if fit_temperature and loglik.numel() and bool((delta != 0).any()):

        def nll(log_t: float) -> float:
            return float(-_predictions(delta / math.exp(log_t), labels, theta)[2].mean())

        log_t = _golden_section_minimum(nll, -12.0, 12.0)
        t_fit = math.exp(log_t)
        conf_fit, correct_fit, _ = _predictions(delta / t_fit, labels, theta)
        out |= {
            "fitted_temperature": t_fit,
            "ece_fitted": expected_calibration_error(conf_fit, correct_fit, num_bins=num_bins)[0],
            "nll_fitted": nll(log_t),
        }
    return out
