"""Diff-Instruct* (DI*): a reward-aligned one-step generator regularised by a score divergence (docs/algorithms.md 3).

    min_theta  -reward_scale E[r(g(z), c)] + alpha D^[0,T](p_theta, p_ref^omega)

D is the score-based divergence with the pseudo-Huber distance, optimised through the tractable
surrogate of docs/algorithms.md 3.2 (``objectives.distar.distar_generator_loss``): the gradient flows
through the noised sample x_t into BOTH score networks (online score s_psi and the CFG-guided
teacher s_ref^omega, parameters frozen) and into the conditional score. The reward is any
differentiable pixel :class:`~flowalign.rewards.base.RewardModel`; r = sum_k w_k r_k over its
dimensions, on the decoded sample.

``regularizer="kl"`` swaps the score divergence for the integral KL of Diff-Instruct / DI++ (the
baseline the paper compares against): same networks, same reward, gradient (s_psi - s_ref)^T dx_t/dtheta.

Loop: the shared one of :mod:`onestep_common` (generator every K-th step, online score network's
denoising loss on the others). Output: the same one-step checkpoint format as f-distill.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

import torch
from torch import Tensor, nn

from flowalign.config import ConfigError, TrainConfig
from flowalign.data.batches import PromptBatch
from flowalign.models.base import FlowModel
from flowalign.objectives.distar import distar_generator_loss, kl_reward_generator_loss
from flowalign.rewards.base import RewardModel
from flowalign.training.method import StepContext
from flowalign.training.methods import onestep_common as common
from flowalign.training.methods import onestep_data

__all__ = ["DiffInstructStar", "DistarConfig", "DistarRun", "run_distar"]


@dataclass(kw_only=True)
class DistarConfig(common.OneStepConfig):
    """DI* settings (docs/algorithms.md 3.4; the paper publishes few, see the RECON notes there)."""

    reward: str = ""
    """Reward spec for the registry, e.g. "pickscore" or "toy_classifier:path=/dir" (unused if reward_scale = 0)."""
    reward_weights: dict[str, float] = field(default_factory=dict)
    """Weight of each reward dimension in r = sum_k w_k r_k (empty: weight 1 on every dimension)."""
    reward_scale: float = 1.0
    """alpha_rew, the reward's weight (DI*-SDXL: 100 with an O(0.01-1) reward); 0 = score-divergence distillation."""
    alpha: float = 1.0
    """Weight of the divergence regulariser."""
    regularizer: Literal["score", "kl"] = "score"
    """"score": DI*'s score divergence; "kl": the KL-regularised baseline (Diff-Instruct / DI++)."""
    distance: Literal["pseudo_huber", "l2"] = "pseudo_huber"
    """Distance d of the score divergence (l2: Fisher divergence)."""
    huber_c: float = 0.1
    """Pseudo-Huber scale per sqrt(element): c = huber_c * sqrt(D), D = elements of one latent."""
    time_weighting: Literal["none", "t", "t2"] = "t"
    """w(t) of the regulariser: 1, t or t^2 (t^2 puts the score difference in noise-prediction units)."""

    def __post_init__(self) -> None:
        super().__post_init__()
        for key in ("alpha", "huber_c"):
            if getattr(self, key) <= 0:
                raise ConfigError(f"must be > 0, got {getattr(self, key)}", key=key)
        if self.reward_scale < 0:
            raise ConfigError(f"must be >= 0, got {self.reward_scale}", key="reward_scale")


def check_reward(reward: RewardModel, weights: dict[str, float]) -> dict[str, float]:
    """Validate a reward for DI* and resolve the dimension weights.

    Returns:
        {dimension: weight} (all of the reward's dimensions with weight 1 when ``weights`` is empty).

    Raises:
        ValueError: the reward is not differentiable, does not read pixels, or ``weights`` names a
            dimension the reward does not have.
    """
    name = getattr(reward, "name", type(reward).__name__)
    if not isinstance(reward, RewardModel):
        raise ValueError(f"DI*: reward must be a RewardModel, got {type(reward).__name__}")
    if not reward.differentiable:
        raise ValueError(
            f"DI*: reward {name!r} is not differentiable; DI* backpropagates the reward into the generator. "
            "Use a differentiable reward (e.g. pickscore, hpsv2, clip, or toy_classifier on the toy world)"
        )
    if reward.input_kind != "pixels":
        raise ValueError(f"DI*: reward {name!r} reads {reward.input_kind!r}; DI* scores decoded pixels")
    unknown = sorted(set(weights) - set(reward.dimensions))
    if unknown:
        raise ValueError(
            f"DI*: reward {name!r} has no dimension(s) {unknown}; its dimensions are {list(reward.dimensions)}"
        )
    return dict(weights) if weights else dict.fromkeys(reward.dimensions, 1.0)


