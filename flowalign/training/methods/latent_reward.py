"""Training the noise-aware latent reward model of Flow-NRG with the BTT loss (docs/algorithms.md 1A, 1D).

Each preference pair (x0_w, x0_l, c) is noised at one shared time t, each member with its own noise,

    x_t^w = (1 - t) x0_w + t eps_w,   x_t^l = (1 - t) x0_l + t eps_l,   t ~ U[t_min, t_max] (or logit-normal),

and the reward r_k(x_t, t, c) is fitted per dimension k with Bradley-Terry-with-ties
(:func:`flowalign.objectives.bt_ties.btt_loss`). Labels come from the batch (human labels) or from a
clean-input teacher reward (distillation: the teacher scores both clean items and
:func:`flowalign.objectives.bt_ties.labels_from_scores` turns the difference into 1 / -1 / tie with a margin). ``clean_inputs=True``
is the ablation the paper reports as failing (Table 7): t = 0 always, a reward that never saw noise.

Shared vs independent noise (``share_noise``, default False: a deviation from the issue's "shared t and
noise", measured). Sharing the draw makes the pair difference x_t^w - x_t^l = (1 - t)(x0_w - x0_l)
noise-free, but then any noise-dependent part of the reward cancels inside every pair, so nothing
constrains it, and guidance follows its gradient too. On the toy model (LoRA trunk; guidance with weights
{vq: 1} on 128 held-out samples, paired SE), a shared-noise reward (1,792 oracle pairs, 300 steps) LOWERED
the oracle vq (-0.039 +- 0.007 at strength 0.3, -0.34 at 1), and shared-noise rewards ranked
independently noised pairs at chance for t >= 0.3; a reward trained with one draw per member (2,688
pairs, 400 steps) raised it (+0.010 +- 0.001, +0.025 +- 0.004). Only t is shared in VideoAlign's
description (docs/algorithms.md 1D); ``share_noise=True`` keeps the other variant available.

Dataset items are dicts: ``"prompt"``; ``"latents_w"``/``"latents_l"`` (canonical latents) or
``"media_w"``/``"media_l"`` (pixels in [0, 1]); optional ``"labels"`` ``{name: 1 | 0 | -1 | -2}`` (1 = w
better, as in :mod:`flowalign.data.preference`), collated into a
:class:`~flowalign.data.batches.PairBatch`. :class:`ScoredPairs` builds such items from scored
samples (distillation without a teacher at training time).
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from itertools import combinations
from pathlib import Path
from typing import Literal

import torch
from torch import Tensor, nn
from torch.utils.data import Dataset

from flowalign import flow
from flowalign.config import LoraConfig
from flowalign.data.batches import PairBatch
from flowalign.models.base import FlowModel, PromptEmbeds
from flowalign.objectives.bt_ties import LABEL_MISSING, btt_loss, labels_from_scores, pairwise_accuracy
from flowalign.rewards.latent import LatentRewardModel
from flowalign.training.method import Method, StepContext
from flowalign.training.methods.common import CachedPrompts
from flowalign.training.methods.score_stats import NormalisedScores, ScoreNormaliser

__all__ = [
    "LatentRewardTraining",
    "LatentRewardTrainingConfig",
    "PreferenceItems",
    "ScoredPairs",
    "pairs_within_groups",
]


@dataclass(kw_only=True)
class LatentRewardTrainingConfig:
    """Latent reward model training settings (``flowalign train latent-reward``)."""

    dimensions: list[str] = field(default_factory=lambda: ["vq", "ta"])
    """Reward dimensions, e.g. [vq, ta] for images, [vq, mq, ta] for videos."""
    num_blocks: int = 2
    """Trunk depth: the first k blocks of the base transformer."""
    head_hidden: int = 128
    """Hidden width of each per-dimension head."""
    trunk_training: Literal["frozen", "lora", "full"] = "lora"
    """How the trunk copy is trained: not at all, LoRA adapters (``lora``), or every weight."""
    lora: LoraConfig = field(default_factory=LoraConfig)
    """Adapters for ``trunk_training: lora``."""
    time_density: Literal["uniform", "logit_normal"] = "uniform"
    """Law of the shared pair time t before it is mapped into [t_min, t_max]."""
    t_min: float = 0.0
    t_max: float = 0.98
    """Times used in training; match the guidance's t_max (noisier inputs are never guided harder)."""
    clean_inputs: bool = False
    """Ablation: train on clean inputs only (t = 0)."""
    share_noise: bool = False
    """One noise draw for both members of a pair (else one each; t is always shared). See the module doc."""
    theta: float = 5.0
    """BTT tie parameter (VideoReward code: 5)."""
    average: Literal["all_slots", "valid"] = "all_slots"
    """BTT averaging over missing slots (see btt_loss)."""
    tie_margin: float = 0.05
    """Teacher labels: |score_w - score_l| <= tie_margin is a tie (teacher units)."""
    label_map: dict[str, str] = field(default_factory=dict)
    """Dataset label name -> reward dimension (default: case-insensitive match, e.g. VQ -> vq)."""
    norm_momentum: float = 0.99
    """EMA momentum of the raw-score statistics that become the exported normalisation."""

    def __post_init__(self) -> None:
        if not self.dimensions:
            raise ValueError("latent reward config: dimensions is empty")
        if not 0 <= self.t_min <= self.t_max < 1:
            raise ValueError(
                f"latent reward config: need 0 <= t_min <= t_max < 1, got {self.t_min}, {self.t_max}"
            )
        if self.tie_margin < 0:
            raise ValueError(f"latent reward config: tie_margin must be >= 0, got {self.tie_margin}")
        if not 0 <= self.norm_momentum < 1:
            raise ValueError(
                f"latent reward config: norm_momentum must be in [0, 1), got {self.norm_momentum}"
            )


