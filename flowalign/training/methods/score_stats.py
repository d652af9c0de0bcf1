"""The running score statistics a reward-model method exports as the model's normalisation.

Both reward trainers keep, per dimension k, an EMA of the mean score ``m_k`` and of a second moment
``s_k`` (momentum ``rho``; the first update takes the batch values as they are):

    m_k <- rho m_k + (1 - rho) mean_batch(r_k)        s_k <- rho s_k + (1 - rho) second_batch_k

and report ``std_k = sqrt(s_k - m_k^2)`` when ``s`` is the mean square (``centre=True``) or
``std_k = sqrt(s_k)`` when ``s`` already is a variance (e.g. half the mean squared pair difference).
"""

from __future__ import annotations

import math

import torch
import torch.distributed as dist
from torch import Tensor


def _all_ranks(row: Tensor) -> list[Tensor]:
    """``row`` of every data-parallel process, in rank order, on the CPU (just ``[row]`` in one process)."""
    if not (dist.is_available() and dist.is_initialized()) or dist.get_world_size() == 1:
        return [row.cpu()]
    nccl = dist.get_backend() == "nccl"
    row = row.to(torch.device("cuda", torch.cuda.current_device())) if nccl else row.cpu()
    rows = [torch.empty_like(row) for _ in range(dist.get_world_size())]
    dist.all_gather(rows, row)
    return [r.cpu() for r in rows]


class ScoreNormaliser:
    """EMA of per-dimension score mean and second moment; saved under ``norm_mean``/``second_key``/``norm_count``."""

    def __init__(self, dimensions: list[str], momentum: float, *, second_key: str, centre: bool) -> None:
        self.dimensions = list(dimensions)
        self.momentum = momentum
        self.second_key = second_key
        self.centre = centre
        k = len(self.dimensions)
        self.mean = torch.zeros(k, dtype=torch.float64)
        self.second = torch.zeros(k, dtype=torch.float64)
        self.count = 0

    def update(self, mean: Tensor, second: Tensor) -> None:
        """Fold one batch's ``[K]`` statistics in (fp64 on the CPU); a non-finite batch is skipped, as the
        loop skips its step, so that it cannot poison the normaliser.

        Across data-parallel processes every process folds in the statistics of all of them, in rank
        order: the normaliser stays the same on every process, and equals that of one process taking
        the same micro-batches one after another as accumulation steps."""
        k = len(self.dimensions)
        for row in _all_ranks(torch.cat([mean.double().reshape(k), second.double().reshape(k)])):
            self._fold(row[:k], row[k:])

    def _fold(self, mean: Tensor, second: Tensor) -> None:
        if not (torch.isfinite(mean).all() and torch.isfinite(second).all()):
            return
        m = self.momentum if self.count else 0.0
        self.mean = m * self.mean + (1 - m) * mean
        self.second = m * self.second + (1 - m) * second
        self.count += 1

    def statistics(self) -> dict[str, tuple[float, float]]:
        """``{dimension: (mean, std)}`` for the dimensions with a finite positive std (empty before any update)."""
        if not self.count:
            return {}
        var = self.second - self.mean.pow(2) if self.centre else self.second
        std = var.clamp_min(0).sqrt()
        return {
            d: (float(self.mean[k]), float(std[k]))
            for k, d in enumerate(self.dimensions)
            if math.isfinite(float(std[k])) and float(std[k]) > 0
        }

    def state_dict(self) -> dict:
        return {
            "norm_mean": self.mean.clone(),
            self.second_key: self.second.clone(),
            "norm_count": self.count,
        }

    def load_state_dict(self, state: dict) -> None:
        self.mean, self.second = state["norm_mean"].double(), state[self.second_key].double()
        self.count = int(state["norm_count"])


class NormalisedScores:
    """Method hooks of a reward trainer that keeps its score statistics in ``self.normaliser``: they are
    exported as the model's normalisation and saved in (and restored from) every checkpoint."""

    normaliser: ScoreNormaliser

    def score_statistics(self) -> dict[str, tuple[float, float]]:
        """Per-dimension (mean, std) for the exported normalisation (empty before the first step)."""
        return self.normaliser.statistics()

    def state_dict(self) -> dict:
        return self.normaliser.state_dict()

    def load_state_dict(self, state: dict) -> None:
        self.normaliser.load_state_dict(state)