class DiffInstructStar(common.OneStepDistillation):
    """Diff-Instruct* (and its KL-regularised baseline) on the shared training loop.

    Batches: ``prompt`` (list of str) and ``index``; no images (data-free).

    Args:
        teacher: the frozen flow teacher (the reference diffusion).
        config: settings.
        reward: the differentiable reward model; default: loaded from ``config.reward`` when
            ``reward_scale > 0``.
    """

    def __init__(
        self, teacher: FlowModel, config: DistarConfig | None = None, *, reward: RewardModel | None = None
    ) -> None:
        cfg = self.config = config or DistarConfig()
        self.reward: RewardModel | None = None
        self.reward_weights: dict[str, float] = {}
        if cfg.reward_scale > 0:
            if reward is None:
                from flowalign.rewards.registry import load_reward, parse_reward_spec

                if not cfg.reward:
                    raise ValueError(
                        f"DI*: reward_scale = {cfg.reward_scale} > 0 needs a reward: set reward (e.g. pickscore) "
                        "or reward_scale 0 for plain score-divergence distillation"
                    )

                name, options = parse_reward_spec(cfg.reward)
                # where the transformer is: the CPU while a staged run builds its caches
                reward = load_reward(name, device=teacher.transformer.device, **options)
            self.reward_weights = check_reward(reward, cfg.reward_weights)
            self.reward = reward.requires_grad_(False).eval()
        super().__init__(teacher, cfg)
        numel = math.prod(teacher.latent_shape(1, self.height, self.width, self.num_frames)[1:])
        self.huber_c = cfg.huber_c * math.sqrt(numel)

    def frozen_modules(self) -> dict[str, nn.Module]:
        frozen_ = super().frozen_modules()
        if self.reward is not None:
            frozen_["reward"] = self.reward
        return frozen_

    def export_metadata(self) -> dict[str, Any]:
        cfg = self.config
        return {
            "regularizer": cfg.regularizer,
            "reward": cfg.reward,
            "reward_scale": cfg.reward_scale,
            "alpha": cfg.alpha,
            "teacher_guidance_scale": cfg.guidance_scale,
        }

    def reward_of(self, x0: Tensor, prompts: list[str]) -> Tensor:
        """r = sum_k w_k r_k(decode(x0), c) [B], differentiable w.r.t. x0."""
        assert self.reward is not None
        media = self.teacher.decode_latents(x0)
        scores = self.reward.score(media, prompts, differentiable=True)
        return sum(w * scores[k] for k, w in self.reward_weights.items())

    def time_weights(self, t: Tensor) -> Tensor:
        power = {"none": 0, "t": 1, "t2": 2}[self.config.time_weighting]
        return self.config.alpha * t.float().pow(power)

    def generator_loss(self, batch: PromptBatch, ctx: StepContext) -> tuple[Tensor, dict[str, Tensor]]:
        cfg, ids, prompts = self.config, batch.index, batch.prompt
        cond, uncond = self.encode(prompts, with_uncond=self.uses_cfg, images=batch.condition)
        x = self.sample(ids, ctx, cond, net=ctx.module("generator"))  # [B, ...] with the generator's graph
        reward = self.reward_of(x, prompts) if self.reward is not None else None
        t, noise, x_t = self.noised(x, ids, ctx, key="generator")
        weights = self.time_weights(t)
        if cfg.regularizer == "kl":
            with torch.no_grad():
                xt = x_t.detach()
                v_online = self.velocity(xt, t, cond, net=self.fake)
                v_ref = self.teacher_velocity(xt, t, cond, uncond)
            return kl_reward_generator_loss(
                reward, v_online, v_ref, x_t, t, reward_scale=cfg.reward_scale, weights=weights
            )
        # both score networks see x_t with its graph and frozen parameters (docs/algorithms.md 3.2)
        with common.frozen(self.fake):
            v_online = self.velocity(x_t, t, cond, net=self.fake)
            v_ref = self.teacher_velocity(x_t, t, cond, uncond)
        return distar_generator_loss(
            reward,
            v_online,
            v_ref,
            x_t,
            noise,
            t,
            reward_scale=cfg.reward_scale,
            distance=cfg.distance,
            c=self.huber_c,
            weights=weights,
        )


# ------------------------------------------------------------------------------------------------ run
@dataclass(kw_only=True)
class DistarRun:
    """Everything ``flowalign train distar`` needs (YAML recipe + dotted overrides)."""

    teacher: str = ""
    """Hub id or local folder of the flow teacher (the reference diffusion)."""
    teacher_dtype: Literal["fp32", "bf16", "fp16"] | None = None
    """Precision of the frozen teacher; null = the compute dtype of train.mixed_precision (fp32 for
    "no", bf16, fp16), as for every run. The generator and fake score stay fp32."""
    method: DistarConfig = field(default_factory=DistarConfig)
    """DI* settings (reward, reward_scale, alpha, ...)."""
    data: onestep_data.OneStepData = field(default_factory=onestep_data.OneStepData)
    """Prompts (data.prompts_file, or data.toy_items for toy captions)."""
    cache_prompts: bool = True
    """Encode every prompt (and the empty prompt of CFG) once through the teacher's text encoders before
    training; they then stay off the device (``flowalign/training/methods/onestep_cache.py``)."""
    train: TrainConfig = field(default_factory=TrainConfig)
    """Training loop settings."""


def run_distar(
    config: DistarRun,
    *,
    reward: RewardModel | None = None,
    resume: bool | str | Path = False,
    progress: bool = True,
):
    """Train a DI* one-step generator from ``config.teacher``; returns the loop's ``TrainResult``.

    The generator is written to ``<output_dir>/final`` in the one-step checkpoint format
    (``flowalign generate --one-step --model <output_dir>/final``).

    Raises:
        ModelLoadError: the teacher cannot be loaded or is not a supported flow family.
        ValueError: a non-differentiable reward, an unknown reward dimension, or no prompts.
    """
    from flowalign.training.loop import train

    if not config.teacher:
        raise ConfigError("the teacher model (hub id or folder) is required", key="teacher")
    from flowalign.training.methods.onestep_cache import (
        cache_onestep_conditioning,
        finish_onestep_loading,
        load_onestep_teacher,
    )

    teacher, frozen = load_onestep_teacher(config, method="DI*")
    method = DiffInstructStar(teacher, config.method, reward=reward)
    method.keep_teacher_in(frozen)
    dataset = onestep_data.build_dataset(
        config.data, kind="video" if teacher.is_video else "image", needs_real=False
    )
    dataset = cache_onestep_conditioning(config, method, dataset)
    finish_onestep_loading(config, method)
    return train(method, dataset, config.train, resume=resume, progress=progress, run_config=config)
