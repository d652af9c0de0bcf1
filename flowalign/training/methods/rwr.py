"""Flow-RWR: reward-weighted flow matching on scored samples (docs/algorithms.md 1C).

    L = E[ w(x0, c) || (noise - x0) - v(x_t, t, c) ||^2 ],   w = softmax_group(r / beta) * group size, clipped.

The weights are computed once over the whole dataset (per prompt group) by
:func:`flowalign.objectives.rwr.rwr_weights` and stored on the items, so a batch needs no group
members beside each other.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path

import torch
from torch import nn
from torch.utils.data import Dataset

from flowalign import flow
from flowalign.config import ALLOW_INF, LoraConfig
from flowalign.data.batches import MediaBatch
from flowalign.models.base import FlowModel
from flowalign.objectives.flow_matching import per_sample_mse
from flowalign.objectives.rwr import flow_rwr_loss, rwr_weights
from flowalign.training.method import Method, StepContext
from flowalign.training.methods.common import (
    CachedPrompts,
    TimeSampling,
    drop_captions,
    freeze_all_but_transformer,
    sample_training_t,
)
from flowalign.training.methods.dpo import export_merged


@dataclass
class RWRConfig:
    """Flow-RWR settings."""

    temperature: float = field(default=0.1, metadata=ALLOW_INF)
    """beta in exp(r / beta): small favours the best sample of each group, large tends to plain SFT
    (``inf``: uniform weights, exactly plain flow matching on the samples)."""
    max_weight: float | None = 5.0
    """Clip of the self-normalised weights (bounds the gradient variance)."""
    caption_dropout: float = 0.0
    """Probability of training a sample with the empty prompt, so the unconditional prediction that
    classifier-free guidance subtracts moves with the conditional one (base training's 0.1 is typical)."""
    time: TimeSampling = field(default_factory=TimeSampling)

    def __post_init__(self) -> None:
        if not 0.0 <= self.caption_dropout <= 1.0:
            raise ValueError(f"caption_dropout must lie in [0, 1], got {self.caption_dropout}")


class WeightedSamples(Dataset):
    """Samples with rewards -> items carrying their RWR weight (groups = identical prompts, and identical
    condition images when the samples have them: ``conditions`` holds one key per sample, ``images`` the
    [3, H, W] condition image of each key)."""

    def __init__(
        self,
        media: torch.Tensor,
        prompts: list[str],
        rewards: torch.Tensor,
        config: RWRConfig,
        *,
        conditions: list[str] | None = None,
        images: dict[str, torch.Tensor] | None = None,
    ):
        if not (len(media) == len(prompts) == len(rewards)):
            raise ValueError(f"got {len(media)} media, {len(prompts)} prompts and {len(rewards)} rewards")
        keys = list(zip(prompts, conditions, strict=True)) if conditions is not None else list(prompts)
        groups = {k: i for i, k in enumerate(dict.fromkeys(keys))}
        group_ids = torch.tensor([groups[k] for k in keys])
        self.conditions, self.images = conditions, images or {}
        self.media, self.prompts = media, prompts
        self.weights = rwr_weights(
            rewards.double(),
            temperature=config.temperature,
            group_ids=group_ids,
            max_weight=config.max_weight,
        ).float()

    def __len__(self) -> int:
        return len(self.prompts)

    def __getitem__(self, i: int) -> dict:
        item = {"pixels": self.media[i], "prompt": self.prompts[i], "weight": self.weights[i], "index": i}
        if self.conditions is not None:
            item["condition"] = self.images[self.conditions[i]]
        return item


class FlowRWR(CachedPrompts, Method):
    """Reward-weighted flow matching on :class:`~flowalign.data.batches.MediaBatch` batches (``pixels`` or
    ``latents``, ``prompt``, ``weight``, ``index``).

    :meth:`cache_prompts` encodes the prompts once (the empty prompt of caption dropout included).
    """

    def __init__(self, model: FlowModel, config: RWRConfig | None = None, *, lora: LoraConfig | None = None):
        self.model = model
        self.config = config or RWRConfig()
        self.lora = lora
        freeze_all_but_transformer(model, lora)

    def trainable_modules(self) -> dict[str, nn.Module]:
        return {"transformer": self.model.transformer}

    def frozen_modules(self) -> dict[str, nn.Module]:
        return self.without_text_encoders(
            {k: v for k, v in self.model.modules().items() if k != "transformer"}
        )

    def cache_prompts(self, prompts, **kwargs):
        extra = [""] if self.config.caption_dropout > 0 else []
        return super().cache_prompts(list(prompts) + extra, **kwargs)

    def collate(self, items: list[dict]) -> MediaBatch:
        return MediaBatch.collate(items)

    def compute_loss(self, batch: MediaBatch, ctx: StepContext, group: str):
        batch = MediaBatch.coerce(batch)
        if batch.weight is None:
            raise ValueError("FlowRWR: the batch has no per-sample 'weight' (see WeightedSamples)")
        ids = batch.index
        x0 = batch.clean_latents(self.model.encode_media)
        noise = ctx.randn_like(x0, ids, key="noise")
        t = sample_training_t(self.config.time, ids, ctx, span=self.model.training_t_span)
        x_t = flow.interpolate(x0, noise, t)
        prompts = drop_captions(batch.prompt, ids, ctx, self.config.caption_dropout)
        images = batch.condition  # a caption-dropped sample keeps its image (as CFG samples it)
        cond = self.condition(prompts, x0.device, images=None if images is None else list(images), like=x0)
        v = self.model.velocity(x_t, t, cond, net=ctx.module("transformer"))
        err = per_sample_mse(v.float(), flow.velocity_target(x0, noise).float())
        loss, metrics = flow_rwr_loss(err, batch.weight.float())
        return loss.mean(), metrics

    def export(self, out_dir: Path) -> None:
        from flowalign.models.lora import has_lora, save_lora

        self.model.transformer.eval()
        if has_lora(self.model.transformer):
            save_lora(self.model.transformer, Path(out_dir) / "lora")
            if self.lora is None or self.lora.export_merged:
                export_merged(self.model, Path(out_dir))
        else:
            self.model.save_pretrained(out_dir)
