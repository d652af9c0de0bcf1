"""Guidance as velocity transforms: classifier-free guidance and the hook reward guidance uses.

Samplers take one :data:`VelocityFn`; guidance wraps it. CFG at scale 1 returns the conditional
prediction itself, so the unguided sampler is reproduced exactly.
"""

from __future__ import annotations

from collections.abc import Callable

import torch
from torch import Tensor

from flowalign.models.base import FlowModel, PromptEmbeds
from flowalign.sampling.samplers import VelocityFn

VelocityTransform = Callable[[VelocityFn], VelocityFn]


def cfg_combine(v_uncond: Tensor, v_cond: Tensor, scale: float) -> Tensor:
    """v = v_uncond + w (v_cond - v_uncond) (Ho & Salimans 2022; the SD3 pipeline's form)."""
    return v_uncond + scale * (v_cond - v_uncond)


def model_velocity_fn(
    model: FlowModel,
    cond: PromptEmbeds,
    *,
    uncond: PromptEmbeds | None = None,
    guidance_scale: float = 1.0,
    embedded_guidance: float | None = None,
    net: torch.nn.Module | None = None,
) -> VelocityFn:
    """Velocity function of ``model`` under ``cond``, with classifier-free guidance when ``uncond`` is given.

    The conditional and unconditional branches run in one batched forward ([uncond, cond] on the
    batch axis). With ``guidance_scale == 1`` or no ``uncond`` only the conditional branch runs.
    """
    use_cfg = uncond is not None and guidance_scale != 1.0
    both = PromptEmbeds.cat([uncond, cond]) if use_cfg else None

    def velocity(x: Tensor, t: Tensor) -> Tensor:
        if not use_cfg:
            return model.velocity(x, t, cond, guidance=embedded_guidance, net=net)
        v = model.velocity(torch.cat([x, x]), torch.cat([t, t]), both, guidance=embedded_guidance, net=net)
        v_uncond, v_cond = v.chunk(2)
        return model.combine_guidance(
            v_uncond, v_cond, guidance_scale
        )  # cfg_combine unless the family rescales

    return velocity


def apply_transforms(v_fn: VelocityFn, transforms: list[VelocityTransform] | None) -> VelocityFn:
    """Wrap ``v_fn`` by each transform in order (the last one is outermost)."""
    for transform in transforms or []:
        v_fn = transform(v_fn)
    return v_fn