def pairs_within_groups(
    groups: Sequence[object], *, max_pairs_per_group: int | None = None
) -> list[tuple[int, int]]:
    """All index pairs (i < j) whose items share a group (e.g. samples of one prompt), in order."""
    members: dict[object, list[int]] = {}
    for i, g in enumerate(groups):
        members.setdefault(g, []).append(i)
    out = []
    for idx in members.values():
        out.extend(list(combinations(idx, 2))[:max_pairs_per_group])
    return out


class ScoredPairs(Dataset):
    """Pairs of scored samples labelled by score differences (distillation of a clean reward).

    Args:
        latents: canonical clean latents [N, ...] of the samples.
        prompts: N prompts.
        scores: {dimension: [N]} clean-reward scores.
        pairs: (i, j) index pairs (e.g. :func:`pairs_within_groups` over prompts).
        tie_margin: {dimension: margin} or one margin for all.
    """

    def __init__(
        self,
        latents: Tensor,
        prompts: Sequence[str],
        scores: Mapping[str, Tensor],
        pairs: Sequence[tuple[int, int]],
        *,
        tie_margin: float | Mapping[str, float] = 0.0,
    ) -> None:
        n = latents.shape[0]
        if len(prompts) != n or any(v.shape != (n,) for v in scores.values()):
            raise ValueError(f"ScoredPairs: {n} latents need {n} prompts and [N] scores per dimension")
        bad = [p for p in pairs if not (0 <= p[0] < n and 0 <= p[1] < n) or p[0] == p[1]]
        if bad or not pairs:
            raise ValueError(
                f"ScoredPairs: pairs must be distinct indices in [0, {n}); bad: {bad[:3]} of {len(pairs)}"
            )
        self.latents, self.prompts, self.pairs = latents, list(prompts), list(pairs)
        i, j = (torch.tensor(c) for c in zip(*self.pairs, strict=True))
        margins = tie_margin if isinstance(tie_margin, Mapping) else dict.fromkeys(scores, tie_margin)
        self.labels = {d: labels_from_scores(s[i], s[j], tie_margin=margins[d]) for d, s in scores.items()}

    def __len__(self) -> int:
        return len(self.pairs)

    def __getitem__(self, k: int) -> dict:
        i, j = self.pairs[k]
        if self.prompts[i] != self.prompts[j]:
            raise ValueError(f"ScoredPairs pair {k}: items {i} and {j} have different prompts")
        return {
            "prompt": self.prompts[i],
            "latents_w": self.latents[i],
            "latents_l": self.latents[j],
            "labels": {d: int(v[k]) for d, v in self.labels.items()},
        }


