"""Regression warm start of a one-step generator on its teacher's ODE outputs (docs/algorithms.md 2.6).

The first ``regression_steps`` optimizer steps of a one-step run update the generator alone on

    L_reg = mean_pixels (G(z, c) - ODE_teacher(z, c))^2

where ``ODE_teacher`` integrates the teacher's probability-flow ODE from the same noise z at t = 1 to
t = 0 with ``regression_teacher_steps`` Euler steps on a uniform grid and the teacher's CFG. The
distribution-matching loss then starts from a generator whose samples already lie near the teacher's
(the teacher copy called once at t = 1 gives the blurred conditional mean instead).
"""

from __future__ import annotations

import torch
from torch import Tensor

from flowalign import flow
from flowalign.models.base import PromptEmbeds

__all__ = ["regression_loss", "teacher_ode_x0"]


def teacher_ode_x0(
    method, z: Tensor, cond: PromptEmbeds, uncond: PromptEmbeds | None, num_steps: int
) -> Tensor:
    """Euler integration of the teacher ODE dx/dt = v(x, t) from x(1) = z to x(0), no grad.

    Args:
        method: a :class:`flowalign.training.methods.onestep_common.OneStepDistillation` (its
            ``teacher_velocity`` applies the CFG).
        z: noise [B, ...] in canonical latent shape.
        cond, uncond: prompt embeddings (uncond None without CFG).
        num_steps: Euler steps (t_k = 1 - k / num_steps).

    Returns:
        x(0) [B, ...].
    """
    if num_steps < 1:
        raise ValueError(f"regression_teacher_steps must be >= 1, got {num_steps}")
    x = z
    with torch.no_grad():
        for k in range(num_steps):
            t = torch.full((z.shape[0],), 1.0 - k / num_steps, device=z.device, dtype=torch.float32)
            v = method.teacher_velocity(x, t, cond, uncond)
            x = x - v.to(x.dtype) / num_steps  # x(t - dt) = x(t) - dt v, dt = 1 / num_steps
    return x


def regression_loss(method, batch, ctx) -> tuple[Tensor, dict[str, Tensor]]:
    """Per-sample L_reg [B] of the generator on the teacher's ODE output from the same noise."""
    ids = batch.index
    cond, uncond = method.encode(batch.prompt, with_uncond=method.uses_cfg, images=batch.condition)
    shape = method.teacher.latent_shape(len(ids), method.height, method.width, method.num_frames)
    z = ctx.randn(shape[1:], ids, key="regression/z").to(ctx.device)
    target = teacher_ode_x0(method, z, cond, uncond, method.common.regression_teacher_steps)
    # the generator's one call at t = 1 (as ``onestep_common.generate_x0``): x = z - v_G(z, 1, c)
    t_one = torch.ones(z.shape[0], device=z.device, dtype=torch.float32)
    v = method.teacher.velocity(
        z, t_one, cond, guidance=method.embedded_guidance, net=ctx.module("generator")
    )
    x = flow.x0_from_velocity(z, v, t_one)
    loss = (x - target.to(x.dtype)).pow(2).flatten(1).mean(dim=1)
    return loss, {"regression_loss": loss.detach().mean()}
