"""Pieces shared by the flow-model methods: training-time sampling, frozen-reference handling,
the dtype policy of trainable parameters and cached prompt conditioning.

Dtype policy: frozen weights (a LoRA base, a reference copy, text encoders, the VAE) stay in the
model's compute dtype (``FlowModel.compute_dtype``: bf16 when the run's ``mixed_precision`` is
bf16); trainable parameters (LoRA adapters, or the whole transformer of a full fine-tune: the
master weights) are kept in fp32, and the loop's autocast runs their forward in the compute dtype.
"""

from __future__ import annotations

import copy
import os
from collections.abc import Sequence
from contextlib import contextmanager
from dataclasses import dataclass, replace

import torch
from torch import Tensor, nn

from flowalign import flow
from flowalign.config import LoraConfig
from flowalign.data.batches import CachedCondition
from flowalign.models.base import FlowModel, PromptEmbeds, net_dtype
from flowalign.models.lora import adapters_disabled, add_lora, has_lora
from flowalign.training.cache import PromptEmbedCache, text_encoder_names
from flowalign.training.distributed import SHARD_FROZEN
from flowalign.training.method import StepContext


@dataclass
class TimeSampling:
    """How training times are drawn (docs/algorithms.md 5.2)."""

    time_density: flow.TimeDensity = "logit_normal"
    """"logit_normal": t = sigmoid(n), n ~ N(logit_mean, logit_std^2); "uniform"; or "mode" (SD3's mode sampling)."""
    logit_mean: float = 0.0
    """Mean of the normal whose sigmoid is t ("logit_normal")."""
    logit_std: float = 1.0
    """Standard deviation of that normal."""
    time_shift: float = 1.0
    """Static shift applied to the sampled t (3.0 matches SD3.5's shifted training table)."""


def sample_training_t(
    cfg: TimeSampling,
    ids: Tensor,
    ctx: StepContext,
    *,
    key: str = "t",
    span: tuple[float, float] = (0.0, 1.0),
) -> Tensor:
    """One t per sample id, drawn through the step context (deterministic, split-independent). [B].

    ``span = (lo, hi)`` maps the draw affinely into [lo, hi]: t = lo + (hi - lo) t' (a model's
    :attr:`~flowalign.models.base.FlowModel.training_t_span`, e.g. one Wan 2.2 A14B expert's range).
    """
    lo, hi = span
    t = flow.t_from_draws(
        ctx.randn((), ids, key=f"{key}_normal"),
        ctx.rand((), ids, key=f"{key}_uniform"),
        density=cfg.time_density,
        logit_mean=cfg.logit_mean,
        logit_std=cfg.logit_std,
        shift=cfg.time_shift,
    ).to(ctx.device)
    return t if (lo, hi) == (0.0, 1.0) else lo + (hi - lo) * t


def trainable_to_fp32(module: nn.Module) -> None:
    """Keep every trainable (``requires_grad``) half-precision parameter of ``module`` in fp32, in place."""
    for p in module.parameters():
        if p.requires_grad and p.is_floating_point() and p.dtype != torch.float64:
            p.data = p.data.to(torch.float32)


def freeze_all_but_transformer(model: FlowModel, lora: LoraConfig | None) -> None:
    """Freeze every component; then either attach LoRA to the transformer or make it fully trainable.

    The trainable parameters end in fp32 (LoRA adapters on a bf16 base, or fp32 master weights of a
    full fine-tune); frozen ones keep their dtype.
    """
    for module in model.modules().values():
        module.requires_grad_(False).eval()
    if lora is not None:
        if not has_lora(model.transformer):
            add_lora(model.transformer, lora)
    else:
        model.transformer.requires_grad_(True)
    trainable_to_fp32(model.transformer)
    model.transformer.train()


def frozen_copy(
    module: nn.Module,
    dtype: torch.dtype,
    *,
    device: torch.device | str | None = None,
    trainable_fp32: bool = False,
) -> nn.Module:
    """A frozen eval-mode copy of ``module`` with floating weights and buffers in ``dtype``.

    Each tensor is cast (and moved to ``device``, default: where it is) while it is copied, so an
    fp32 module never exists twice; submodules that the model class keeps in fp32 (diffusers'
    ``_keep_in_fp32_modules``) stay fp32, and so do trainable parameters with ``trainable_fp32``
    (LoRA adapters about to be merged).
    """
    keep = getattr(module, "_keep_in_fp32_modules", None) or []
    memo: dict[int, object] = {}
    named = list(module.named_parameters(remove_duplicate=False)) + list(
        module.named_buffers(remove_duplicate=False)
    )
    for name, tensor in named:
        if id(tensor) in memo or not tensor.is_floating_point():
            continue
        fp32 = any(k in name.split(".") for k in keep) or (trainable_fp32 and tensor.requires_grad)
        clone = tensor.detach().to(device=device, dtype=torch.float32 if fp32 else dtype, copy=True)
        memo[id(tensor)] = (
            nn.Parameter(clone, requires_grad=False) if isinstance(tensor, nn.Parameter) else clone
        )
    return copy.deepcopy(module, memo).requires_grad_(False).eval()


