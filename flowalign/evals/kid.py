"""Kernel Inception Distance (KID): an unbiased estimate of the squared MMD between two feature sets.

With the cubic polynomial kernel of Binkowski et al. 2018, ``k(x, y) = (x . y / D + 1)^3`` for
D-dimensional features, and ``m`` items drawn without replacement from each set,

    MMD^2_u = 1/(m(m-1)) sum_{i != j} [k(x_i, x_j) + k(y_i, y_j)] - 2/m^2 sum_{i, j} k(x_i, y_j)

KID is the mean of MMD^2_u over ``subsets`` random subsets of size ``m`` (the convention of the
clean-fid and torchmetrics implementations, whose numbers this one reproduces on the same subsets:
``tests/evals/test_comparable_metrics.py``). Unlike FID it is unbiased in the number of samples, so
small evaluations can be compared with large ones; the spread over subsets gives a standard error.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import Tensor

__all__ = ["KernelDistance", "kernel_distance", "polynomial_mmd2"]


def polynomial_mmd2(x: Tensor, y: Tensor) -> Tensor:
    """Unbiased MMD^2 (module docstring) between x [m, D] and y [m, D], in float64."""
    x, y = x.double(), y.double()
    m, d = x.shape
    if y.shape != (m, d) or m < 2:
        raise ValueError(
            f"polynomial_mmd2: need two [m, D] sets with m >= 2, got {tuple(x.shape)}, {tuple(y.shape)}"
        )
    k_xx = (x @ x.T / d + 1) ** 3
    k_yy = (y @ y.T / d + 1) ** 3
    k_xy = (x @ y.T / d + 1) ** 3
    within = (k_xx.sum() - k_xx.diagonal().sum() + k_yy.sum() - k_yy.diagonal().sum()) / (m * (m - 1))
    return within - 2 * k_xy.sum() / m**2


@dataclass(frozen=True)
class KernelDistance:
    """KID over subsets: the mean, its standard error over the subsets, and the subset size used."""

    kid: float
    se: float
    subsets: int
    subset_size: int


def kernel_distance(
    features_a: Tensor, features_b: Tensor, *, subsets: int = 100, subset_size: int = 1000, seed: int = 0
) -> KernelDistance:
    """KID between two feature sets [N_a, D] and [N_b, D].

    Each subset draws ``m = min(N_a, N_b, subset_size)`` items without replacement from each set with a
    generator seeded by ``seed``, so the value is reproducible. When ``m`` equals both set sizes every
    subset is the whole set and KID is exactly one MMD^2_u.
    """
    if features_a.ndim != 2 or features_a.shape[1:] != features_b.shape[1:]:
        raise ValueError(f"feature sizes differ: {tuple(features_a.shape)} vs {tuple(features_b.shape)}")
    if subsets < 1:
        raise ValueError(f"subsets must be >= 1, got {subsets}")
    m = min(features_a.shape[0], features_b.shape[0], subset_size)
    gen = torch.Generator().manual_seed(seed)
    values = []
    for _ in range(subsets):
        ia = torch.randperm(features_a.shape[0], generator=gen)[:m]
        ib = torch.randperm(features_b.shape[0], generator=gen)[:m]
        values.append(polynomial_mmd2(features_a[ia], features_b[ib]))
    vals = torch.stack(values)
    se = float(vals.std(unbiased=True) / len(values) ** 0.5) if len(values) > 1 else 0.0
    return KernelDistance(kid=float(vals.mean()), se=se, subsets=subsets, subset_size=m)
