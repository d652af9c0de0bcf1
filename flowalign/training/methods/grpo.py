r"""Flow-GRPO on the shared loop: sample K trajectories per prompt, score them, one clipped policy step.

Each optimizer step, for the prompts of the micro-batch (docs/algorithms.md 1E, 1F):

1. sampling, without gradient, with the current policy (the transformer as it is, CFG on when
   ``guidance_scale > 1``): K SDE trajectories per prompt, SDE steps (noise level η) on the training
   window and deterministic Euler steps elsewhere, the log-probability of every window step kept;
2. scoring: the decoded samples go to the reward function in chunks of ``reward_batch_size``; its
   ``"overall"`` (the registry's weighted mix of normalised dimensions) is the reward;
3. group-relative advantages over the K samples of each prompt;
4. the loss: for every window step the policy's log-probability of the stored transition, with
   gradient, in the PPO-clipped surrogate, plus β_KL times the Gaussian KL to the reference (the
   policy with its LoRA adapters off, or a frozen copy for a full fine-tune):

       L = mean_{i, j∈window} [ max(-A_i ρ_ij, -A_i clip(ρ_ij, 1 ± ε)) + β_KL ||μ_θ - μ_ref||² / (2σ_j²) ]

Every random number (initial noise, the SDE's step noise, the random window) is drawn through the
step context from (seed, step, sample id), with sample id = prompt index · K + k. A run therefore
resumes exactly from the step number alone (the sampling RNG included), and each process samples its
own prompts with the same numbers as a single process would. By default each step samples afresh, so
θ_old = θ at the update: ρ = 1 and the clipped surrogate's gradient is the plain policy gradient. With
``updates_per_batch`` = μ > 1, μ optimizer steps share one sampled batch: the later ones see ρ ≠ 1 and
the clip acts; the samples of a cycle under way are part of the checkpointed method state.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Literal

import torch
from torch import Tensor, nn
from torch.utils.data import Dataset

from flowalign.config import LoraConfig
from flowalign.data.batches import PromptBatch
from flowalign.models.base import FlowModel
from flowalign.objectives.grpo import gaussian_mean_kl, group_advantages, grpo_clipped_loss
from flowalign.sampling.guidance import model_velocity_fn
from flowalign.sampling.sde import SDETrajectory, sample_sde, sde_step_log_prob, sde_step_mean_std
from flowalign.training.method import Method, StepContext, sample_seed
from flowalign.training.methods.common import FrozenReference, TransformerPolicy, freeze_all_but_transformer

__all__ = ["FlowGRPO", "GRPOConfig", "PromptItems", "RewardFn", "training_window"]

RewardFn = Callable[[Tensor, list[str]], dict[str, Tensor]]
"""(media [B, ...] in [0, 1], prompts) -> {"overall": [B], other dimensions: [B]}."""

Window = Literal["all", "random", "sliding"]


@dataclass
class GRPOConfig:
    """Flow-GRPO settings."""

    num_samples: int = 4
    """K trajectories per prompt (the group of the advantages), >= 2."""
    num_inference_steps: int = 10
    """Sampling steps on the model's own time grid."""
    guidance_scale: float = 3.0
    """CFG during sampling and in the trained policy (1 = off)."""
    eta: float = 0.5
    """SDE noise level η of the window steps."""
    t_clamp: float = 0.9
    """σ_t uses min(t, t_clamp) (σ_t diverges at t = 1). On the toy base (10 steps) η = 0.7 with
    t_clamp = 0.98 makes the first step's std 1.65 and its samples lose every oracle reward; η = 0.5 with
    0.9 keeps text alignment at the ODE's level."""
    window: Window = "all"
    """Trained (SDE) steps: "all"; "random" (window_size steps drawn each optimizer step); "sliding"
    (window_size consecutive steps from high noise to low, advancing every window_shift_every steps)."""
    window_size: int = 2
    """Steps in a "random" or "sliding" window."""
    window_shift_every: int = 10
    """"sliding": optimizer steps before the window moves one step toward t = 0 (wraps around)."""
    clip_range: float = 1e-4
    """PPO ε on per-element-mean log-probabilities."""
    kl_beta: float = 0.04
    """β_KL of the KL to the reference (0 skips the reference forward)."""
    advantage_scale: Literal["group", "none"] = "group"
    """"group": divide by the group's std; "none": the std-free advantages."""
    advantage_clip: float | None = 5.0
    """Clip the advantages to ±this (null: no clip)."""
    log_prob_reduction: Literal["mean", "sum"] = "mean"
    """Per-step log-probabilities and KL as a per-element mean (Flow-GRPO) or the exact sum."""
    reward_batch_size: int = 64
    """Samples per reward call."""
    updates_per_batch: int = 1
    """μ: optimizer steps on each sampled batch. 1 samples afresh every step (on-policy, ρ = 1); with μ > 1
    steps k·μ sample and steps k·μ + 1 .. k·μ + μ - 1 reuse those trajectories, their advantages and
    their old log-probabilities, so ρ moves away from 1 and the PPO clip acts (the loop's batches of
    those steps are not used)."""
    height: int | None = None
    """Sample height (null: the model's default)."""
    width: int | None = None
    """Sample width (null: the model's default)."""
    num_frames: int | None = None
    """Frames of video models (null: the model's default)."""

    def __post_init__(self) -> None:
        checks = [
            (self.num_samples >= 2, "num_samples", "must be >= 2 (the advantages are relative to the group)"),
            (self.num_inference_steps >= 1, "num_inference_steps", "must be >= 1"),
            (self.eta > 0, "eta", "must be > 0 (eta = 0 is the ODE, which has no step densities)"),
            (0 < self.t_clamp < 1, "t_clamp", "must be in (0, 1)"),
            (self.window in ("all", "random", "sliding"), "window", "must be all, random or sliding"),
            (1 <= self.window_size <= self.num_inference_steps, "window_size", "must be in [1, steps]"),
            (self.window_shift_every >= 1, "window_shift_every", "must be >= 1"),
            (self.clip_range > 0, "clip_range", "must be > 0"),
            (self.kl_beta >= 0, "kl_beta", "must be >= 0"),
            (self.reward_batch_size >= 1, "reward_batch_size", "must be >= 1"),
            (self.updates_per_batch >= 1, "updates_per_batch", "must be >= 1"),
        ]
        for ok, key, why in checks:
            if not ok:
                raise ValueError(f"grpo.{key} {why}, got {getattr(self, key)!r}")


