"""Time grids for flow sampling.

A grid is a decreasing float32 tensor ``[N + 1]`` of t values from (about) 1 to exactly 0. The
family's own diffusers scheduler computes it, so our samplers walk the same t values as the
family's diffusers pipeline (including SD3's static shift and FLUX's resolution-dependent shift).
"""

from __future__ import annotations

import copy

import numpy as np
import torch
from diffusers import FlowMatchEulerDiscreteScheduler
from torch import Tensor

from flowalign.flow import flux_mu, shift_time


def scheduler_time_grid(
    scheduler: FlowMatchEulerDiscreteScheduler,
    num_inference_steps: int,
    *,
    mu: float | None = None,
    sigmas: list[float] | np.ndarray | None = None,
    device: torch.device | str | None = None,
) -> Tensor:
    """The t grid ``[N + 1]`` that ``scheduler.set_timesteps`` produces (the scheduler is not modified)."""
    if num_inference_steps < 1:
        raise ValueError(f"num_inference_steps must be >= 1, got {num_inference_steps}")
    scheduler = copy.deepcopy(scheduler)
    scheduler.set_timesteps(num_inference_steps, device=device, sigmas=sigmas, mu=mu)
    return scheduler.sigmas.to(torch.float32)


def flux_time_grid(
    scheduler: FlowMatchEulerDiscreteScheduler,
    num_inference_steps: int,
    *,
    image_seq_len: int,
    device: torch.device | str | None = None,
) -> Tensor:
    """FLUX: sigmas = linspace(1, 1/N, N), shifted by mu(image tokens) from the scheduler's config."""
    config = scheduler.config
    mu = flux_mu(
        image_seq_len,
        base_seq_len=config.get("base_image_seq_len", 256),
        max_seq_len=config.get("max_image_seq_len", 4096),
        base_shift=config.get("base_shift", 0.5),
        max_shift=config.get("max_shift", 1.15),
    )
    sigmas = np.linspace(1.0, 1 / num_inference_steps, num_inference_steps)
    if config.get("use_flow_sigmas", False):
        sigmas = None
    return scheduler_time_grid(scheduler, num_inference_steps, mu=mu, sigmas=sigmas, device=device)


def uniform_time_grid(num_inference_steps: int, *, shift: float = 1.0, device=None) -> Tensor:
    """Plain grid linspace(1, 0, N + 1), optionally shifted (for models without a scheduler config)."""
    if num_inference_steps < 1:
        raise ValueError(f"num_inference_steps must be >= 1, got {num_inference_steps}")
    ts = torch.linspace(1.0, 0.0, num_inference_steps + 1, device=device)
    return shift_time(ts, shift) if shift != 1.0 else ts
