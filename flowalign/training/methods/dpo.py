"""Flow-DPO (and Diffusion-DPO for epsilon models) on preference pairs, for any FlowModel.

    L = -log sigmoid( -(beta_t / 2) [ (e_w - e_w_ref) - (e_l - e_l_ref) ] ),
    e = || (noise - x0) - v(x_t, t, c) ||^2,  one shared noise and t per pair (docs/algorithms.md 1B).

Chosen and rejected run in one batch ([w_0..w_{P-1}, l_0..l_{P-1}]); the reference is the policy
with its LoRA adapters disabled (no second copy) or a frozen copy for a full fine-tune.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Literal

import torch

from flowalign import flow
from flowalign.config import LoraConfig
from flowalign.data.batches import PairBatch
from flowalign.models.base import FlowModel
from flowalign.models.lora import has_lora, save_lora
from flowalign.objectives.dpo import velocity_errors_for_pairs
from flowalign.objectives.fdpo import f_dpo_loss
from flowalign.training.method import Method, StepContext
from flowalign.training.methods.common import (
    FrozenReference,
    TimeSampling,
    TransformerPolicy,
    freeze_all_but_transformer,
    frozen_copy,
    sample_training_t,
)


@dataclass
class DPOConfig:
    """Flow-DPO settings."""

    beta: float = 500.0
    """KL strength. With ``reduction="mean"`` this is the released code's beta (beta_paper = beta / D)."""
    beta_schedule: Literal["constant", "t2"] = "constant"
    """"constant" (recommended by the paper) or "t2" (beta_t = beta (1 - t)^2, equal to Diffusion-DPO)."""
    reduction: Literal["mean", "sum"] = "mean"
    """Per-sample error as a "mean" or "sum" over latent elements (sum-with-beta == mean-with-beta*D)."""
    time: TimeSampling = field(default_factory=TimeSampling)
    """How the shared t of each pair is drawn."""
    divergence: str = "reverse_kl"
    """The f-divergence constraint (f-DPO, docs/algorithms.md 1G): "reverse_kl" is Flow-DPO; also
    "forward_kl", "js", "alpha" and the rest of the f-distill table."""
    alpha: float = 0.5
    """α of ``divergence="alpha"``."""
    ratio_scale: float | None = None
    """f-DPO's a in log(π/π_ref) ≈ -(a/2)(e - e_ref); null uses beta (unused for the reverse KL)."""


class FlowDPO(TransformerPolicy, Method):
    """Flow-DPO on :class:`~flowalign.data.batches.PairBatch` batches (``media_w``/``media_l`` or cached
    ``latents_w``/``latents_l``, ``prompt``, ``index``).

    Call :meth:`cache_prompts` with the dataset's prompts before training to encode each prompt
    once instead of twice per pair and step (the text encoders then leave the device).
    """

    def __init__(self, model: FlowModel, config: DPOConfig | None = None, *, lora: LoraConfig | None = None):
        self.model = model
        self.config = config or DPOConfig()
        self.lora = lora
        if self.config.beta_schedule not in ("constant", "t2"):
            raise ValueError(f"beta_schedule must be 'constant' or 't2', got {self.config.beta_schedule!r}")
        if self.config.reduction not in ("mean", "sum"):
            raise ValueError(f"reduction must be 'mean' or 'sum', got {self.config.reduction!r}")
        from flowalign.objectives.f_divergences import get_divergence

        get_divergence(self.config.divergence, alpha=self.config.alpha)  # an unknown name fails here
        freeze_all_but_transformer(model, lora)
        self.reference = FrozenReference(model.transformer, model.compute_dtype)

    def collate(self, items: list[dict]) -> PairBatch:
        return PairBatch.collate(items)

    def pair_latents(self, batch: PairBatch) -> torch.Tensor:
        """Canonical latents of the pairs laid out [w_0..w_{P-1}, l_0..l_{P-1}]: [2P, ...]."""
        return PairBatch.coerce(batch).pair_latents(self.model.encode_media)

    def compute_loss(self, batch: PairBatch, ctx: StepContext, group: str):
        batch = PairBatch.coerce(batch)
        ids = batch.index
        x0 = self.pair_latents(batch)  # [2P, ...]
        noise = ctx.randn_like(x0[: len(ids)], ids, key="noise").repeat(
            2, *([1] * (x0.ndim - 1))
        )  # shared per pair
        t = sample_training_t(self.config.time, ids, ctx, span=self.model.training_t_span).repeat(
            2
        )  # shared per pair
        x_t = flow.interpolate(x0, noise, t)
        v_target = flow.velocity_target(x0, noise)
        images = batch.condition
        cond = self.condition(batch.prompt * 2, x0.device, images=images and images * 2, like=x0)
        v_policy = self.model.velocity(x_t, t, cond, net=ctx.module("transformer"))
        with torch.no_grad(), self.reference.network(self.model.transformer) as ref_net:
            v_ref = self.model.velocity(x_t, t, cond, net=ref_net)
        reduction = self.config.reduction
        err_w, err_l = velocity_errors_for_pairs(v_policy.float(), v_target.float(), reduction=reduction)
        ref_w, ref_l = velocity_errors_for_pairs(v_ref.float(), v_target.float(), reduction=reduction)
        loss, metrics = f_dpo_loss(
            err_w,
            err_l,
            ref_w,
            ref_l,
            beta=self.config.beta,
            divergence=self.config.divergence,
            alpha=self.config.alpha,
            ratio_scale=self.config.ratio_scale,
            t=t[: len(ids)],
            beta_schedule=self.config.beta_schedule,
        )
        return loss.mean(), metrics

    def export(self, out_dir: Path) -> None:
        """LoRA runs write a diffusers LoRA file, plus the merged model unless the LoRA config's
        ``export_merged`` is false; full runs the whole model."""
        out_dir = Path(out_dir)
        self.model.transformer.eval()
        if has_lora(self.model.transformer):
            save_lora(self.model.transformer, out_dir / "lora")
            if self.lora is None or self.lora.export_merged:
                export_merged(self.model, out_dir)
        else:
            self.model.save_pretrained(out_dir)


def export_merged(model: FlowModel, out_dir: Path) -> None:
    """Save the model with its LoRA merged, W <- W + (alpha / r) B A, into a CPU copy of the transformer.

    The copy is made tensor by tensor on the CPU in the save dtype, ``model.compute_dtype`` (the
    dtype of the frozen base: bf16 for a bf16 run), with the adapters in fp32 so that each merged
    weight is rounded once; nothing is copied on the device, and the live model keeps its adapters.
    """
    from flowalign.models.lora import merge_lora

    merged = merge_lora(
        frozen_copy(model.transformer, model.compute_dtype, device="cpu", trainable_fp32=True)
    )
    with model.swapped(transformer=merged):
        model.save_pretrained(out_dir)
    del merged
