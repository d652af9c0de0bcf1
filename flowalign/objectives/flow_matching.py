"""Flow-matching regression: per-sample errors, time weightings and the weighted loss.

Convention (flowalign.flow, docs/algorithms.md 0.1): x_t = (1 - t) x0 + t noise, target v = noise - x0.
Every function here is pure: tensors in, per-sample tensors (and detached metrics) out, in fp32.
"""

from __future__ import annotations

import math
from typing import Literal

import torch
from torch import Tensor

from flowalign.objectives._common import (
    check_batched,
    check_choice,
    check_floating,
    check_same_shape,
    check_vector,
    per_sample_weights,
    upcast,
)

Reduction = Literal["mean", "sum"]
TimeWeighting = Literal["none", "sigma_sqrt", "cosmap"]

REDUCTIONS: tuple[str, ...] = ("mean", "sum")
TIME_WEIGHTINGS: tuple[str, ...] = ("none", "sigma_sqrt", "cosmap")


def per_sample_mse(pred: Tensor, target: Tensor, *, reduction: Reduction = "mean") -> Tensor:
    """Squared error per sample, reduced over every non-batch axis.

        e_i = reduce_{j} (pred_ij - target_ij)^2,   reduce = mean (default) or sum over the D elements.

    "mean" is the per-element convention of the reference Flow-DPO / Diffusion-DPO code; "sum" is the
    squared L2 norm of the papers (docs/algorithms.md 0.3). The two differ by the factor D = elements per sample.

    Args:
        pred: prediction [B, ...] (any float dtype; computed in fp32 or fp64).
        target: regression target, same shape as ``pred``.
        reduction: "mean" or "sum" over the non-batch elements.

    Returns:
        Per-sample error [B] (fp32, or fp64 for fp64 inputs); differentiable w.r.t. both inputs.

    Raises:
        ValueError: shapes differ, inputs have no batch axis, or ``reduction`` is unknown.
    """
    fn = "per_sample_mse"
    check_same_shape(fn, [("pred", pred), ("target", target)])
    check_batched(fn, "pred", pred)
    check_floating(fn, "pred", pred)
    check_floating(fn, "target", target)
    check_choice(fn, "reduction", reduction, REDUCTIONS)
    sq = (upcast(pred) - upcast(target)).pow(2)
    if sq.ndim == 1:
        return sq
    sq = sq.reshape(sq.shape[0], -1)  # [B, D]
    return sq.mean(dim=1) if reduction == "mean" else sq.sum(dim=1)


def velocity_error(v_pred: Tensor, v_target: Tensor, *, reduction: Reduction = "mean") -> Tensor:
    """Per-sample velocity regression error ||v_target - v_pred||^2 (mean or sum over elements).

    The same number as :func:`per_sample_mse`, named for its use on velocities: ``v_target`` is
    ``flowalign.flow.velocity_target(x0, noise)`` = noise - x0.

    Args:
        v_pred: predicted velocity [B, ...].
        v_target: target velocity, same shape.
        reduction: "mean" or "sum" over the non-batch elements.

    Returns:
        Per-sample error [B].
    """
    return per_sample_mse(v_pred, v_target, reduction=reduction)


def time_loss_weight(t: Tensor, scheme: TimeWeighting = "none") -> Tensor:
    """Per-sample loss weight w(t) of the SD3 training helpers (docs/algorithms.md 5.2).

        "none":       w = 1
        "sigma_sqrt": w = t^-2                                   (sigma = t in the rectified-flow path)
        "cosmap":     w = 2 / (pi (1 - 2 t + 2 t^2))

    "sigma_sqrt" is infinite at t = 0; sample t in (0, 1] when using it.

    Args:
        t: times [B] in [0, 1] (t = 1 is pure noise).
        scheme: one of "none", "sigma_sqrt", "cosmap".

    Returns:
        Weights [B] (fp32, or fp64 for fp64 ``t``), detached from ``t``.

    Raises:
        ValueError: ``t`` is not 1-D or ``scheme`` is unknown.
    """
    fn = "time_loss_weight"
    check_floating(fn, "t", t)
    check_vector(fn, "t", t)
    check_choice(fn, "scheme", scheme, TIME_WEIGHTINGS)
    t = upcast(t).detach()
    if scheme == "none":
        return torch.ones_like(t)
    if scheme == "sigma_sqrt":
        return t.pow(-2.0)
    return 2.0 / (math.pi * (1 - 2 * t + 2 * t.pow(2)))


def flow_matching_loss(
    v_pred: Tensor,
    v_target: Tensor,
    *,
    weights: Tensor | None = None,
    reduction: Reduction = "mean",
) -> tuple[Tensor, dict[str, Tensor]]:
    """(Weighted) flow-matching loss per sample (docs/algorithms.md 5.2).

        L_i = w_i * reduce_j (v_pred_ij - v_target_ij)^2,   v_target = noise - x0.

    ``weights`` are used as given (pass ``time_loss_weight(t, scheme)`` for the SD3 weightings, or
    reward weights for RWR); gradients flow only through ``v_pred`` and ``v_target`` as the caller built them.

    Args:
        v_pred: predicted velocity [B, ...].
        v_target: target velocity noise - x0, same shape (usually built without grad).
        weights: optional per-sample weights [B]; None means 1.
        reduction: "mean" (default) or "sum" over the non-batch elements.

    Returns:
        loss: per-sample loss [B].
        metrics: detached scalars "loss" (mean weighted loss) and "mse" (mean unweighted error).

    Raises:
        ValueError: shapes differ or ``weights`` is not [B].
    """
    err = per_sample_mse(v_pred, v_target, reduction=reduction)  # [B]
    w = per_sample_weights("flow_matching_loss", weights, err.shape[0], err)
    loss = err if w is None else w * err
    metrics = {"loss": loss.detach().mean(), "mse": err.detach().mean()}
    return loss, metrics