def training_window(cfg: GRPOConfig, step: int, seed: int) -> list[int]:
    """The SDE step indices of optimizer step ``step`` (the same on every process)."""
    n, w = cfg.num_inference_steps, cfg.window_size
    if cfg.window == "all":
        return list(range(n))
    if cfg.window == "sliding":
        start = (step // cfg.window_shift_every) % (n - w + 1)
        return list(range(start, start + w))
    g = torch.Generator().manual_seed(sample_seed(seed, step, "grpo", "window", 0))
    return sorted(torch.randperm(n, generator=g)[:w].tolist())


class PromptItems(Dataset):
    """A prompt list as training items ``{"prompt", "index"}``."""

    def __init__(self, prompts: Sequence[str]):
        if isinstance(prompts, str) or not prompts:
            raise ValueError("grpo: needs a non-empty list of prompts")
        self.prompts = list(prompts)

    def __len__(self) -> int:
        return len(self.prompts)

    def __getitem__(self, i: int) -> dict:
        return {"prompt": self.prompts[i], "index": i}


class FlowGRPO(TransformerPolicy, Method):
    """Flow-GRPO (module docstring). Batches: :class:`~flowalign.data.batches.PromptBatch` (``prompt``, ``index`` [P])."""

    def __init__(
        self,
        model: FlowModel,
        reward_fn: RewardFn,
        config: GRPOConfig | None = None,
        *,
        lora: LoraConfig | None = None,
    ):
        self.model = model
        self.reward_fn = reward_fn
        self.config = config or GRPOConfig()
        self.lora = lora
        freeze_all_but_transformer(model, lora)
        self.reference = FrozenReference(model.transformer, model.compute_dtype)
        self._reuse: dict[int, dict] = {}  # micro-step -> the samples of the current reuse cycle

    def collate(self, items: list[dict]) -> PromptBatch:
        return PromptBatch.collate(items)

    def cache_prompts(self, prompts: Sequence[str], **kwargs):
        """Cache the prompts and the empty prompt (CFG's unconditional branch)."""
        return super().cache_prompts([*prompts, ""], **kwargs)

    def _conditions(self, prompts: list[str], device: torch.device):
        cond = self.condition(prompts, device)
        if self.config.guidance_scale == 1.0:
            return cond, None
        return cond, self.condition([""] * len(prompts), device)

    def _size(self) -> dict[str, int]:
        m, c = self.model, self.config
        return {
            "height": c.height or m.default_height,
            "width": c.width or m.default_width,
            "num_frames": c.num_frames or m.default_num_frames,
        }

    def _velocity(self, cond, uncond, net: nn.Module):
        return model_velocity_fn(
            self.model, cond, uncond=uncond, guidance_scale=self.config.guidance_scale, net=net
        )

    @torch.no_grad()
    def sample_trajectories(
        self, prompts: list[str], sample_ids: list[int], ctx: StepContext, window: list[int]
    ):
        """SDE trajectories of the K-expanded prompts with the current policy -> (trajectory, time grid)."""
        cfg, size = self.config, self._size()
        shape = self.model.latent_shape(1, **size)[1:]
        noise = ctx.randn(shape, sample_ids, key="grpo_noise")
        step_noise = ctx.randn((cfg.num_inference_steps, *shape), sample_ids, key="grpo_sde")
        ts = self.model.time_grid(cfg.num_inference_steps, **size, device=ctx.device)
        cond, uncond = self._conditions(prompts, ctx.device)
        traj = sample_sde(
            self._velocity(cond, uncond, self.model.transformer),
            noise,
            ts,
            eta=cfg.eta,
            step_noise=step_noise.transpose(0, 1),
            window=window,
            t_clamp=cfg.t_clamp,
            reduction=cfg.log_prob_reduction,
        )
        return traj, ts

    @torch.no_grad()
    def score(self, x0: Tensor, prompts: list[str], device: torch.device) -> dict[str, Tensor]:
        """Decode and score in chunks of ``reward_batch_size`` -> {dimension: [B]} with "overall"."""
        scores: dict[str, list[Tensor]] = {}
        step = self.config.reward_batch_size
        for start in range(0, len(prompts), step):
            media = self.model.decode_latents(x0[start : start + step]).float().clamp(0, 1)
            for key, value in self.reward_fn(media, prompts[start : start + step]).items():
                scores.setdefault(key, []).append(value.detach().float().to(device))
        out = {k: torch.cat(v) for k, v in scores.items()}
        if "overall" not in out:
            raise ValueError(f"grpo: the reward function returned {sorted(out)}, without 'overall'")
        return out

    def sample(self, prompts: list[str], sample_ids: list[int], ctx: StepContext, window: list[int]):
        """K-expanded prompts -> (trajectory, time grid, rewards dict); no gradient."""
        traj, ts = self.sample_trajectories(prompts, sample_ids, ctx, window)
        return traj, ts, self.score(traj.x0, prompts, ctx.device)

    def policy_loss(self, traj, ts: Tensor, adv: Tensor, prompts: list[str], ctx: StepContext):
        """The clipped surrogate + β_KL KL over the window's steps, with gradient -> (loss, metrics)."""
        cfg = self.config
        cond, uncond = self._conditions(prompts, ctx.device)
        policy = self._velocity(cond, uncond, ctx.module("transformer"))
        losses, kls, metric_sums = [], [], {}
        for j, i in enumerate(traj.window):
            x, x_next = traj.latents[j], traj.next_latents[j]
            t = ts[i].expand(x.shape[0])
            lp, mean, std = sde_step_log_prob(
                x, x_next, policy(x, t), t, ts[i + 1],
                eta=cfg.eta, t_clamp=cfg.t_clamp, reduction=cfg.log_prob_reduction,
            )  # fmt: skip
            loss, metrics = grpo_clipped_loss(
                lp[:, None], traj.log_probs[:, j : j + 1], adv, clip_range=cfg.clip_range
            )
            for key, value in metrics.items():
                metric_sums[key] = metric_sums.get(key, 0.0) + value / len(traj.window)
            if cfg.kl_beta > 0:
                with torch.no_grad(), self.reference.network(self.model.transformer) as ref_net:
                    v_ref = self._velocity(cond, uncond, ref_net)(x, t)
                ref_mean, _ = sde_step_mean_std(x, v_ref, t, ts[i + 1], eta=cfg.eta, t_clamp=cfg.t_clamp)
                kl = gaussian_mean_kl(mean, ref_mean, std, reduction=cfg.log_prob_reduction)
                kls.append(kl.detach().mean())
                loss = loss + cfg.kl_beta * kl
            losses.append(loss)
        kl_value = torch.stack(kls).mean() if kls else torch.zeros((), device=ctx.device)
        return torch.stack(losses).mean(), {**metric_sums, "kl": kl_value}

    def _sampled_batch(self, batch: PromptBatch, ctx: StepContext) -> dict:
        """This micro-batch's sampled trajectories: sampled now at a cycle's first step, else the stored ones."""
        cfg = self.config
        mu, k = cfg.updates_per_batch, cfg.num_samples
        if ctx.step % mu:
            stored = self._reuse.get(ctx.micro_step)
            if stored is None or stored["step"] != ctx.step - ctx.step % mu:
                raise RuntimeError(
                    f"grpo: step {ctx.step} reuses the samples of step {ctx.step - ctx.step % mu}, which this "
                    "process does not hold (resume several processes at a multiple of grpo.updates_per_batch)"
                )
            return stored
        prompts = [p for p in batch.prompt for _ in range(k)]
        sample_ids = [int(i) * k + j for i in batch.index.tolist() for j in range(k)]
        traj, ts, scores = self.sample(prompts, sample_ids, ctx, training_window(cfg, ctx.step, ctx.seed))
        adv = group_advantages(scores["overall"], k, scale=cfg.advantage_scale, clip=cfg.advantage_clip)
        sampled = {"step": ctx.step, "traj": traj, "ts": ts, "adv": adv, "prompts": prompts, "scores": scores}
        if mu > 1:
            self._reuse[ctx.micro_step] = sampled
        return sampled

    def compute_loss(self, batch: PromptBatch, ctx: StepContext, group: str):
        k = self.config.num_samples
        batch = PromptBatch.coerce(batch)
        was_training = self.model.transformer.training
        self.model.transformer.eval()  # sampling and the update see the same network
        try:
            s = self._sampled_batch(batch, ctx)
            loss, metrics = self.policy_loss(s["traj"], s["ts"], s["adv"], s["prompts"], ctx)
        finally:
            self.model.transformer.train(was_training)
        scores = s["scores"]
        rewards = {f"reward_{k_}": v.mean() for k_, v in scores.items() if v.ndim == 1}
        group_std = scores["overall"].reshape(-1, k).std(1, unbiased=False).mean()
        return loss, {**metrics, **rewards, "reward_group_std": group_std}

    def state_dict(self) -> dict:
        """The stored samples of a reuse cycle (``updates_per_batch`` > 1), when one is under way."""
        return (
            {"reuse": {m: {**s, "traj": vars(s["traj"])} for m, s in self._reuse.items()}}
            if self._reuse
            else {}
        )

    def load_state_dict(self, state: dict) -> None:
        if set(state) - {"reuse"}:
            raise ValueError(f"grpo: a checkpoint state with keys {sorted(state)}, expected reuse")
        self._reuse = {
            int(m): {**s, "traj": SDETrajectory(**s["traj"])} for m, s in state.get("reuse", {}).items()
        }

    def export(self, out_dir: Path) -> None:
        """As Flow-DPO's export: a LoRA file plus the merged model, or the whole model."""
        from flowalign.training.methods.dpo import FlowDPO

        FlowDPO.export(self, out_dir)  # uses only self.model and self.lora
