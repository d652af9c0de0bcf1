r"""Iterative (online) Flow-DPO: the pairs are regenerated from the current policy every N steps.

Offline Flow-DPO (:mod:`flowalign.training.methods.dpo`) learns from pairs sampled once from the base.
Here training runs in rounds of ``regenerate_every`` = N optimizer steps. At the first step of round r
(step r·N) the method

1. takes the round's M prompts (``prompts_per_round``; successive rounds walk through seeded
   permutations of the prompt list, so every prompt comes up once per M/len(prompts) rounds);
2. samples K candidates per prompt with the policy as it is at that step (the ODE sampler, the
   ``pairs`` workflow's own code: :func:`flowalign.workflows.pairs.build_pairs`), scores them with the
   reward mix and keeps the best against the worst of each group, writing the round's candidates and
   ``pairs.jsonl`` to ``<output_dir>/online/round_<r>``;
3. trains N steps of the Flow-DPO loss (docs/algorithms.md 1B) on these pairs,

       L = -log σ( -(β/2) [ (e_w - e_w^ref) - (e_l - e_l^ref) ] ),   e = ||(noise - x0) - v(x_t, t, c)||²,

   with the reference either fixed (the base: LoRA adapters off, or the frozen copy) or refreshed to
   the policy at the start of each round (``reference="refresh"``: each round is then a DPO step away
   from the previous round's policy, with β bounding the per-round move instead of the total one).

The loop's dataset is :class:`RoundSlots` (M slots); slot j of a step's batch is pair j of the
current round (modulo the number of pairs: groups whose K rewards tie within ``margin`` give none).
With M = N × batch size each round trains on each of its pairs once.

Resume is exact: candidates are seeded from (run seed, round), the round's pairs are read back from
their lossless files (the pixels training sees are the same whether just sampled or resumed), and the
checkpointed method state holds the round number and, with ``reference="refresh"``, the reference's
trainable weights. A round folder the checkpoint does not vouch for (left by a run that stopped
before its next checkpoint) is sampled again; with the same weights that gives the same pairs.
"""

from __future__ import annotations

import shutil
from collections.abc import Callable, Sequence
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal

import torch
from torch import Tensor, nn
from torch.utils.data import Dataset

from flowalign.config import LoraConfig
from flowalign.data.batches import PairBatch
from flowalign.data.errors import DataError
from flowalign.models.base import FlowModel
from flowalign.training.method import StepContext, sample_seed
from flowalign.training.methods.dpo import DPOConfig, FlowDPO

__all__ = ["OnlineDPOConfig", "OnlineFlowDPO", "RoundSlots", "round_prompt_indices"]

ScoreFn = Callable[[Tensor, list[str]], dict[str, Tensor]]


@dataclass
class OnlineDPOConfig:
    """Iterative Flow-DPO settings (the DPO loss itself is :class:`DPOConfig`)."""

    regenerate_every: int = 10
    """N: optimizer steps per round; new pairs are sampled from the current policy at steps 0, N, 2N, ..."""
    num_candidates: int = 4
    """K samples per prompt; the pair is the best against the worst by the reward mix's ``overall``."""
    prompts_per_round: int = 64
    """M prompts sampled each round (0: every prompt each round)."""
    reference: Literal["fixed", "refresh"] = "fixed"
    """"fixed": the base model all along; "refresh": the policy as it was at the start of the round (a copy
    of the trainable weights is kept and checkpointed: the LoRA adapters, or the whole transformer for a
    full fine-tune)."""
    guidance_scale: float | None = None
    """CFG of the candidates (null: the model's default)."""
    num_inference_steps: int | None = None
    """Sampling steps of the candidates (null: the model's default)."""
    margin: float = 0.0
    """Groups whose best and worst reward differ by no more than this give no pair."""
    sample_batch_size: int = 64
    """Candidates per sampling call."""

    def __post_init__(self) -> None:
        checks = [
            (self.regenerate_every >= 1, "regenerate_every", "must be >= 1"),
            (self.num_candidates >= 2, "num_candidates", "must be >= 2 (a pair needs two samples)"),
            (self.prompts_per_round >= 0, "prompts_per_round", "must be >= 0 (0: all prompts)"),
            (self.reference in ("fixed", "refresh"), "reference", "must be fixed or refresh"),
            (self.margin >= 0, "margin", "must be >= 0"),
            (self.sample_batch_size >= 1, "sample_batch_size", "must be >= 1"),
        ]
        for ok, key, why in checks:
            if not ok:
                raise ValueError(f"online.{key} {why}, got {getattr(self, key)!r}")