class PreferenceItems(Dataset):
    """Human-labelled pairs (a :class:`flowalign.data.preference.PreferenceDataset`) as training dicts.

    Item i is ``{"prompt", "media_w", "media_l", "labels"}`` of the dataset's pair i (labels by the
    dataset's dimension names, e.g. "VQ", "TA"; the method maps them to reward dimensions).
    """

    def __init__(self, pairs: Dataset) -> None:
        self.pairs = pairs

    def __len__(self) -> int:
        return len(self.pairs)

    def __getitem__(self, i: int) -> dict:
        pair = self.pairs[i]
        return {
            "prompt": pair.prompt,
            "media_w": pair.media_w,
            "media_l": pair.media_l,
            "labels": dict(pair.labels),
        }

    def prompts(self) -> list[str]:
        return [self.pairs.prompt(i) for i in range(len(self.pairs))]


class LatentRewardTraining(CachedPrompts, NormalisedScores, Method):
    """BTT training of a :class:`LatentRewardModel` on noised preference pairs (Flow-NRG's guide).

    The base model is frozen (``requires_grad=False``, eval mode): it only encodes prompts and media.
    :meth:`cache_prompts` encodes the prompts once (the text encoders then leave the device), and a
    run may cache both members' latents (:mod:`flowalign.training.latent_cache`).

    Args:
        model: the base flow model (encodes prompts and media; its transformer is copied, not trained).
        config: settings.
        reward_model: an existing latent reward model to train; default: cut from ``model``.
        teacher: a clean-input RewardModel labelling batches without ``"labels"`` (distillation).
    """

    def __init__(
        self,
        model: FlowModel,
        config: LatentRewardTrainingConfig | None = None,
        *,
        reward_model: LatentRewardModel | None = None,
        teacher=None,
    ) -> None:
        cfg = self.config = config or LatentRewardTrainingConfig()
        self.model = model
        for module in model.modules().values():
            module.requires_grad_(False).eval()
        if reward_model is None:
            reward_model = LatentRewardModel.from_flow_model(
                model, dimensions=cfg.dimensions, num_blocks=cfg.num_blocks, head_hidden=cfg.head_hidden
            )
        reward_model.check_compatible(model)
        if list(reward_model.dimensions) != list(cfg.dimensions):
            raise ValueError(
                f"reward model dimensions {list(reward_model.dimensions)} != config {cfg.dimensions}"
            )
        if teacher is not None:
            missing = [d for d in cfg.dimensions if d not in teacher.dimensions]
            if missing:
                raise ValueError(f"teacher {teacher.name!r} does not score dimension(s) {missing}")
        self.reward_model, self.teacher = reward_model, teacher
        reward_model.requires_grad_(cfg.trunk_training == "full").train()
        reward_model.heads.requires_grad_(True)
        for p in reward_model.unused_parameters():
            p.requires_grad_(False)
        if cfg.trunk_training == "lora":
            from flowalign.models.lora import add_lora

            add_lora(reward_model.trunk, cfg.lora)
        # EMA of the mean score and of the half mean squared pair difference, exported as the guide's
        # normalisation (score_statistics):
        # std = sqrt(E[(r_w - r_l)^2] / 2) over training pairs (EMA): the spread of scores at ONE time t
        # (the pair's), which equals the score std for independent same-t samples. The plain std over the
        # training batches is unusable: the reward carries a large t-dependent offset (BTT only sees
        # same-t differences) that swamped it 40-fold on the toy model and made guidance vanish.
        self.normaliser = ScoreNormaliser(
            cfg.dimensions, cfg.norm_momentum, second_key="norm_half_diff_sq", centre=False
        )

    def trainable_modules(self) -> dict[str, nn.Module]:
        return {"latent_reward": self.reward_model}

    def frozen_modules(self) -> dict[str, nn.Module]:
        """The base model's components, less those its caches replace (:meth:`cache_prompts`, cached
        latents); a teacher that scores decoded cached latents keeps the VAE."""
        frozen = self.without_text_encoders(dict(self.model.modules()))
        if self.teacher is not None:
            frozen["teacher"] = self.teacher
            if "vae" in self.model.modules():
                frozen["vae"] = self.model.modules()["vae"]
        return frozen

    def collate(self, items: list[dict]) -> PairBatch:
        return PairBatch.collate(items)

    def _clean_latents(self, batch: PairBatch) -> tuple[Tensor, Tensor]:
        """The pair's clean latents: the cached ones, else the encoded media (each member on its own)."""
        if batch.latents_w is not None:
            return batch.latents_w, batch.latents_l
        with torch.no_grad():
            return self.model.encode_media(batch.media_w), self.model.encode_media(batch.media_l)

    def _labels(self, batch: PairBatch, x0_w: Tensor, x0_l: Tensor) -> Tensor:
        """Labels [B, K] in the reward's dimension order (1 = w better)."""
        dims = list(self.config.dimensions)
        if batch.labels is not None:
            out = torch.full((x0_w.shape[0], len(dims)), LABEL_MISSING, dtype=torch.long)
            for name, values in batch.labels.items():
                dim = self.config.label_map.get(name, name.lower())
                if dim not in dims:
                    raise ValueError(
                        f"latent reward: label {name!r} matches no reward dimension {dims}; set label_map"
                    )
                out[:, dims.index(dim)] = values.cpu()
            return out.to(x0_w.device)
        if self.teacher is None:
            raise ValueError("latent reward: the batch has no 'labels' and no teacher reward was given")
        with torch.no_grad():
            media = [batch.media_w, batch.media_l]
            if batch.latents_w is not None:  # cached latents: the teacher scores their decodings
                media = [self.model.decode_latents(x0_w), self.model.decode_latents(x0_l)]
            s_w, s_l = (self.teacher.score(m, batch.prompt) for m in media)
        a = torch.stack([s_w[d] for d in dims], dim=1)  # [B, K]
        b = torch.stack([s_l[d] for d in dims], dim=1)
        return labels_from_scores(a, b, tie_margin=self.config.tie_margin).to(x0_w.device)

    def sample_t(self, ids: Tensor, ctx: StepContext) -> Tensor:
        """Shared time per pair [B] in [t_min, t_max] (0 with ``clean_inputs``)."""
        cfg = self.config
        if cfg.clean_inputs:
            return torch.zeros(len(ids), device=ctx.device)
        u = flow.t_from_draws(
            ctx.randn((), ids, key="t_normal"), ctx.rand((), ids, key="t_uniform"), density=cfg.time_density
        )
        return (cfg.t_min + (cfg.t_max - cfg.t_min) * u).to(ctx.device)

    def compute_loss(self, batch: PairBatch, ctx: StepContext, group: str):
        batch = PairBatch.coerce(batch)
        cfg, ids = self.config, batch.index
        x0_w, x0_l = self._clean_latents(batch)
        labels = self._labels(batch, x0_w, x0_l)
        cond = self.condition(batch.prompt, x0_w.device, images=batch.condition, like=x0_w)
        noise_w = ctx.randn_like(x0_w, ids, key="noise")
        noise_l = noise_w if cfg.share_noise else ctx.randn_like(x0_l, ids, key="noise_l")
        t = self.sample_t(ids, ctx)  # one t per pair
        x_t = torch.cat([flow.interpolate(x0_w, noise_w, t), flow.interpolate(x0_l, noise_l, t)])  # [2B, ...]
        scores = ctx.module("latent_reward")(x_t, torch.cat([t, t]), PromptEmbeds.cat([cond, cond]))
        r = torch.stack([scores[d] for d in cfg.dimensions], dim=1)  # [2B, K]
        r_w, r_l = r.chunk(2)
        loss, metrics = btt_loss(r_w, r_l, labels, theta=cfg.theta, average=cfg.average)
        for k, dim in enumerate(cfg.dimensions):
            metrics[f"accuracy_{dim}"] = pairwise_accuracy(
                r_w[:, k].detach(), r_l[:, k].detach(), labels[:, k]
            )
        self._update_stats(r_w.detach(), r_l.detach())
        return loss.mean(), metrics

    def _update_stats(self, r_w: Tensor, r_l: Tensor) -> None:
        r_w, r_l = r_w.double(), r_l.double()  # [B, K]
        self.normaliser.update(torch.cat([r_w, r_l]).mean(dim=0), 0.5 * (r_w - r_l).pow(2).mean(dim=0))

    def export(self, out_dir: Path) -> None:
        """Save the guide loadably (``LatentRewardModel.from_pretrained(out_dir)``), with its normalisation."""
        cfg = self.config
        rm = self.reward_model
        rm.set_normalisation(self.score_statistics())
        rm.spec.metadata.update(
            t_min=0.0 if cfg.clean_inputs else cfg.t_min,
            t_max=0.0 if cfg.clean_inputs else cfg.t_max,
            clean_inputs=cfg.clean_inputs,
            trunk_training=cfg.trunk_training,
            theta=cfg.theta,
        )
        rm.save_pretrained(out_dir)
