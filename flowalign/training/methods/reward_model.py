"""Training a multi-dimensional reward model with Bradley-Terry-with-ties (VideoReward, docs/algorithms.md 1A).

Each training item is a pair (A, B) of one prompt with per-dimension labels 1 (A better), -1 (B
better), 0 (tie) or -2 (missing). Both members are scored in one batch, r = r(A), r(B) in R^K, and

    loss = btt_loss(r(A), r(B), labels; theta = 5)           (objectives/bt_ties.py)

with missing slots contributing nothing (``average="all_slots"`` divides by B K as VideoReward's code,
``"valid"`` by the labelled slots). Logged per step: the BTT loss and the pairwise accuracy per
dimension; held-out evaluation (:func:`evaluate_pairs`) adds tie-calibrated accuracy.

The per-dimension normalisation exported with the model is a running (EMA) mean and standard deviation
of the training scores; it is method state, so it is checkpointed and a resumed run exports the same.
The method draws no random numbers (no noise, no augmentation), so resuming needs only the loop's state.
"""

from __future__ import annotations

import math
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Literal

import torch
from torch import Tensor, nn
from torch.utils.data import Dataset

from flowalign.data.batches import PairBatch
from flowalign.objectives.bt_ties import (
    LABEL_MISSING,
    LABEL_TIE,
    btt_loss,
    pairwise_accuracy,
    tie_calibrated_accuracy,
)
from flowalign.rewards.multihead import MultiHeadRewardModel
from flowalign.training.method import Method, StepContext
from flowalign.training.methods.score_stats import NormalisedScores, ScoreNormaliser

__all__ = ["RewardModelTraining", "RewardModelTrainingConfig", "evaluate_pairs", "map_labels"]


@dataclass(kw_only=True)
class RewardModelTrainingConfig:
    """BTT training of a multi-head reward model (``flowalign train reward``, key ``method``)."""

    theta: float = 5.0
    """BTT tie parameter theta > 1 (VideoReward code: 5)."""
    average: Literal["all_slots", "valid"] = "all_slots"
    """How missing labels enter the mean: divide by all B*K slots (reference code) or by labelled ones."""
    label_map: dict[str, str] = field(default_factory=dict)
    """Dataset label name -> reward dimension (default: the name lower-cased, e.g. VQ -> vq)."""
    norm_momentum: float = 0.99
    """EMA momentum of the score statistics exported as the model's normalisation."""

    def __post_init__(self) -> None:
        if not (self.theta > 1 and math.isfinite(self.theta)):
            raise ValueError(f"reward model training: theta must be a finite value > 1, got {self.theta}")
        if not 0 <= self.norm_momentum < 1:
            raise ValueError(
                f"reward model training: norm_momentum must be in [0, 1), got {self.norm_momentum}"
            )


def map_labels(
    labels: dict[str, Tensor], dimensions: list[str], label_map: dict[str, str], *, batch: int
) -> Tensor:
    """Dataset labels ``{name: long [B]}`` -> [B, K] in ``dimensions`` order; absent dimensions are missing.

    Raises:
        ValueError: a label name that maps to no reward dimension (naming it and the dimensions).
    """
    out = torch.full((batch, len(dimensions)), LABEL_MISSING, dtype=torch.long)
    for name, values in labels.items():
        dim = label_map.get(name, name.lower())
        if dim not in dimensions:
            raise ValueError(
                f"reward model: label {name!r} matches no reward dimension {dimensions}; "
                "set method.label_map or model.dimensions"
            )
        out[:, dimensions.index(dim)] = values.cpu()
    return out


def _pair_media(batch: PairBatch | Mapping) -> PairBatch:
    """A labelled pair batch with media (what the reward model scores).

    Raises:
        ValueError: a batch without labels or without ``media_w``/``media_l`` (cached latents).
    """
    batch = PairBatch.coerce(batch)
    if batch.labels is None:
        raise ValueError("reward model batch: the pairs have no 'labels'")
    if batch.media_w is None:
        raise ValueError("reward model batch: the pairs have no media_w/media_l (the model reads pixels)")
    return batch


