r"""Flow-GRPO: group-relative advantages, the PPO-clipped ratio per SDE step, a KL to the reference
(Liu et al. 2025, "Flow-GRPO: Training Flow Matching Models via Online RL"; docs/algorithms.md 1F).

For each prompt c, K trajectories x^{(1..K)} are sampled with the SDE of docs/algorithms.md 1E and
scored. Advantages are relative to the group:

    A_i = (r_i - mean_g r) / (std_g r + eps)       ("group": std-normalised, the paper's form)
    A_i =  r_i - mean_g r                           ("none": the std-free option, no division)

then optionally clipped to [-A_max, A_max]. For each trained step j of trajectory i, with
ρ_ij = exp(log p_θ(x_{j+1} | x_j) - log p_old(x_{j+1} | x_j)), the PPO surrogate is

    L_clip = mean_{i, j} max( -A_i ρ_ij, -A_i clip(ρ_ij, 1 - ε, 1 + ε) )

and the KL to the reference is the closed form between the step's two Gaussians, which share std σ_j:

    KL_ij = ||μ_θ(x_j) - μ_ref(x_j)||² / (2 σ_j²)         (summed over elements, or their mean)
    L     = L_clip + β_KL mean_{i, j} KL_ij

On-policy (θ = θ_old) every ρ = 1, no clip is active and ∇L_clip = -mean A_i ∇log p_θ, the plain
policy gradient; at initialisation μ_θ = μ_ref and KL = 0.
"""

from __future__ import annotations

from typing import Literal

import torch
from torch import Tensor

from flowalign.objectives._common import (
    check_batched,
    check_choice,
    check_floating,
    check_positive,
    check_same_shape,
    check_vector,
    upcast,
)

__all__ = ["AdvantageScale", "gaussian_mean_kl", "grpo_clipped_loss", "group_advantages"]

AdvantageScale = Literal["group", "none"]


def group_advantages(
    rewards: Tensor,
    group_size: int,
    *,
    scale: AdvantageScale = "group",
    eps: float = 1e-4,
    clip: float | None = None,
) -> Tensor:
    """Group-relative advantages of prompt-major rewards [P * K] (module docstring).

    Args:
        rewards: [P * K], the K samples of prompt p at rows p*K .. p*K + K - 1.
        group_size: K >= 2.
        scale: "group" divides by the group's standard deviation (population, as Flow-GRPO) + eps;
            "none" keeps the centred reward (the std-free option).
        eps: added to the standard deviation (a group of equal rewards gets advantages 0).
        clip: clip the advantages to [-clip, clip] (None: no clip).

    Returns:
        advantages [P * K] in fp32/fp64, detached.

    Raises:
        ValueError: not a 1-D float tensor, K < 2, a length that is not a multiple of K, or a bad option.
    """
    fn = "group_advantages"
    check_floating(fn, "rewards", rewards)
    check_vector(fn, "rewards", rewards, what="[P*K]")
    check_choice(fn, "scale", scale, ("group", "none"))
    check_positive(fn, "eps", eps, allow_zero=True)
    if clip is not None:
        check_positive(fn, "clip", clip)
    if group_size < 2 or rewards.shape[0] % group_size:
        raise ValueError(
            f"{fn}: need group_size >= 2 dividing the {rewards.shape[0]} rewards, got group_size={group_size}"
        )
    r = upcast(rewards.detach()).reshape(-1, group_size)
    adv = r - r.mean(1, keepdim=True)
    if scale == "group":
        adv = adv / (r.std(1, unbiased=False, keepdim=True) + eps)
    if clip is not None:
        adv = adv.clamp(-clip, clip)
    return adv.reshape(-1)


def grpo_clipped_loss(
    log_prob: Tensor, old_log_prob: Tensor, advantages: Tensor, *, clip_range: float = 1e-4
) -> tuple[Tensor, dict[str, Tensor]]:
    """The PPO-clipped surrogate per sample, averaged over its trained steps.

        loss_i = mean_j max(-A_i ρ_ij, -A_i clip(ρ_ij, 1 - ε, 1 + ε)),   ρ_ij = exp(lp_ij - lp_old_ij)

    Args:
        log_prob: [B, S] log p_θ of each trained step (with gradient).
        old_log_prob: [B, S] log-probabilities under the sampling policy (constants).
        advantages: [B] (constants).
        clip_range: ε > 0 (Flow-GRPO uses 1e-4 on per-element-mean log-probabilities).

    Returns:
        loss [B]; metrics: "ratio" (mean ρ), "clip_frac" (fraction of clipped terms),
        "approx_kl" (mean of (lp_old - lp)^2 / 2), all detached.

    Raises:
        ValueError: shapes disagree or ε <= 0.
    """
    fn = "grpo_clipped_loss"
    for name, x in (("log_prob", log_prob), ("old_log_prob", old_log_prob), ("advantages", advantages)):
        check_floating(fn, name, x)
    check_batched(fn, "log_prob", log_prob, min_ndim=2)
    check_same_shape(fn, [("log_prob", log_prob), ("old_log_prob", old_log_prob)])
    check_vector(fn, "advantages", advantages, log_prob.shape[0], what="[B]")
    check_positive(fn, "clip_range", clip_range)
    lp, lp_old = upcast(log_prob), upcast(old_log_prob).detach()
    adv = upcast(advantages).detach()[:, None]
    ratio = torch.exp(lp - lp_old)
    unclipped = -adv * ratio
    clipped = -adv * ratio.clamp(1 - clip_range, 1 + clip_range)
    loss = torch.maximum(unclipped, clipped).mean(1)
    metrics = {
        "ratio": ratio.detach().mean(),
        "clip_frac": ((ratio.detach() - 1).abs() > clip_range).to(lp.dtype).mean(),
        "approx_kl": 0.5 * (lp.detach() - lp_old).pow(2).mean(),
    }
    return loss, metrics


def gaussian_mean_kl(
    mean: Tensor, ref_mean: Tensor, std: Tensor, *, reduction: Literal["mean", "sum"] = "mean"
) -> Tensor:
    """KL(N(mean, std² I) || N(ref_mean, std² I)) = ||mean - ref_mean||² / (2 std²) per sample [B].

    Args:
        mean: the policy's step mean [B, ...] (with gradient); ref_mean: the reference's [B, ...].
        std: the shared per-sample standard deviation [B] (> 0).
        reduction: "sum" over elements (the exact KL) or their "mean" (matching the log-probabilities).

    Raises:
        ValueError: shapes disagree, std not > 0 or an unknown reduction.
    """
    fn = "gaussian_mean_kl"
    check_choice(fn, "reduction", reduction, ("mean", "sum"))
    check_same_shape(fn, [("mean", mean), ("ref_mean", ref_mean)])
    check_vector(fn, "std", std, mean.shape[0], what="[B]")
    if not bool((std > 0).all()):
        raise ValueError(f"{fn}: std must be > 0")
    diff = (upcast(mean) - upcast(ref_mean).detach()).flatten(1)
    per_elem = diff.pow(2) / (2 * upcast(std).detach()[:, None].pow(2))
    return per_elem.sum(1) if reduction == "sum" else per_elem.mean(1)
