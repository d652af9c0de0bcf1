"""Small statistics used by evaluations: mean with standard error, bootstrap intervals, win rates."""

from __future__ import annotations

import math

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


def bootstrap_ci(
    values: Tensor, *, level: float = 0.95, num_resamples: int = 2000, seed: int = 0
) -> tuple[float, float]:
    """Percentile bootstrap confidence interval of the mean."""
    values = values.detach().double().flatten()
    if values.numel() == 0:
        raise ValueError("cannot bootstrap an empty set of values")
    g = torch.Generator().manual_seed(seed)
    idx = torch.randint(0, values.numel(), (num_resamples, values.numel()), generator=g)
    means = values[idx].mean(dim=1)
    lo, hi = (1 - level) / 2, 1 - (1 - level) / 2
    return means.quantile(lo).item(), means.quantile(hi).item()


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
