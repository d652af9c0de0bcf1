"""f-distill: a one-step generator from a flow teacher by f-divergence distribution matching (docs/algorithms.md 2).

    grad D = -E[ h(r) (grad log p_t - grad log q_t)^T dx_t/dtheta ],   h(r) = r^2 f''(r),   r = p_t / q_t

Networks: the one-step generator G (teacher copy), the online fake score (teacher copy or LoRA on the
teacher) estimating grad log q_t, the frozen teacher (with CFG) for grad log p_t, and discriminator
heads on frozen teacher features whose logit l gives r = e^l. Scores enter as denoised predictions,
x0_hat = x_t - t v (``flow.x0_from_velocity``), since s_p - s_q = ((1 - t) / t^2) (x0_p - x0_q).

Loop (``generator_every`` = K): step % K == 0 -> generator step
    x = G(z); x_t = (1 - t) x + t eps; weights h~ from the discriminator logits on x_t (ratio clamp,
    per-time-bin ratio normalisation all-reduced across processes, weight normalisation);
    L = DMD-normalised weighted surrogate + gan_weight softplus(-l(x_t))    (objectives.fdistill)
otherwise -> critic step: fake-score denoising loss on sg(G(z)) + discriminator GAN loss on noised real
data vs noised sg(G(z)) (+ approximate R1).

Reverse-KL ("rkl") gives h = 1: no discriminator is built unless ``gan_weight > 0`` (then this is DMD2).
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

import torch
from torch import Tensor, nn

from flowalign import flow
from flowalign.config import ConfigError, TrainConfig
from flowalign.data.batches import MediaBatch, PromptBatch
from flowalign.models.base import FlowModel, PromptEmbeds
from flowalign.objectives.f_divergences import get_divergence
from flowalign.objectives.fdistill import (
    RatioBinEMA,
    approx_r1_penalty,
    f_distill_weights,
    fdistill_generator_loss,
    gan_discriminator_loss,
)
from flowalign.training.method import StepContext
from flowalign.training.methods.onestep_common import (
    OneStepConfig,
    OneStepDistillation,
    dist_sum,
    frozen,
    seeded,
)
from flowalign.training.methods.onestep_data import OneStepData, build_dataset
from flowalign.training.methods.onestep_heads import DiscriminatorHeads, TeacherFeatures

__all__ = ["FDistill", "FDistillConfig", "FDistillRun", "run_fdistill"]


@dataclass(kw_only=True)
class FDistillConfig(OneStepConfig):
    """f-distill settings (paper Table 5; FastGen defaults where the paper is silent)."""

    divergence: str = "js"
    """f-divergence: rkl, sf (softened RKL), js, sh (squared Hellinger), kl (forward KL), jf (Jeffreys),
    pearson, neyman, alpha. The paper's headline: kl on CIFAR-10, js elsewhere."""
    alpha: float = 0.5
    """Alpha of the alpha-divergence (h = r^alpha)."""
    gan_weight: float = 1e-3
    """lambda_GAN of the generator's GAN term (1e-3 CIFAR-10 / SD1.5, 3e-3 ImageNet-64); 0 = none."""
    r1_weight: float = 0.0
    """gamma of the approximate R1 penalty (l(x_real) - l(x_real + r1_noise eps))^2 (FastGen default 0)."""
    r1_noise: float = 0.1
    """Std of the R1 perturbation."""
    discriminator_blocks: list[int] | None = None
    """Teacher blocks whose token features feed one discriminator head each (None: the middle block)."""
    discriminator_hidden: int = 128
    """Hidden width of each discriminator head."""
    ratio_bins: int = 10
    """Time bins of the density-ratio normalisation."""
    ratio_decay: float = 0.0
    """EMA decay of the per-bin ratio means (0: current batch; FastGen ImageNet-64: 0.5)."""
    logit_clamp: float = 10.0
    ratio_min: float = 0.1
    ratio_max: float = 20.0
    """Clamps of the discriminator logit and of the ratio r = e^l before h (docs/algorithms.md 2.3)."""
    dmd_normalize: bool = True
    """Scale each sample's gradient by 1 / mean|x - x0_teacher| (DMD2, FastGen)."""

    def __post_init__(self) -> None:
        super().__post_init__()
        try:
            get_divergence(self.divergence, alpha=self.alpha)
        except ValueError as err:
            raise ConfigError(str(err).removeprefix("get_divergence: "), key="divergence") from None
        for key in ("gan_weight", "r1_weight", "r1_noise"):
            if getattr(self, key) < 0:
                raise ConfigError(f"must be >= 0, got {getattr(self, key)}", key=key)
        if self.ratio_bins < 1:
            raise ConfigError(f"must be >= 1, got {self.ratio_bins}", key="ratio_bins")
        if not 0 <= self.ratio_decay < 1:
            raise ConfigError(f"must be in [0, 1), got {self.ratio_decay}", key="ratio_decay")
        if not 0 < self.ratio_min < self.ratio_max:
            raise ConfigError(
                f"need 0 < ratio_min < ratio_max, got {self.ratio_min}, {self.ratio_max}", key="ratio_min"
            )

    @property
    def is_reverse_kl(self) -> bool:
        return get_divergence(self.divergence, alpha=self.alpha).name == "reverse_kl"

    @property
    def needs_discriminator(self) -> bool:
        """A discriminator is built for the density ratio (any divergence but reverse-KL) or the GAN term."""
        return not self.is_reverse_kl or self.gan_weight > 0


