"""The one time convention of flowalign (rectified flow, the SD3/FLUX/Wan convention).

    x_t = (1 - t) * x0 + t * noise,   t in [0, 1],   t = 1 is pure noise,
    v   = dx_t/dt = noise - x0        (what every network here predicts).

Scheduler values are called ``timesteps`` and equal ``t * num_train_timesteps`` (1000 for every
supported family). Everything outside ``flowalign.models`` works with ``t``; adapters convert.

Conversions (docs/algorithms.md 0.1), exact for the conditional expectations a network estimates:

    x0_hat    = x_t - t * v_hat
    noise_hat = x_t + (1 - t) * v_hat
    score     = -noise_hat / t = -(x_t + (1 - t) * v_hat) / t
    v_hat     = -(x_t + t * score) / (1 - t)
"""

from __future__ import annotations

import math
from typing import Literal

import torch
from torch import Tensor

NUM_TRAIN_TIMESTEPS = 1000

TimeDensity = Literal["logit_normal", "uniform", "mode"]


def expand_t(t: Tensor | float, like: Tensor) -> Tensor:
    """Broadcast ``t`` ([B] or scalar) against ``like`` ([B, ...]) as [B, 1, ..., 1]."""
    t = torch.as_tensor(t, dtype=like.dtype, device=like.device)
    if t.ndim == 0:
        return t
    return t.reshape(t.shape[0], *([1] * (like.ndim - 1)))


def interpolate(x0: Tensor, noise: Tensor, t: Tensor | float) -> Tensor:
    """x_t = (1 - t) x0 + t noise. x0, noise: [B, ...]; t: [B] or scalar in [0, 1]."""
    tt = expand_t(t, x0)
    return (1 - tt) * x0 + tt * noise


def velocity_target(x0: Tensor, noise: Tensor) -> Tensor:
    """The regression target v = noise - x0 (independent of t)."""
    return noise - x0


def x0_from_velocity(x_t: Tensor, v: Tensor, t: Tensor | float) -> Tensor:
    """x0_hat = x_t - t v_hat."""
    return x_t - expand_t(t, x_t) * v


def noise_from_velocity(x_t: Tensor, v: Tensor, t: Tensor | float) -> Tensor:
    """noise_hat = x_t + (1 - t) v_hat."""
    return x_t + (1 - expand_t(t, x_t)) * v


def score_from_velocity(x_t: Tensor, v: Tensor, t: Tensor | float) -> Tensor:
    """score = grad log p_t(x_t) = -(x_t + (1 - t) v_hat) / t. Undefined at t = 0."""
    return -noise_from_velocity(x_t, v, t) / expand_t(t, x_t)


def velocity_from_score(x_t: Tensor, score: Tensor, t: Tensor | float) -> Tensor:
    """v_hat = -(x_t + t score) / (1 - t). Undefined at t = 1."""
    tt = expand_t(t, x_t)
    return -(x_t + tt * score) / (1 - tt)


def velocity_from_x0(x_t: Tensor, x0: Tensor, t: Tensor | float) -> Tensor:
    """v_hat = (x_t - x0_hat) / t, the inverse of :func:`x0_from_velocity`. Undefined at t = 0."""
    return (x_t - x0) / expand_t(t, x_t)


def t_to_timesteps(t: Tensor, num_train_timesteps: int = NUM_TRAIN_TIMESTEPS) -> Tensor:
    """Scheduler timesteps (diffusers: sigma * num_train_timesteps) from t."""
    return t * num_train_timesteps


def timesteps_to_t(timesteps: Tensor, num_train_timesteps: int = NUM_TRAIN_TIMESTEPS) -> Tensor:
    """The inverse of :func:`t_to_timesteps`."""
    return timesteps / num_train_timesteps


def shift_time(t: Tensor, shift: float) -> Tensor:
    """SD3 static time shift: t' = s t / (1 + (s - 1) t) (Esser et al. 2024, eq. 23).

    Maps 0 -> 0 and 1 -> 1, is monotone, the identity for s = 1; s > 1 moves mass to high noise.
    """
    if shift <= 0:
        raise ValueError(f"shift must be > 0, got {shift}")
    return shift * t / (1 + (shift - 1) * t)


def shift_time_exponential(t: Tensor, mu: float, sigma: float = 1.0) -> Tensor:
    """FLUX resolution-dependent shift: t' = e^mu / (e^mu + (1/t - 1)^sigma).

    Equal to :func:`shift_time` with s = e^mu when sigma = 1. t = 0 maps to 0.
    """
    t = torch.as_tensor(t)
    out = math.exp(mu) / (math.exp(mu) + (1 / t.clamp_min(torch.finfo(t.dtype).tiny) - 1) ** sigma)
    return torch.where(t <= 0, torch.zeros_like(out), out)


def flux_mu(
    image_seq_len: int,
    *,
    base_seq_len: int = 256,
    max_seq_len: int = 4096,
    base_shift: float = 0.5,
    max_shift: float = 1.15,
) -> float:
    """FLUX's mu: linear in the image-token count between (base_seq_len, base_shift) and (max_seq_len, max_shift)."""
    slope = (max_shift - base_shift) / (max_seq_len - base_seq_len)
    return image_seq_len * slope + (base_shift - slope * base_seq_len)


def t_from_draws(
    normal: Tensor,
    uniform: Tensor,
    *,
    density: TimeDensity = "logit_normal",
    logit_mean: float = 0.0,
    logit_std: float = 1.0,
    mode_scale: float = 1.29,
    shift: float = 1.0,
) -> Tensor:
    """Map standard-normal and uniform draws (same shape) to training times; see :func:`sample_t`.

    Lets callers that draw per-sample random numbers (the training loop's StepContext) use the same
    densities as :func:`sample_t`.
    """
    if density == "logit_normal":
        t = torch.sigmoid(normal * logit_std + logit_mean)
    elif density == "uniform":
        t = uniform
    elif density == "mode":
        t = 1 - uniform - mode_scale * (torch.cos(math.pi * uniform / 2) ** 2 - 1 + uniform)
    else:
        raise ValueError(f"unknown time density {density!r}; expected one of logit_normal, uniform, mode")
    return shift_time(t, shift) if shift != 1.0 else t


def sample_t(
    batch_size: int,
    *,
    density: TimeDensity = "logit_normal",
    logit_mean: float = 0.0,
    logit_std: float = 1.0,
    mode_scale: float = 1.29,
    shift: float = 1.0,
    generator: torch.Generator | None = None,
    device: torch.device | str | None = None,
) -> Tensor:
    """Draw training times t in (0, 1) (docs/algorithms.md 5.2).

    - "logit_normal": t = sigmoid(n), n ~ N(logit_mean, logit_std^2) (SD3's rf/lognorm(0, 1)).
    - "mode": t = 1 - u - mode_scale (cos^2(pi u / 2) - 1 + u), u ~ U(0, 1).
    - "uniform": t ~ U(0, 1).
    Then the static shift s is applied (s = 1: none). Returns float32 [batch_size].
    """
    normal = torch.randn(batch_size, generator=generator, device=device)
    uniform = torch.rand(batch_size, generator=generator, device=device)
    return t_from_draws(
        normal,
        uniform,
        density=density,
        logit_mean=logit_mean,
        logit_std=logit_std,
        mode_scale=mode_scale,
        shift=shift,
    )
