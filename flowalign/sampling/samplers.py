"""Stateless flow ODE samplers.

A sampler integrates dx/dt = v(x, t) from ``ts[0]`` (about 1, noise) to ``ts[-1]`` (0, data) on
a given grid. It holds no state, so it serves no-grad generation and backprop through sampling
alike. Guidance (CFG, reward guidance) enters as transforms of the velocity function.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable

import torch
from torch import Tensor

VelocityFn = Callable[[Tensor, Tensor], Tensor]
"""(x [B, ...], t [B]) -> v [B, ...]."""

StepCallback = Callable[[int, Tensor, Tensor], None]
"""(step index, t [B], x after the step) -> None."""


def _progress(steps: Iterable, progress: bool | None):
    if not progress:
        return steps
    from tqdm.auto import tqdm

    return tqdm(steps, desc="sampling", leave=False)


def euler_step(v_fn: VelocityFn, x: Tensor, t_now: Tensor, t_next: Tensor) -> Tensor:
    """One Euler step x + (t_next - t_now) v(x, t_now), with the update in fp32 (as diffusers does)."""
    t_batch = t_now.to(x.device).expand(x.shape[0])
    v = v_fn(x, t_batch)
    x_next = x.to(torch.float32) + (t_next - t_now).to(torch.float32) * v.to(torch.float32)
    return x_next.to(v.dtype)


def sample_euler(
    v_fn: VelocityFn,
    noise: Tensor,
    ts: Tensor,
    *,
    callback: StepCallback | None = None,
    progress: bool | None = False,
) -> Tensor:
    """Euler integration on the grid ``ts`` [N + 1] (decreasing). Returns x at ``ts[-1]``."""
    x = noise
    for i in _progress(range(len(ts) - 1), progress):
        x = euler_step(v_fn, x, ts[i], ts[i + 1])
        if callback is not None:
            callback(i, ts[i + 1].expand(x.shape[0]), x)
    return x


def sample_heun(
    v_fn: VelocityFn,
    noise: Tensor,
    ts: Tensor,
    *,
    callback: StepCallback | None = None,
    progress: bool | None = False,
) -> Tensor:
    """Heun's second-order method (Karras et al. 2022, Algorithm 1 without churn).

    Two velocity evaluations per step except the last one into t = 0, which is a plain Euler step
    (the velocity is not evaluated at t = 0).
    """
    x = noise
    for i in _progress(range(len(ts) - 1), progress):
        t_now, t_next = ts[i], ts[i + 1]
        dt = (t_next - t_now).to(torch.float32)
        v_now = v_fn(x, t_now.expand(x.shape[0])).to(torch.float32)
        x_euler = x.to(torch.float32) + dt * v_now
        if t_next > 0:
            v_next = v_fn(x_euler.to(x.dtype), t_next.expand(x.shape[0])).to(torch.float32)
            x_euler = x.to(torch.float32) + dt * 0.5 * (v_now + v_next)
        x = x_euler.to(x.dtype)
        if callback is not None:
            callback(i, t_next.expand(x.shape[0]), x)
    return x


def sample_one_step(v_fn: VelocityFn, noise: Tensor, *, t: float = 1.0) -> Tensor:
    """One-step generation x0 = x_t - t v(x_t, t) (exact for a one-step generator's prediction)."""
    t_batch = torch.full((noise.shape[0],), t, device=noise.device, dtype=torch.float32)
    v = v_fn(noise, t_batch)
    return (noise.to(torch.float32) - t * v.to(torch.float32)).to(v.dtype)


SAMPLERS: dict[str, Callable[..., Tensor]] = {"euler": sample_euler, "heun": sample_heun}


def get_sampler(name: str) -> Callable[..., Tensor]:
    if name not in SAMPLERS:
        raise ValueError(f"unknown sampler {name!r}; expected one of {sorted(SAMPLERS)}")
    return SAMPLERS[name]
