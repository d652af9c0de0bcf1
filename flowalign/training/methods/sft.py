"""Flow-matching supervised fine-tuning (SD3 recipe, docs/algorithms.md 5.2): the first method on the loop.

    L = E_{t, x0, noise} [ w(t) || v_theta(x_t, t, c) - (noise - x0) ||^2 ],   x_t = (1 - t) x0 + t noise,

with logit-normal t (optionally shifted), caption dropout for classifier-free guidance, and the
text encoder trained jointly when asked (the toy world does; real models keep it frozen).
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Literal

from torch import Tensor, nn

from flowalign import flow
from flowalign.data.batches import MediaBatch
from flowalign.models.base import FlowModel
from flowalign.objectives.flow_matching import flow_matching_loss, time_loss_weight
from flowalign.training.method import Method, StepContext
from flowalign.training.methods.common import CachedPrompts, TimeSampling, drop_captions, sample_training_t


@dataclass
class SFTConfig(TimeSampling):
    """Flow-matching SFT settings.

    The time-sampling fields (``time_density``, ``logit_mean``, ``logit_std``, ``time_shift``) are
    :class:`TimeSampling`'s, the block DPO and RWR nest as ``time``; SFT keeps them at its top level so
    that the keys of existing recipes (and the cache keys hashed from them) stay as they are.
    """

    loss_weighting: Literal["none", "sigma_sqrt", "cosmap"] = "none"
    """"none", "sigma_sqrt" or "cosmap"."""
    caption_dropout: float = 0.1
    """Probability of training a sample with the empty prompt (makes CFG possible)."""
    train_text_encoder: bool = False
    """Train the text encoder jointly (the toy world's tiny encoder); real models keep it frozen."""


class FlowMatchingSFT(CachedPrompts, Method):
    """Flow matching on (media, prompt) batches for any FlowModel.

    Batches are :class:`~flowalign.data.batches.MediaBatch`: ``pixels`` (media in [0, 1]) or cached
    canonical ``latents``, ``prompt`` (list of str) and ``index`` (dataset indices, for per-sample
    random draws).

    With frozen text encoders, :meth:`cache_prompts` encodes the prompts once (the empty prompt of
    caption dropout included); steps then read the cached rows and the text encoders leave the device.
    """

    def __init__(self, model: FlowModel, config: SFTConfig | None = None):
        self.model = model
        self.config = config or SFTConfig()
        text_encoder = getattr(model.pipe, "text_encoder", None)
        if self.config.train_text_encoder and text_encoder is None:
            raise ValueError("train_text_encoder is set but the model has no text_encoder")
        for module in model.modules().values():
            module.requires_grad_(False)
        model.transformer.requires_grad_(True).train()
        if self.config.train_text_encoder:
            text_encoder.requires_grad_(True).train()

    def trainable_modules(self) -> dict[str, nn.Module]:
        modules = {"transformer": self.model.transformer}
        if self.config.train_text_encoder:
            modules["text_encoder"] = self.model.pipe.text_encoder
        return modules

    def frozen_modules(self) -> dict[str, nn.Module]:
        trainable = set(map(id, self.trainable_modules().values()))
        return self.without_text_encoders(
            {k: v for k, v in self.model.modules().items() if id(v) not in trainable}
        )

    @property
    def caches_prompts(self) -> bool:
        """Prompts can be cached only while the text encoder is frozen (not ``train_text_encoder``)."""
        return not self.config.train_text_encoder

    def cache_prompts(self, prompts, **kwargs):
        if not self.caches_prompts:
            raise ValueError("SFT with train_text_encoder cannot cache its prompts: the encoder changes")
        extra = [""] if self.config.caption_dropout > 0 else []
        return super().cache_prompts(list(prompts) + extra, **kwargs)

    def collate(self, items: list[dict]) -> MediaBatch:
        return MediaBatch.collate(items)

    def encode(self, batch: MediaBatch, ctx: StepContext) -> tuple[Tensor, list[str]]:
        """Clean canonical latents x0 and the prompts after caption dropout."""
        batch = MediaBatch.coerce(batch)
        x0 = batch.clean_latents(self.model.encode_media)
        return x0, drop_captions(batch.prompt, batch.index, ctx, self.config.caption_dropout)

    def conditioning(self, prompts: list[str], batch: MediaBatch, x0: Tensor, ctx: StepContext):
        """The step's conditioning: the cached rows (:meth:`cache_prompts`, cached condition images),
        else encoded now (through the trained text encoder with ``train_text_encoder``)."""
        images = None if batch.condition is None else list(batch.condition)
        if not self.config.train_text_encoder:
            return self.condition(prompts, x0.device, images=images, like=x0)
        extra = {}
        if images is not None:
            height, width, frames = self.model.media_size(x0.shape)
            extra = dict(images=images, height=height, width=width, num_frames=frames)
        with self.model.swapped(text_encoder=ctx.module("text_encoder")):
            cond, _ = self.model.encode_prompt(prompts, **extra)
        return cond

    def sample_t(self, ids: Tensor, ctx: StepContext) -> Tensor:
        return sample_training_t(self.config, ids, ctx, span=self.model.training_t_span)

    def compute_loss(self, batch: MediaBatch, ctx: StepContext, group: str):
        batch = MediaBatch.coerce(batch)
        ids = batch.index
        x0, prompts = self.encode(batch, ctx)
        cond = self.conditioning(prompts, batch, x0, ctx)
        noise = ctx.randn_like(x0, ids, key="noise")
        t = self.sample_t(ids, ctx)
        x_t = flow.interpolate(x0, noise, t)
        v_pred = self.model.velocity(x_t, t, cond, net=ctx.module("transformer"))
        weights = (
            time_loss_weight(t, self.config.loss_weighting) if self.config.loss_weighting != "none" else None
        )
        loss, metrics = flow_matching_loss(
            v_pred.float(), flow.velocity_target(x0, noise).float(), weights=weights
        )
        return loss.mean(), metrics

    def export(self, out_dir: Path) -> None:
        """Save the whole fine-tuned model in diffusers' layout (loadable by ``load_flow_model``)."""
        for module in self.trainable_modules().values():
            module.eval()
        self.model.save_pretrained(out_dir)
