r"""A stochastic sampler with the flow ODE's marginals, and the Gaussian log-probability of each step.

Online RL on a flow model (Flow-GRPO) needs a policy with a density: the deterministic ODE
sampler has none, so its steps are replaced by Euler-Maruyama steps of an SDE whose marginals
p_t equal the ODE's (derivation: docs/algorithms.md 1E). With the time convention of
``flowalign.flow`` (x_t = (1 - t) x0 + t noise, sampling runs t from 1 down to 0), a step from t
to t' = t - Δ (Δ > 0) is

    x_{t'} = x_t - Δ [ v + σ_t² / (2t) (x_t + (1 - t) v) ] + σ_t sqrt(Δ) z,     z ~ N(0, I)
    σ_t    = η sqrt(t_c / (1 - t_c)),   t_c = min(t, t_clamp)

(the score is s = -(x_t + (1 - t) v) / t, so the drift is -v + σ_t²/2 s in the direction of
decreasing t). Each step is Gaussian, x_{t'} | x_t ~ N(μ, std² I) with std = σ_t sqrt(Δ), so

    log p(x_{t'} | x_t) = -||x_{t'} - μ||² / (2 std²) - D log std - (D/2) log 2π

(summed over the D elements; ``reduction="mean"`` divides by D, the per-element average the
released Flow-GRPO code uses for its ratios). Steps outside the training window are plain ODE
(Euler) steps with no log-probability. The arithmetic of the update and of the log-probability is
fp32 (fp64 for fp64 inputs) whatever the network's dtype.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Literal

import torch
from torch import Tensor

from flowalign.flow import expand_t
from flowalign.sampling.samplers import VelocityFn

__all__ = [
    "SDETrajectory",
    "sample_sde",
    "sde_sigma",
    "sde_step_log_prob",
    "sde_step_mean_std",
    "step_log_prob",
]

LogProbReduction = Literal["mean", "sum"]


def _dtype(x: Tensor) -> torch.dtype:
    return torch.promote_types(x.dtype, torch.float32)


def sde_sigma(t: Tensor, eta: float, *, t_clamp: float = 0.98) -> Tensor:
    """σ_t = η sqrt(t_c / (1 - t_c)) with t_c = min(t, t_clamp) (finite at t = 1, 0 at t = 0).

    Any σ_t gives the ODE's marginals in continuous time; the clamp only bounds the first step's noise.
    """
    if not (math.isfinite(eta) and eta >= 0):
        raise ValueError(f"sde: eta must be a finite number >= 0, got {eta!r}")
    if not 0 < t_clamp < 1:
        raise ValueError(f"sde: t_clamp must be in (0, 1), got {t_clamp!r}")
    tc = t.to(_dtype(t)).clamp(0.0, t_clamp)
    return eta * torch.sqrt(tc / (1 - tc))


def sde_step_mean_std(
    x: Tensor, v: Tensor, t: Tensor, t_next: Tensor, *, eta: float, t_clamp: float = 0.98
) -> tuple[Tensor, Tensor]:
    """Mean μ [B, ...] and standard deviation std [B] of x_{t_next} | x_t (module docstring).

    Args:
        x: x_t [B, ...]; v: the velocity at (x_t, t) [B, ...] (CFG-combined if sampling uses CFG).
        t: [B] or scalar current time; t_next: [B] or scalar, t_next < t.
        eta: noise level η (0: the Euler ODE step).
        t_clamp: see :func:`sde_sigma`.

    Returns:
        (mean [B, ...] in fp32/fp64, std [B] in the same dtype).
    """
    dtype = torch.promote_types(_dtype(x), v.dtype)
    x, v = x.to(dtype), v.to(dtype)
    t = torch.as_tensor(t, dtype=dtype, device=x.device).expand(x.shape[0])
    t_next = torch.as_tensor(t_next, dtype=dtype, device=x.device).expand(x.shape[0])
    delta = t - t_next  # > 0
    sigma = sde_sigma(t, eta, t_clamp=t_clamp)
    # sigma^2 / (2t) is finite at t -> 0 (sigma^2 ~ eta^2 t); guard the 0/0 of an exact t = 0
    coef = torch.where(t > 0, sigma.pow(2) / (2 * t.clamp_min(torch.finfo(dtype).tiny)), 0.0)
    tt = expand_t(t, x)
    drift = v + expand_t(coef, x) * (x + (1 - tt) * v)
    mean = x - expand_t(delta, x) * drift
    return mean, sigma * delta.sqrt()


def step_log_prob(
    x_next: Tensor, mean: Tensor, std: Tensor, *, reduction: LogProbReduction = "mean"
) -> Tensor:
    """Gaussian log N(x_next; mean, std² I) per sample [B]: summed over elements, or their mean.

    Raises:
        ValueError: unknown reduction or a std that is not > 0.
    """
    if reduction not in ("mean", "sum"):
        raise ValueError(f"step_log_prob: reduction must be 'mean' or 'sum', got {reduction!r}")
    if not bool((std > 0).all()):
        raise ValueError("step_log_prob: std must be > 0 (a step with eta = 0 or into t = t has no density)")
    dtype = torch.promote_types(mean.dtype, torch.float32)
    diff = (x_next.to(dtype) - mean.to(dtype)).flatten(1)
    std = std.to(dtype)
    per_elem = -diff.pow(2) / (2 * std[:, None].pow(2)) - std.log()[:, None] - 0.5 * math.log(2 * math.pi)
    return per_elem.sum(1) if reduction == "sum" else per_elem.mean(1)


def sde_step_log_prob(
    x: Tensor,
    x_next: Tensor,
    v: Tensor,
    t: Tensor,
    t_next: Tensor,
    *,
    eta: float,
    t_clamp: float = 0.98,
    reduction: LogProbReduction = "mean",
) -> tuple[Tensor, Tensor, Tensor]:
    """(log p(x_next | x_t) [B], mean [B, ...], std [B]) of one SDE step under velocity ``v``.

    Training recomputes this with the policy's velocity (with gradient) on a stored transition.
    """
    mean, std = sde_step_mean_std(x, v, t, t_next, eta=eta, t_clamp=t_clamp)
    return step_log_prob(x_next, mean, std, reduction=reduction), mean, std


@dataclass
class SDETrajectory:
    """What :func:`sample_sde` returns.

    Attributes:
        x0: the final sample [B, ...].
        latents: x at every grid point of the window's steps: ``latents[j]`` is x_{ts[window[j]]},
            ``next_latents[j]`` is x_{ts[window[j] + 1]} (each [B, ...]).
        log_probs: [B, len(window)] log-probability of each window step under the sampling policy.
        window: the indices i of the SDE steps (ts[i] -> ts[i + 1]).
    """

    x0: Tensor
    latents: list[Tensor]
    next_latents: list[Tensor]
    log_probs: Tensor
    window: list[int]


def _check_window(window: Sequence[int] | None, num_steps: int) -> list[int]:
    if window is None:
        return list(range(num_steps))
    out = sorted({int(i) for i in window})
    if out and (out[0] < 0 or out[-1] >= num_steps):
        raise ValueError(f"sample_sde: window steps must be in [0, {num_steps - 1}], got {list(window)}")
    return out


def sample_sde(
    v_fn: VelocityFn,
    noise: Tensor,
    ts: Tensor,
    *,
    eta: float,
    step_noise: Tensor | None = None,
    generator: torch.Generator | None = None,
    window: Sequence[int] | None = None,
    t_clamp: float = 0.98,
    reduction: LogProbReduction = "mean",
) -> SDETrajectory:
    """Integrate from ``noise`` at ts[0] to ts[-1]: SDE steps on ``window``, Euler ODE steps elsewhere.

    Args:
        v_fn: (x [B, ...], t [B]) -> v (guidance already applied).
        noise: x at ts[0] [B, ...].
        ts: decreasing grid [N + 1].
        eta: noise level η of the window steps.
        step_noise: z of every step, [N, B, ...] standard normal (only window rows are used); or None
            to draw them from ``generator``. Passing them keeps the draws independent of batching.
        window: indices of the SDE steps (default all N).
        t_clamp, reduction: see :func:`sde_sigma` and :func:`step_log_prob`.

    Returns:
        An :class:`SDETrajectory` (x in fp32, or fp64 for fp64 noise).
    """
    num_steps = len(ts) - 1
    steps = _check_window(window, num_steps)
    if step_noise is not None and tuple(step_noise.shape) != (num_steps, *noise.shape):
        raise ValueError(
            f"sample_sde: step_noise must be [N={num_steps}, *noise.shape], got {tuple(step_noise.shape)}"
        )
    dtype = _dtype(noise)
    x = noise.to(dtype)
    latents, next_latents, log_probs = [], [], []
    active = set(steps)
    for i in range(num_steps):
        t_batch = ts[i].to(x.device).expand(x.shape[0])
        v = v_fn(x, t_batch).to(dtype)
        if i not in active:
            x = x + (ts[i + 1] - ts[i]).to(dtype) * v
            continue
        mean, std = sde_step_mean_std(x, v, ts[i], ts[i + 1], eta=eta, t_clamp=t_clamp)
        z = step_noise[i] if step_noise is not None else torch.randn(x.shape, generator=generator)
        x_next = mean + expand_t(std, mean) * z.to(device=x.device, dtype=dtype)
        latents.append(x)
        next_latents.append(x_next)
        log_probs.append(step_log_prob(x_next, mean, std, reduction=reduction))
        x = x_next
    lp = torch.stack(log_probs, 1) if log_probs else x.new_zeros(x.shape[0], 0)
    return SDETrajectory(x0=x, latents=latents, next_latents=next_latents, log_probs=lp, window=steps)