class FDistill(OneStepDistillation):
    """f-distill on the shared training loop.

    Batches: ``prompt`` (list of str), ``index`` and, when a discriminator is used, real media as
    ``pixels`` (in [0, 1]) or canonical ``latents``.

    Args:
        teacher: the frozen flow teacher.
        config: settings.
    """

    def __init__(self, teacher: FlowModel, config: FDistillConfig | None = None) -> None:
        cfg = self.config = config or FDistillConfig()
        super().__init__(teacher, cfg)
        self.divergence = get_divergence(cfg.divergence, alpha=cfg.alpha).name
        self.ratio_state = RatioBinEMA(
            num_bins=cfg.ratio_bins, decay=cfg.ratio_decay, t_min=cfg.t_min, t_max=cfg.t_max
        )
        self.features: TeacherFeatures | None = None
        self.discriminator: DiscriminatorHeads | None = None
        if cfg.needs_discriminator:
            self.features = TeacherFeatures(teacher, cfg.discriminator_blocks)
            if teacher.execution_device is None:  # a staged run builds them once its transformers arrive
                self.finish_loading()

    def finish_loading(self) -> None:
        """Build the discriminator heads (when the divergence or the GAN term needs them and they are
        not built yet): their input widths come from one probe forward of the teacher to its feature
        blocks, run where the teacher transformer is, and their initial weights from seed 0."""
        if self.features is None or self.discriminator is not None:
            return
        teacher = self.teacher
        cond, _ = self.encode([""], with_uncond=False, images=self.probe_images())
        probe = torch.zeros(
            teacher.latent_shape(1, self.height, self.width, self.num_frames),
            device=teacher.device,
            dtype=teacher.dtype,
        )
        with self.teacher_mode():
            dims = self.features.dims(
                probe, torch.full((1,), 0.5, device=teacher.device), cond, guidance=self.embedded_guidance
            )
        with seeded(0):  # the same initial heads whatever the global RNG (exact resume, equal runs)
            heads = DiscriminatorHeads(dims, hidden=self.config.discriminator_hidden)
        self.discriminator = heads.to(teacher.device)

    @property
    def reads_real_media(self) -> bool:
        """Whether critic steps read real media: the discriminator is used (built now or, in a staged
        run, once the transformers are on the device)."""
        return self.features is not None

    def extra_critic_modules(self) -> dict[str, nn.Module]:
        return {} if self.discriminator is None else {"discriminator": self.discriminator}

    def state_dict(self) -> dict[str, Any]:
        return {"ratio_state": self.ratio_state.state_dict()}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        if "ratio_state" not in state:
            raise ValueError(f"FDistill state has no 'ratio_state' (keys {sorted(state)})")
        self.ratio_state.load_state_dict(state["ratio_state"])

    def export_metadata(self) -> dict[str, Any]:
        cfg = self.config
        return {
            "divergence": self.divergence,
            "teacher_guidance_scale": cfg.guidance_scale,
            "gan_weight": cfg.gan_weight,
        }

    # ---------------------------------------------------------------- discriminator
    def logits(self, x_t: Tensor, t: Tensor, cond: PromptEmbeds, heads: nn.Module) -> Tensor:
        """Discriminator logits [B, H] on noised inputs; gradients reach x_t (teacher weights frozen)."""
        assert self.features is not None
        with self.teacher_mode():
            feats = self.features(x_t, t, cond, guidance=self.embedded_guidance)
        return heads(feats)

    def real_x0(self, batch: PromptBatch) -> Tensor:
        """Clean canonical latents of the batch's real media (``latents``, or ``pixels`` encoded)."""
        if not isinstance(batch, MediaBatch):
            raise ValueError(
                "f-distill: the discriminator needs real media in each batch ('pixels' in [0, 1] or 'latents'); "
                "the batch has prompts only. Give data.real_manifest (or data.toy_items), or use "
                "divergence 'rkl' with gan_weight 0"
            )
        return batch.clean_latents(self.teacher.encode_media)

    # ---------------------------------------------------------------- losses
    def generator_loss(self, batch: PromptBatch, ctx: StepContext) -> tuple[Tensor, dict[str, Tensor]]:
        cfg, ids = self.config, batch.index
        cond, uncond = self.encode(batch.prompt, with_uncond=self.uses_cfg, images=batch.condition)
        x = self.sample(ids, ctx, cond, net=ctx.module("generator"))  # [B, ...] with the generator's graph
        t, _, x_t = self.noised(x, ids, ctx, key="generator")
        with torch.no_grad():
            xt = x_t.detach()
            x0_teacher = flow.x0_from_velocity(xt, self.teacher_velocity(xt, t, cond, uncond), t)
            x0_fake = flow.x0_from_velocity(xt, self.velocity(xt, t, cond, net=self.fake), t)
        weights, logits, metrics = None, None, {}
        if self.discriminator is not None:
            with frozen(self.discriminator), torch.set_grad_enabled(cfg.gan_weight > 0):
                logits = self.logits(x_t if cfg.gan_weight > 0 else xt, t, cond, self.discriminator)
            if not cfg.is_reverse_kl:
                weights, metrics = f_distill_weights(
                    logits.detach(),
                    t,
                    divergence=cfg.divergence,
                    alpha=cfg.alpha,
                    ratio_state=self.ratio_state,
                    logit_clamp=cfg.logit_clamp,
                    ratio_min=cfg.ratio_min,
                    ratio_max=cfg.ratio_max,
                    reduce_fn=dist_sum,
                )
        loss, gen_metrics = fdistill_generator_loss(
            x,
            x0_teacher,
            x0_fake,
            weights=weights,
            fake_logits=logits if cfg.gan_weight > 0 else None,
            gan_weight=cfg.gan_weight,
            dmd_normalize=cfg.dmd_normalize,
        )
        return loss, {**gen_metrics, **metrics}

    def extra_critic_loss(
        self, batch: PromptBatch, ctx: StepContext, cond: PromptEmbeds, x0: Tensor
    ) -> tuple[Tensor, dict[str, Tensor]] | None:
        """Discriminator loss: noised real data vs noised detached generator samples (+ approximate R1)."""
        if self.discriminator is None:
            return None
        cfg, ids = self.config, batch.index
        heads = ctx.module("discriminator")
        x_real = self.real_x0(batch).to(x0.dtype)
        if x_real.shape != x0.shape:
            raise ValueError(
                f"f-distill: real media give latents {list(x_real.shape)} but the generator makes "
                f"{list(x0.shape)}; set height/width/num_frames to the real data's size"
            )
        t_f, _, xt_fake = self.noised(x0, ids, ctx, key="disc_fake")
        t_r, _, xt_real = self.noised(x_real, ids, ctx, key="disc_real")
        inputs, times = [xt_real, xt_fake], [t_r, t_f]
        if cfg.r1_weight > 0:
            inputs.append(xt_real + cfg.r1_noise * ctx.randn_like(xt_real, ids, key="r1").to(xt_real.dtype))
            times.append(t_r)
        n = len(inputs)
        with torch.no_grad(), self.teacher_mode():
            feats = self.features(
                torch.cat(inputs),
                torch.cat(times),
                PromptEmbeds.cat([cond] * n),
                guidance=self.embedded_guidance,
            )
        # one call of the (DDP-wrapped) heads for real, fake and perturbed inputs: [n B, H] -> n x [B, H]
        logits = heads(feats).chunk(n)
        loss, metrics = gan_discriminator_loss(logits[0], logits[1])
        if cfg.r1_weight > 0:
            r1 = approx_r1_penalty(logits[0], logits[2])
            loss = loss + cfg.r1_weight * r1
            metrics["r1"] = r1.detach().mean()
        return loss, metrics


