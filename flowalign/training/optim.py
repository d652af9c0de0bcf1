"""AdamW (torch, or 8-bit from bitsandbytes) per parameter group and its learning-rate schedule (warm-up, then constant/linear/cosine)."""

from __future__ import annotations

import functools
import math

import torch
from torch import nn

from flowalign.config import OptimConfig

__all__ = ["adamw_8bit", "build_lr_scheduler", "build_optimizer", "lr_multiplier"]


def build_optimizer(
    params: list[nn.Parameter], cfg: OptimConfig, *, device: torch.device
) -> torch.optim.Optimizer:
    """AdamW over ``params`` with ``cfg``: torch's (the fused kernel on CUDA when ``cfg.fused`` is None)
    or, for ``cfg.optimizer == "adamw8bit"``, bitsandbytes' 8-bit AdamW (:func:`adamw_8bit`)."""
    if cfg.optimizer == "adamw8bit":
        return adamw_8bit(params, cfg)
    if cfg.optimizer != "adamw":
        raise ValueError(f"train.optim.optimizer must be 'adamw' or 'adamw8bit', got {cfg.optimizer!r}")
    fused = cfg.fused if cfg.fused is not None else device.type == "cuda"
    return torch.optim.AdamW(
        params,
        lr=cfg.lr,
        betas=tuple(cfg.betas),
        weight_decay=cfg.weight_decay,
        eps=cfg.eps,
        fused=fused or None,
    )


def adamw_8bit(params: list[nn.Parameter], cfg: OptimConfig) -> torch.optim.Optimizer:
    """bitsandbytes' ``AdamW8bit``: the same update as AdamW, with m and v kept block-wise quantised
    to 8 bits between steps (dynamic quantisation, blocks of 256; tensors under 4096 elements keep
    32-bit state).

    Raises:
        ValueError: bitsandbytes is not installed (names the extra), or it cannot run here.
    """
    try:
        import bitsandbytes as bnb
    except ImportError as exc:
        raise ValueError(
            "train.optim.optimizer=adamw8bit needs bitsandbytes: pip install 'flowalign[bitsandbytes]'"
        ) from exc
    except Exception as exc:  # a broken native library fails at import with various errors
        raise ValueError(f"train.optim.optimizer=adamw8bit: bitsandbytes cannot load here ({exc})") from exc
    return bnb.optim.AdamW8bit(
        params, lr=cfg.lr, betas=tuple(cfg.betas), eps=cfg.eps, weight_decay=cfg.weight_decay
    )


def lr_multiplier(step: int, *, schedule: str, warmup_steps: int, max_steps: int) -> float:
    """LR factor at ``step`` (0-based): linear warm-up ``step / warmup_steps``, then

    constant: 1;  linear: 1 - p;  cosine: 0.5 (1 + cos(pi p)),  p = (step - warmup) / (max_steps - warmup),

    never below 0: the curves of diffusers.optimization's constant_with_warmup / linear / cosine
    (a test pins them to ``get_scheduler``), without importing diffusers into the loop.
    """
    if step < warmup_steps:
        return step / max(1, warmup_steps)
    if schedule == "constant":
        return 1.0
    progress = (step - warmup_steps) / max(1, max_steps - warmup_steps)
    if schedule == "linear":
        return max(0.0, 1.0 - progress)
    if schedule == "cosine":
        return max(0.0, 0.5 * (1.0 + math.cos(math.pi * progress)))
    raise ValueError(f"unknown LR schedule {schedule!r}; expected constant, linear or cosine")


def build_lr_scheduler(
    optimizer: torch.optim.Optimizer, cfg: OptimConfig, *, max_steps: int
) -> torch.optim.lr_scheduler.LambdaLR:
    """``LambdaLR`` following :func:`lr_multiplier`; the loop steps it once per optimizer step, skipped or not."""
    fn = functools.partial(
        lr_multiplier, schedule=cfg.schedule, warmup_steps=cfg.warmup_steps, max_steps=max_steps
    )
    return torch.optim.lr_scheduler.LambdaLR(optimizer, fn)