class RoundSlots(Dataset):
    """``size`` slots ``{"slot": j, "index": j}``: slot j is pair j of the current round."""

    def __init__(self, size: int):
        if size < 1:
            raise ValueError(f"online: needs at least one slot per round, got {size}")
        self.size = size

    def __len__(self) -> int:
        return self.size

    def __getitem__(self, j: int) -> dict:
        return {"slot": j, "index": j}


def round_prompt_indices(num_prompts: int, per_round: int, round_: int, seed: int) -> list[int]:
    """The prompt indices of round ``round_``: positions r·M .. r·M + M - 1 of the concatenated seeded
    permutations of the prompt list (one permutation per pass); M = 0 gives every prompt in order."""
    if per_round == 0:
        return list(range(num_prompts))
    out = []
    for pos in range(round_ * per_round, (round_ + 1) * per_round):
        epoch, at = divmod(pos, num_prompts)
        g = torch.Generator().manual_seed(sample_seed(seed, epoch, "online", "prompts", 0))
        out.append(int(torch.randperm(num_prompts, generator=g)[at]))
    return out


class _SnapshotNet(nn.Module):
    """The policy network called with some of its parameters replaced (``torch.func.functional_call``)."""

    def __init__(self, policy: nn.Module, params: dict[str, Tensor]):
        super().__init__()
        self.policy, self.params = policy, params

    def forward(self, *args: Any, **kwargs: Any) -> Any:
        return torch.func.functional_call(self.policy, self.params, args, kwargs, strict=False)