# ------------------------------------------------------------------------------------------------ run
@dataclass(kw_only=True)
class FDistillRun:
    """Everything ``flowalign train fdistill`` needs (YAML recipe + dotted overrides)."""

    teacher: str = ""
    """Hub id or local folder of the flow teacher (diffusers layout)."""
    teacher_dtype: Literal["fp32", "bf16", "fp16"] | None = None
    """Precision of the frozen teacher; null = the compute dtype of train.mixed_precision (fp32 for
    "no", bf16, fp16), as for every run. The generator, fake score and discriminator stay fp32."""
    method: FDistillConfig = field(default_factory=FDistillConfig)
    """f-distill settings."""
    data: OneStepData = field(default_factory=OneStepData)
    """Prompts and real data."""
    cache_prompts: bool = True
    """Encode every prompt (and the empty prompt of CFG) once through the teacher's text encoders before
    training; they then stay off the device (``flowalign/training/methods/onestep_cache.py``)."""
    cache_latents: bool = False
    """Encode the discriminator's real media through the teacher's VAE once before training (kept in
    ``latent_cache_dir``, reused by a resume or another run on the same data and teacher); the VAE then
    stays off the device."""
    latent_cache_dir: Path | None = None
    """Folder of the latent cache (null: ``<output_dir>/cache/latents``)."""
    train: TrainConfig = field(default_factory=TrainConfig)
    """Training loop settings (output_dir, steps, batch, optimizer, EMA, ...)."""


