"""Pieces shared by the flow-model methods: training-time sampling and frozen-reference handling."""

from __future__ import annotations

import copy
from contextlib import contextmanager
from dataclasses import dataclass

import torch
from torch import Tensor, nn

from flowalign import flow
from flowalign.config import LoraConfig
from flowalign.models.base import FlowModel
from flowalign.training.distributed import SHARD_FROZEN
from flowalign.training.lora import adapters_disabled, add_lora, has_lora
from flowalign.training.method import StepContext


@dataclass
class TimeSampling:
    """How training times are drawn (algorithms.md 5.2)."""

    time_density: str = "logit_normal"
    """"logit_normal", "uniform" or "mode"."""
    logit_mean: float = 0.0
    logit_std: float = 1.0
    time_shift: float = 1.0
    """Static shift applied to the sampled t (3.0 matches SD3.5's shifted training table)."""


def sample_training_t(cfg: TimeSampling, ids: Tensor, ctx: StepContext, *, key: str = "t") -> Tensor:
    """One t per sample id, drawn through the step context (deterministic, split-independent). [B]."""
    return flow.t_from_draws(
        ctx.randn((), ids, key=f"{key}_normal"),
        ctx.rand((), ids, key=f"{key}_uniform"),
        density=cfg.time_density,
        logit_mean=cfg.logit_mean,
        logit_std=cfg.logit_std,
        shift=cfg.time_shift,
    ).to(ctx.device)


def freeze_all_but_transformer(model: FlowModel, lora: LoraConfig | None) -> None:
    """Freeze every component; then either attach LoRA to the transformer or make it fully trainable."""
    for module in model.modules().values():
        module.requires_grad_(False).eval()
    if lora is not None:
        if not has_lora(model.transformer):
            add_lora(model.transformer, lora)
    else:
        model.transformer.requires_grad_(True)
    model.transformer.train()


class FrozenReference:
    """The reference velocity network of preference methods.

    With LoRA the reference is the policy with its adapters disabled (no second copy in memory). Under
    FSDP2 the policy is sharded in place, so this runs the sharded module (its forward gathers the
    base weights); under DeepSpeed ZeRO-3 the engine's hooks on the module gather them.
    For a full fine-tune it is a frozen deep copy of the initial transformer, marked so that FSDP2 runs
    shard it like the policy instead of keeping a whole copy on every process.
    """

    def __init__(self, transformer: nn.Module):
        self.uses_adapters = has_lora(transformer)
        self.copy: nn.Module | None = None
        if not self.uses_adapters:
            self.copy = copy.deepcopy(transformer).requires_grad_(False).eval()
            setattr(self.copy, SHARD_FROZEN, True)

    @contextmanager
    def network(self, policy: nn.Module):
        """The reference network to call inside the block (``policy`` is the unwrapped transformer)."""
        if self.uses_adapters:
            with adapters_disabled(policy):
                yield policy
        else:
            yield self.copy


def drop_captions(prompts, ids: Tensor, ctx: StepContext, probability: float) -> list[str]:
    """Each prompt replaced by "" with ``probability`` (caption dropout, so CFG's unconditional branch
    trains too); the draw is keyed by the sample ids, so it does not depend on the batch layout."""
    drop = ctx.rand((), ids, key="caption_dropout") < probability
    return ["" if d else p for p, d in zip(prompts, drop.tolist(), strict=True)]


@torch.no_grad()
def encode_frozen_prompts(model: FlowModel, prompts: list[str]):
    """Prompt embeddings with frozen text encoders (no graph kept)."""
    cond, _ = model.encode_prompt(prompts)
    return cond