class OnlineFlowDPO(FlowDPO):
    """Iterative Flow-DPO (module docstring). Batches: ``slot`` and ``index`` [B] from :class:`RoundSlots`."""

    def __init__(
        self,
        model: FlowModel,
        score_fn: ScoreFn,
        prompts: Sequence[str],
        output_dir: str | Path,
        config: DPOConfig | None = None,
        online: OnlineDPOConfig | None = None,
        *,
        seed: int = 0,
        lora: LoraConfig | None = None,
    ):
        super().__init__(model, config, lora=lora)
        if isinstance(prompts, str) or not prompts:
            raise ValueError("online: needs a non-empty list of prompts")
        self.score_fn = score_fn
        self.prompts = list(prompts)
        self.output_dir = Path(output_dir)
        self.online = online or OnlineDPOConfig()
        self.seed = seed
        self.round = -1
        """The round whose pairs are loaded (-1: none yet)."""
        self._vouched = -1  # the round a restored checkpoint had complete on disk
        self._pairs: dict[str, Any] | None = None
        self._snapshot: dict[str, Tensor] | None = None

    @property
    def prompts_per_round(self) -> int:
        return self.online.prompts_per_round or len(self.prompts)

    def slots(self) -> RoundSlots:
        """The loop's dataset: one slot per prompt of a round."""
        return RoundSlots(self.prompts_per_round)

    def round_dir(self, round_: int) -> Path:
        return self.output_dir / "online" / f"round_{round_:04d}"

    def collate(self, items: list[dict]) -> dict:
        return {
            "slot": torch.tensor([int(item["slot"]) for item in items], dtype=torch.long),
            "index": torch.tensor([int(item["index"]) for item in items], dtype=torch.long),
        }

    def pairs_config(self, round_: int):
        """The ``pairs`` settings of round ``round_`` (its candidate seeds follow (run seed, round))."""
        from flowalign.workflows.candidates import PairsConfig

        o = self.online
        return PairsConfig(
            num_candidates=o.num_candidates, margin=o.margin, batch_size=o.sample_batch_size,
            seed=sample_seed(self.seed, round_, "online", "candidates", 0) % (1 << 31),
            guidance_scale=o.guidance_scale, num_inference_steps=o.num_inference_steps,
        )  # fmt: skip

    def trainable_snapshot(self) -> dict[str, Tensor]:
        """Detached copies of the transformer's trainable parameters (the refreshed reference)."""
        return {
            name: p.detach().clone()
            for name, p in self.model.transformer.named_parameters()
            if p.requires_grad
        }

    def _start_round(self, round_: int) -> None:
        """Sample (or, on resume, read back) round ``round_``'s pairs; refresh the reference if asked."""
        from flowalign.sharding import current_shard
        from flowalign.workflows.pairs import build_pairs

        folder, shard = self.round_dir(round_), current_shard()
        resumed = round_ == self._vouched
        if not resumed and shard.is_main and folder.exists():
            shutil.rmtree(folder)  # not vouched for by the checkpoint: sample it again
        shard.barrier()
        indices = round_prompt_indices(len(self.prompts), self.prompts_per_round, round_, self.seed)
        transformer = self.model.transformer
        was_training = transformer.training
        transformer.eval()
        try:
            cand, chosen = build_pairs(
                self.model, [self.prompts[i] for i in indices], self.score_fn, folder,
                self.pairs_config(round_), progress=False, shard=shard,
            )  # fmt: skip
        except DataError as err:
            if "no pairs" not in str(err):
                raise
            raise DataError(
                folder / "candidates.jsonl",
                f"round {round_} (step {round_ * self.online.regenerate_every}): every one of the "
                f"{len(indices)} candidate groups tied within margin {self.online.margin}: raise "
                "online.num_candidates or online.prompts_per_round, or lower online.margin",
            ) from None
        finally:
            transformer.train(was_training)
        media = cand.media
        self._pairs = {
            "media_w": media[[w for w, _ in chosen]],
            "media_l": media[[l_ for _, l_ in chosen]],
            "prompt": [cand.prompts[w] for w, _ in chosen],
            "reward_gap": (cand.scores["overall"][[w for w, _ in chosen]]
                           - cand.scores["overall"][[l_ for _, l_ in chosen]]).mean(),
            "reward": cand.scores["overall"].mean(),
        }  # fmt: skip
        if self.online.reference == "refresh" and not (resumed and self._snapshot is not None):
            self._snapshot = self.trainable_snapshot()
        self.round = round_

    def pair_batch(self, slots: Tensor, device: torch.device) -> PairBatch:
        """Pairs ``slots`` (mod the number of pairs) of the current round as a :class:`PairBatch`."""
        if self._pairs is None:
            raise RuntimeError("online: no round has been sampled yet")
        n = len(self._pairs["prompt"])
        picks = [int(s) % n for s in slots.tolist()]
        return PairBatch(
            prompt=[self._pairs["prompt"][i] for i in picks],
            index=slots.to(device),
            media_w=self._pairs["media_w"][picks].to(device),
            media_l=self._pairs["media_l"][picks].to(device),
        )

    @contextmanager
    def _reference(self):
        """The reference of this round: the base (``fixed``) or the round's snapshot (``refresh``)."""
        if self.online.reference == "fixed" or self._snapshot is None:
            yield
            return
        base = self.reference

        class _Refreshed:
            @staticmethod
            @contextmanager
            def network(policy: nn.Module):
                yield _SnapshotNet(policy, self._snapshot)

        self.reference = _Refreshed()
        try:
            yield
        finally:
            self.reference = base

    def compute_loss(self, batch: dict, ctx: StepContext, group: str):
        round_ = ctx.step // self.online.regenerate_every
        if round_ != self.round:
            self._start_round(round_)
        pairs = self.pair_batch(batch["slot"], ctx.device)
        with self._reference():
            loss, metrics = super().compute_loss(pairs, ctx, group)
        metrics = {
            **metrics,
            "round": float(self.round),
            "round_reward": self._pairs["reward"],
            "round_pair_gap": self._pairs["reward_gap"],
            "round_pairs": float(len(self._pairs["prompt"])),
        }
        return loss, metrics

    def state_dict(self) -> dict[str, Any]:
        state: dict[str, Any] = {"round": self.round}
        if self._snapshot is not None:
            state["reference"] = {k: v.detach().cpu() for k, v in self._snapshot.items()}
        return state

    def load_state_dict(self, state: dict[str, Any]) -> None:
        unknown = set(state) - {"round", "reference"}
        if unknown or "round" not in state:
            raise ValueError(
                f"online dpo: a checkpoint state with keys {sorted(state)}, expected round[, reference]"
            )
        self._vouched = int(state["round"])
        self.round = -1  # the round's pairs are read back at the next step
        if "reference" in state:
            device = next(self.model.transformer.parameters()).device
            self._snapshot = {k: v.to(device) for k, v in state["reference"].items()}