class RewardModelTraining(NormalisedScores, Method):
    """BTT training of a :class:`MultiHeadRewardModel` on labelled pairs (every weight trainable).

    Args:
        reward_model: the model to train (put in train mode; every parameter that reaches a score
            is trained, the others are frozen: see ``MultiHeadRewardModel.unused_parameters``).
        config: settings.
    """

    def __init__(self, reward_model: MultiHeadRewardModel, config: RewardModelTrainingConfig | None = None):
        self.config = config or RewardModelTrainingConfig()
        self.reward_model = reward_model
        reward_model.requires_grad_(True).train()
        for p in reward_model.unused_parameters():
            p.requires_grad_(False)
        # EMA of the mean score and of its mean square: std = sqrt(E[r^2] - E[r]^2)
        self.normaliser = ScoreNormaliser(
            reward_model.dimensions, self.config.norm_momentum, second_key="norm_sq_mean", centre=True
        )

    @property
    def dimensions(self) -> list[str]:
        return list(self.reward_model.dimensions)

    def trainable_modules(self) -> dict[str, nn.Module]:
        return {"reward_model": self.reward_model}

    def collate(self, items: list[dict]) -> PairBatch:
        return PairBatch.collate(items)

    def compute_loss(self, batch: PairBatch, ctx: StepContext, group: str):
        cfg, dims = self.config, self.dimensions
        batch = _pair_media(batch)
        media_w, media_l = batch.media_w, batch.media_l
        b = media_w.shape[0]
        labels = map_labels(batch.labels, dims, cfg.label_map, batch=b).to(media_w.device)
        scores = ctx.module("reward_model")(torch.cat([media_w, media_l]), list(batch.prompt) * 2)
        r = torch.stack([scores[d] for d in dims], dim=1)  # [2B, K] float32
        r_w, r_l = r[:b], r[b:]
        loss, metrics = btt_loss(r_w, r_l, labels, theta=cfg.theta, average=cfg.average)
        for k, dim in enumerate(dims):
            metrics[f"accuracy_{dim}"] = pairwise_accuracy(
                r_w[:, k].detach(), r_l[:, k].detach(), labels[:, k]
            )
        self._update_stats(r.detach())
        return loss.mean(), metrics

    def _update_stats(self, r: Tensor) -> None:
        r = r.double()  # [2B, K]
        self.normaliser.update(r.mean(dim=0), r.pow(2).mean(dim=0))

    def export(self, out_dir: Path) -> None:
        """Save the model loadably (``MultiHeadRewardModel.from_pretrained(out_dir)``) with its normalisation."""
        rm = self.reward_model
        rm.set_normalisation(self.score_statistics())
        rm.config.metadata.update(theta=self.config.theta, average=self.config.average)
        rm.save_pretrained(out_dir)


@torch.no_grad()
def evaluate_pairs(
    model: MultiHeadRewardModel,
    pairs: Dataset,
    *,
    batch_size: int = 64,
    label_map: dict[str, str] | None = None,
) -> dict[str, dict[str, float]]:
    """Held-out accuracy of a reward model on labelled pairs, per dimension.

    Args:
        model: the reward model (scored in eval mode; its mode is restored afterwards).
        pairs: a dataset of pair items (``{"prompt", "media_w", "media_l", "labels"}``).
        batch_size: pairs per forward pass.
        label_map: dataset label name -> dimension (default: lower-cased name).

    Returns:
        ``{dim: {"accuracy": C / (C + D) over non-tie pairs, "accuracy_with_ties": tie-calibrated
        accuracy over all labelled pairs, "tie_threshold": its |r_A - r_B| threshold, "num_pairs":
        labelled pairs, "num_decided": non-tie pairs}}``.
    """
    was_training = model.training
    model.eval()
    dims = list(model.dimensions)
    r_w, r_l, labels = [], [], []
    try:
        for lo in range(0, len(pairs), batch_size):
            items = [{**pairs[i], "index": i} for i in range(lo, min(len(pairs), lo + batch_size))]
            batch = _pair_media(PairBatch.collate(items))
            b = len(items)
            labels.append(map_labels(batch.labels, dims, label_map or {}, batch=b))
            scores = model.score(torch.cat([batch.media_w, batch.media_l]).to(model.device), batch.prompt * 2)
            r = torch.stack([scores[d] for d in dims], dim=1).cpu()  # [2B, K]
            r_w.append(r[:b])
            r_l.append(r[b:])
    finally:
        model.train(was_training)
    a, b_, y = torch.cat(r_w), torch.cat(r_l), torch.cat(labels)
    out = {}
    for k, dim in enumerate(dims):
        acc_ties, threshold = tie_calibrated_accuracy(a[:, k], b_[:, k], y[:, k])
        labelled = y[:, k] != LABEL_MISSING
        out[dim] = {
            "accuracy": float(pairwise_accuracy(a[:, k], b_[:, k], y[:, k])),
            "accuracy_with_ties": float(acc_ties),
            "tie_threshold": float(threshold),
            "num_pairs": int(labelled.sum()),
            "num_decided": int((labelled & (y[:, k] != LABEL_TIE)).sum()),
        }
    return out