class FrozenReference:
    """The reference velocity network of preference methods.

    With LoRA the reference is the policy with its adapters disabled (no second copy in memory). Under
    FSDP2 the policy is sharded in place, so this runs the sharded module (its forward gathers the
    base weights); under DeepSpeed ZeRO-3 the engine's hooks on the module gather them.
    For a full fine-tune it is a frozen copy of the initial transformer in ``dtype`` (the compute
    dtype: bf16 next to fp32 master weights; default: the transformer's own dtype), marked so that
    FSDP2 runs shard it like the policy instead of keeping a whole copy on every process.
    """

    def __init__(self, transformer: nn.Module, dtype: torch.dtype | None = None):
        self.uses_adapters = has_lora(transformer)
        self.copy: nn.Module | None = None
        if not self.uses_adapters:
            dtype = dtype or net_dtype(transformer)
            self.copy = frozen_copy(transformer, dtype)
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


class CachedPrompts:
    """Mixin for methods conditioned on prompts through frozen text encoders (``self.model``).

    Without a cache every step encodes its prompts; after :meth:`cache_prompts` steps read the
    cached rows, and the text encoders go to the CPU and drop out of ``frozen_modules`` (the loop
    would otherwise move them back onto the device).
    """

    model: FlowModel
    prompt_cache: PromptEmbedCache | None = None

    def cache_prompts(
        self,
        prompts: Sequence[str],
        *,
        cache_dir: str | os.PathLike | None = None,
        batch_size: int = 8,
        offload: bool = True,
    ) -> PromptEmbedCache:
        """Encode the distinct ``prompts`` once (or open the matching cache in ``cache_dir``); with
        ``offload`` the text encoders then move to the CPU."""
        self.prompt_cache = PromptEmbedCache.build(
            self.model, prompts, cache_dir=cache_dir, batch_size=batch_size
        )
        if offload:
            for name in text_encoder_names(self.model):
                self.model.modules()[name].to("cpu")
        return self.prompt_cache

    def condition(
        self,
        prompts: Sequence[str],
        device: torch.device,
        *,
        images: Sequence | None = None,
        like: torch.Tensor | None = None,
    ) -> PromptEmbeds:
        """The prompts' embeddings on ``device``: read from the cache when there is one, else encoded.

        ``images`` (one per prompt) are the condition images of image-conditioned families, encoded
        with the prompts for media of the size of the latents ``like``, or their cached encodings
        (:class:`~flowalign.data.batches.CachedCondition` rows, :mod:`flowalign.training.condition_cache`),
        stacked next to the text embeddings."""
        if images is None and getattr(self.model, "requires_images", False):
            raise ValueError(f"{self.model.family} needs a condition image per sample; the data has none")
        if images is not None and all(isinstance(image, CachedCondition) for image in images):
            text = self.text_condition(prompts, device)
            fields = {key: torch.stack([row[key] for row in images]).to(device) for key in images[0]}
            return replace(text, **fields)
        if images is not None:
            height, width, frames = self.model.media_size(like.shape)
            with torch.no_grad():
                cond, _ = self.model.encode_prompt(
                    list(prompts), images=list(images), height=height, width=width, num_frames=frames
                )
            return cond.to(device=device)
        return self.text_condition(prompts, device)

    def text_condition(self, prompts: Sequence[str], device: torch.device) -> PromptEmbeds:
        """The text part alone: the cached rows, else encoded now (no image fields)."""
        if self.prompt_cache is not None:
            return self.prompt_cache.lookup(prompts, device)
        if getattr(self.model, "requires_images", False):
            with torch.no_grad():
                return self.model.encode_text(list(prompts)).to(device=device)
        return encode_frozen_prompts(self.model, list(prompts))

    def without_text_encoders(self, modules: dict[str, nn.Module]) -> dict[str, nn.Module]:
        """``modules`` less the text encoders when the prompts are cached, less the VAE when the
        media latents are (``media_cached``, :mod:`flowalign.training.latent_cache`), and less the image
        encoder when the condition images are (``conditions_cached``): they stay on the CPU."""
        dropped = set(text_encoder_names(self.model)) if self.prompt_cache is not None else set()
        if getattr(self, "media_cached", False):
            dropped.add("vae")
        if getattr(self, "conditions_cached", False):  # condition images encoded once: no image encoder
            dropped.add("image_encoder")
        return {k: v for k, v in modules.items() if k not in dropped}


class TransformerPolicy(CachedPrompts):
    """Mixin for methods that train the transformer (LoRA or full) against a :class:`FrozenReference`
    (``self.reference``): the transformer is the one trainable module; the other components (less the
    cached-away encoders and VAE) and a full fine-tune's reference copy are frozen."""

    reference: FrozenReference

    def trainable_modules(self) -> dict[str, nn.Module]:
        return {"transformer": self.model.transformer}

    def frozen_modules(self) -> dict[str, nn.Module]:
        frozen = self.without_text_encoders(
            {k: v for k, v in self.model.modules().items() if k != "transformer"}
        )
        if self.reference.copy is not None:
            frozen["reference"] = self.reference.copy
        return frozen
