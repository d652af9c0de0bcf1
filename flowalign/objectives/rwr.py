"""Flow-RWR: reward-weighted flow matching (docs/algorithms.md 1C).

The KL-regularised reward objective max E[r] - beta KL(p || p_ref) has the optimum
p* ∝ p_ref exp(r / beta). Projecting p* onto the model with forward KL gives flow matching on
samples from p_ref (or a dataset) weighted by exp(r / beta):

    L_RWR = E[ w(x0, c) ||(noise - x0) - v(x_t, t, c)||^2 ],   w = exp(r / beta).

Weights are self-normalised within each prompt group (softmax * group size), which makes them
invariant to a per-group reward offset, equal to 1 when rewards are equal (plain flow matching),
the best-of-N indicator times N as beta -> 0, and uniform as beta -> inf.
"""

from __future__ import annotations

import math

import torch
from torch import Tensor

from flowalign.objectives._common import check_floating, check_vector, upcast


def rwr_weights(
    rewards: Tensor,
    *,
    temperature: float,
    group_ids: Tensor | None = None,
    max_weight: float | None = None,
) -> Tensor:
    """Self-normalised reward weights for Flow-RWR (docs/algorithms.md 1C, the [RECON] normalisation).

    For sample i in prompt group g (n_g members):

        w_i = n_g * exp(r_i / beta) / sum_{j in g} exp(r_j / beta)     (softmax within g, times n_g)
        w_i <- min(w_i, max_weight)                                      (if max_weight is given)

    so each group's weights average to 1 before clipping. Clipping is NOT followed by re-normalisation:
    the clipped mass is dropped (a group's mean weight becomes <= 1), which is what bounds each
    sample's gradient contribution; re-normalising would push the other weights back up.
    ``temperature = 0`` is the exact limit beta -> 0: weight n_g / k on each of the k maxima of a group
    (best-of-N SFT); ``temperature = math.inf`` gives weight 1 everywhere (plain flow matching).

    Args:
        rewards: rewards [B] (finite; e.g. a weighted sum of normalised reward dimensions).
        temperature: beta >= 0 (0 and ``math.inf`` are the exact limits).
        group_ids: optional integer prompt-group id per sample [B]; None means one group (the batch).
        max_weight: optional clip value, >= 1 (the mean weight of a group).

    Returns:
        Weights [B] (fp32, or fp64 for fp64 rewards), detached.

    Raises:
        ValueError: bad shapes or dtypes, non-finite rewards, temperature < 0, or max_weight < 1.
    """
    fn = "rwr_weights"
    check_floating(fn, "rewards", rewards)
    check_vector(fn, "rewards", rewards)
    if not (temperature >= 0):
        raise ValueError(f"{fn}: temperature must be >= 0 (0 = best-of-N, inf = uniform), got {temperature}")
    if max_weight is not None and not (max_weight >= 1):
        raise ValueError(f"{fn}: max_weight must be >= 1 (the mean weight of a group), got {max_weight}")
    if rewards.shape[0] == 0:
        raise ValueError(f"{fn}: rewards must hold at least one sample, got shape [0]")
    r = upcast(rewards).detach()
    num_bad = int((~torch.isfinite(r)).sum())
    if num_bad:
        raise ValueError(f"{fn}: rewards must be finite, got {num_bad} non-finite value(s) of {r.shape[0]}")
    if group_ids is None:
        inverse = torch.zeros(r.shape[0], dtype=torch.long, device=r.device)
    else:
        check_vector(fn, "group_ids", group_ids, r.shape[0])
        if group_ids.is_floating_point() or group_ids.is_complex() or group_ids.dtype == torch.bool:
            raise ValueError(f"{fn}: group_ids must be an integer tensor, got dtype {group_ids.dtype}")
        _, inverse = torch.unique(group_ids.to(r.device), return_inverse=True)
    num_groups = int(inverse.max()) + 1
    counts = torch.bincount(inverse, minlength=num_groups).to(r.dtype)  # [G]

    if math.isinf(temperature):
        w = torch.ones_like(r)
    else:
        group_max = torch.full((num_groups,), -math.inf, dtype=r.dtype, device=r.device)
        group_max = group_max.scatter_reduce(0, inverse, r, reduce="amax")  # [G]
        if temperature == 0:
            e = (r == group_max[inverse]).to(r.dtype)
        else:
            e = torch.exp((r - group_max[inverse]) / temperature)  # in (0, 1], 1 at each group max
        total = torch.zeros(num_groups, dtype=r.dtype, device=r.device).index_add(0, inverse, e)  # [G]
        w = e * counts[inverse] / total[inverse]  # this order keeps equal rewards at exactly 1
    if max_weight is not None:
        w = w.clamp(max=max_weight)
    return w


def flow_rwr_loss(err: Tensor, weights: Tensor) -> tuple[Tensor, dict[str, Tensor]]:
    """Flow-RWR loss per sample: reward-weighted flow matching (docs/algorithms.md 1C).

        L_i = w_i * err_i,   err_i = ||(noise - x0_i) - v(x_t_i, t_i, c_i)||^2 (mean or sum over elements)

    The weights are constants (detached): RWR does not differentiate through the reward.

    Args:
        err: per-sample velocity error [B] (e.g. ``velocity_error(v_pred, v_target)``).
        weights: per-sample weights [B] from :func:`rwr_weights`.

    Returns:
        loss: per-sample loss [B].
        metrics: detached scalars "loss" (mean weighted), "mse" (mean unweighted error), "weight_max",
            "weight_min", and "ess" = (sum w)^2 / (B sum w^2), the effective sample size as a fraction of
            B (1 for uniform weights, 1/B when one sample carries all the weight).

    Raises:
        ValueError: ``err`` and ``weights`` are not 1-D tensors of the same length.
    """
    fn = "flow_rwr_loss"
    check_floating(fn, "err", err)
    check_vector(fn, "err", err)
    if err.shape[0] == 0:
        raise ValueError(f"{fn}: err must hold at least one sample, got shape [0]")
    check_floating(fn, "weights", weights)
    check_vector(fn, "weights", weights, err.shape[0])
    e = upcast(err)
    w = upcast(weights).detach().to(e.dtype)
    loss = w * e
    metrics = {
        "loss": loss.detach().mean(),
        "mse": e.detach().mean(),
        "weight_max": w.max(),
        "weight_min": w.min(),
        "ess": w.sum().pow(2) / (w.shape[0] * w.pow(2).sum()),
    }
    return loss, metrics
