"""Noise schedule and DDIM sampling of the CDT diffusion decoder (docs/algorithms.md 4.1, 4.3).

Discrete cosine schedule (Nichol & Dhariwal 2021) with T = 8192 steps by default, the DDP/DDIM
convention x_i = sqrt(abar_i) x0 + sqrt(1 - abar_i) eps (index i = T - 1 is almost pure noise), and
deterministic DDIM (eta = 0) driven by x0 predictions. These are the released code's conventions;
they are not flowalign's rectified-flow time (flowalign.flow) because CDT is a DDPM-style model.
"""

from __future__ import annotations

import math
from functools import lru_cache

import torch
from torch import Tensor

__all__ = ["cosine_alphas_cumprod", "ddim_step", "ddim_timesteps", "initial_noise"]


@lru_cache(maxsize=8)
def _alphas_cumprod_cpu(num_timesteps: int, s: float) -> Tensor:
    steps = torch.arange(num_timesteps + 1, dtype=torch.float64) / num_timesteps
    f = torch.cos((steps + s) / (1 + s) * math.pi / 2) ** 2
    betas = (1 - f[1:] / f[:-1]).clamp(0.0, 0.999)
    return torch.cumprod(1 - betas, dim=0)


def cosine_alphas_cumprod(num_timesteps: int, *, s: float = 0.008) -> Tensor:
    """abar_i for i = 0 .. T-1 of the cosine schedule (Nichol & Dhariwal 2021), float64 [T].

    abar(u) = f(u) / f(0), f(u) = cos^2((u + s) / (1 + s) * pi / 2), u = i / T; betas
    1 - abar_{i+1} / abar_i are clipped at 0.999 and abar is re-accumulated from them.
    """
    return _alphas_cumprod_cpu(int(num_timesteps), float(s)).clone()


def ddim_timesteps(num_train_timesteps: int, num_inference_steps: int) -> Tensor:
    """Ascending DDIM indices: linspace(0, T-1, S) rounded down; S = 1 gives [T - 1] (released code)."""
    if num_inference_steps < 1:
        raise ValueError(f"num_inference_steps must be >= 1, got {num_inference_steps}")
    if num_inference_steps == 1:
        return torch.tensor([num_train_timesteps - 1])
    return torch.linspace(0, num_train_timesteps - 1, num_inference_steps).long()


def ddim_step(x_t: Tensor, x0_pred: Tensor, alpha_bar: float, alpha_bar_prev: float) -> Tensor:
    """One deterministic DDIM update (eta = 0) from an x0 prediction.

        eps_hat = (x_t - sqrt(abar) x0) / sqrt(1 - abar)
        x_prev  = sqrt(abar_prev) x0 + sqrt(1 - abar_prev) eps_hat

    With abar_prev = 1 (the last step) this returns x0_pred exactly.
    """
    eps = (x_t - math.sqrt(alpha_bar) * x0_pred) / math.sqrt(1.0 - alpha_bar)
    return math.sqrt(alpha_bar_prev) * x0_pred + math.sqrt(1.0 - alpha_bar_prev) * eps


def initial_noise(
    batch: int,
    num_frames: int,
    height: int,
    width: int,
    *,
    generator: torch.Generator | None = None,
    device: torch.device | str = "cpu",
    dtype: torch.dtype = torch.float32,
    channels: int = 3,
) -> Tensor:
    """Standard normal noise [B, C, T, H, W] drawn frame by frame from ``generator``.

    Frame-by-frame drawing makes the noise of a chunk independent of how the clip is chunked:
    drawing frames 0..a then a+1..b gives the same numbers as drawing 0..b at once. The numbers
    are drawn on the generator's device (CPU without one) and then moved to ``device``.
    """
    where = generator.device if generator is not None else "cpu"
    frames = [
        torch.randn((batch, channels, height, width), generator=generator, dtype=torch.float32, device=where)
        for _ in range(num_frames)
    ]
    return torch.stack(frames, dim=2).to(device=device, dtype=dtype)