def run_fdistill(config: FDistillRun, *, resume: bool | str | Path = False, progress: bool = True):
    """Distil ``config.teacher`` into a one-step generator; returns the loop's ``TrainResult``.

    The final generator is written to ``<output_dir>/final`` (and ``final-ema`` with EMA on) as a
    complete model folder: ``flowalign generate --one-step --model <output_dir>/final``.

    Raises:
        ModelLoadError: the teacher cannot be loaded or is not a supported flow family.
        ValueError: the data cannot feed the discriminator (no real media) or bad settings.
    """
    from flowalign.training.loop import train

    if not config.teacher:
        raise ConfigError("the teacher model (hub id or folder) is required", key="teacher")
    from flowalign.training.methods.onestep_cache import (
        cache_onestep_conditioning,
        finish_onestep_loading,
        load_onestep_teacher,
    )

    teacher, frozen = load_onestep_teacher(config, method="f-distill")
    method = FDistill(teacher, config.method)
    method.keep_teacher_in(frozen)
    dataset = build_dataset(
        config.data,
        kind="video" if teacher.is_video else "image",
        needs_real=config.method.needs_discriminator,
    )
    dataset = cache_onestep_conditioning(config, method, dataset)
    finish_onestep_loading(config, method)
    return train(method, dataset, config.train, resume=resume, progress=progress, run_config=config)
