"""Small statistics used by evaluations: mean with standard error, bootstrap intervals, win rates.

Samples of one prompt are correlated, so the bootstrap resamples whole groups (prompts) when group labels
are given (a cluster bootstrap); see :mod:`flowalign.evals.metrics`.
"""

from __future__ import annotations

import math
from collections.abc import Sequence

import torch
from torch import Tensor


def mean_and_se(values: Tensor) -> tuple[float, float]:
    """Sample mean and its standard error s / sqrt(n) (0 for n < 2)."""
    values = values.detach().double().flatten()
    n = values.numel()
    if n == 0:
        raise ValueError("cannot summarise an empty set of values")
    mean = values.mean().item()
    se = values.std(unbiased=True).item() / math.sqrt(n) if n > 1 else 0.0
    return mean, se


def summarise(scores: dict[str, Tensor]) -> dict[str, dict[str, float]]:
    """Per key: {"mean", "se", "n"}."""
    out = {}
    for key, values in scores.items():
        mean, se = mean_and_se(values)
        out[key] = {"mean": mean, "se": se, "n": int(values.numel())}
    return out


def group_ids(groups: Tensor | Sequence | None, n: int) -> Tensor | None:
    """Map arbitrary group labels to 0..G-1 (None: every sample its own group)."""
    if groups is None:
        return None
    labels = groups.tolist() if isinstance(groups, Tensor) else list(groups)
    if len(labels) != n:
        raise ValueError(f"got {len(labels)} group labels for {n} values; they must match")
    index: dict = {}
    return torch.tensor([index.setdefault(g, len(index)) for g in labels], dtype=torch.long)


def bootstrap_means(
    values: Tensor,
    groups: Tensor | Sequence | None = None,
    *,
    num_resamples: int = 2000,
    seed: int = 0,
) -> Tensor:
    """Bootstrap distribution of the mean, resampling whole groups when ``groups`` is given.

    With groups g = 1..G holding sums S_g and counts n_g, one resample draws G groups with
    replacement and returns sum(S) / sum(n) over the drawn groups (the cluster bootstrap of the
    ratio estimator, which is the plain mean when every group has the same size).

    Args:
        values: [N] scores.
        groups: N group labels (e.g. prompt indices) or None for i.i.d. resampling of samples.
        num_resamples: number of bootstrap resamples R.
        seed: seed of the resampling generator (results are reproducible).

    Returns:
        [R] float64 resampled means.
    """
    values = values.detach().double().flatten()
    n = values.numel()
    if n == 0:
        raise ValueError("cannot bootstrap an empty set of values")
    gen = torch.Generator().manual_seed(seed)
    ids = group_ids(groups, n)
    if ids is None:
        idx = torch.randint(0, n, (num_resamples, n), generator=gen)  # [R, N]
        return values[idx].mean(dim=1)
    num_groups = int(ids.max()) + 1
    sums = torch.zeros(num_groups, dtype=torch.float64).index_add_(0, ids, values)  # [G]
    counts = torch.zeros(num_groups, dtype=torch.float64).index_add_(0, ids, torch.ones_like(values))
    idx = torch.randint(0, num_groups, (num_resamples, num_groups), generator=gen)  # [R, G]
    return sums[idx].sum(dim=1) / counts[idx].sum(dim=1)


def percentile_interval(means: Tensor, level: float) -> tuple[float, float]:
    """The central ``level`` percentile interval of bootstrap means (quantiles (1 - level) / 2 and 1 - that)."""
    if not 0 < level < 1:
        raise ValueError(f"confidence level must be in (0, 1), got {level}")
    lo, hi = (1 - level) / 2, 1 - (1 - level) / 2
    q = torch.quantile(means, torch.tensor([lo, hi], dtype=means.dtype))
    return float(q[0]), float(q[1])


def bootstrap_ci(
    values: Tensor,
    groups: Tensor | Sequence | None = None,
    *,
    level: float = 0.95,
    num_resamples: int = 2000,
    seed: int = 0,
) -> tuple[float, float]:
    """Percentile bootstrap confidence interval of the mean (resampling whole groups when given)."""
    return percentile_interval(bootstrap_means(values, groups, num_resamples=num_resamples, seed=seed), level)


def win_rate(a: Tensor, b: Tensor, *, tie_tolerance: float = 0.0) -> dict[str, float]:
    """Paired comparison of scores (same prompt and seed): fractions of wins, ties, losses of ``a``.

    ``win_rate_with_ties`` counts a tie as half a win (the convention of VideoAlign's win rates).
    """
    if a.shape != b.shape:
        raise ValueError(f"paired scores must have the same shape, got {tuple(a.shape)} and {tuple(b.shape)}")
    diff = a.double() - b.double()
    wins = (diff > tie_tolerance).double().mean().item()
    losses = (diff < -tie_tolerance).double().mean().item()
    ties = 1.0 - wins - losses
    return {"win": wins, "tie": ties, "loss": losses, "win_rate_with_ties": wins + 0.5 * ties}
