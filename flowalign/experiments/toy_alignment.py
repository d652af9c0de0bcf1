"""Preference alignment in the toy world: pairs from the base model, then Flow-DPO, Flow-RWR or SFT.

The base model samples K candidates for each training prompt; the exact oracles score them; the
best and worst of each prompt form a preference pair (Flow-DPO's data), every candidate with its
reward is Flow-RWR's data, and the winners alone are plain SFT's data (the paper's baselines).
All three train LoRA adapters with the same data and step budget, so their held-out oracle scores
(:func:`flowalign.experiments.toy_base.evaluate_toy`) compare the methods, not the budgets.
"""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from pathlib import Path

import torch
from torch.utils.data import Dataset

from flowalign.config import CheckpointConfig, LoraConfig, OptimConfig, TrainConfig
from flowalign.models import load_flow_model
from flowalign.rewards.combine import RewardCombiner
from flowalign.rewards.toy import ToyOracleReward
from flowalign.toy.world import toy_prompts
from flowalign.training.loop import train
from flowalign.training.methods.dpo import DPOConfig, FlowDPO
from flowalign.training.methods.rwr import FlowRWR, RWRConfig, WeightedSamples
from flowalign.training.methods.sft import FlowMatchingSFT, SFTConfig
from flowalign.workflows.pairs import Candidates, PairsConfig, build_pairs, read_candidate_scores


@dataclass
class ToyPairs:
    """Candidates sampled from the base model and the chosen (winner, loser) indices."""

    candidates: Candidates
    chosen: list[tuple[int, int]]


@dataclass
class AlignBudget:
    """Shared training budget of the compared methods."""

    steps: int = 200
    batch_size: int = 16
    lr: float = 1e-4
    lora: LoraConfig = field(default_factory=lambda: LoraConfig(rank=16, alpha=16.0))
    seed: int = 0


def toy_pairs(
    base_dir: str | Path,
    out_dir: str | Path,
    *,
    num_prompts: int | None = None,
    num_candidates: int = 4,
    weights: dict[str, float] | None = None,
    guidance_scale: float = 3.0,
    num_inference_steps: int = 20,
    progress: bool = True,
) -> ToyPairs:
    """Best-vs-worst pairs of the base model's samples on training prompts, ranked by the oracles.

    Images are ranked by ta + vq and videos by ta + vq + mq unless ``weights`` says otherwise.
    Clips are stored as exact ``.npy`` frames, so pairs read back by :func:`toy_pairs_cached` hold
    the pixels the oracles scored.
    """
    model = load_flow_model(base_dir)
    kind = "video" if model.is_video else "image"
    prompts = toy_prompts("train", kind)
    if num_prompts is not None:
        stride = max(1, len(prompts) // num_prompts)
        prompts = prompts[::stride][:num_prompts]
    default_weights = {"ta": 1.0, "vq": 1.0} | ({"mq": 1.0} if kind == "video" else {})
    combiner = RewardCombiner([ToyOracleReward()], weights or default_weights)
    cfg = PairsConfig(
        num_candidates=num_candidates,
        guidance_scale=guidance_scale,
        num_inference_steps=num_inference_steps,
        batch_size=128,
        video_ext=".npy",  # 32x32 clips: an MP4 would change what the oracles ranked
    )
    candidates, chosen = build_pairs(model, prompts, combiner.score, out_dir, cfg, progress=progress)
    return ToyPairs(candidates, chosen)


def load_toy_pairs(out_dir: str | Path, pairs_file: str = "pairs.jsonl") -> ToyPairs:
    """Read back what :func:`toy_pairs` wrote (candidates.jsonl + pairs.jsonl) without sampling again.

    ``pairs_file`` may name another choice of pairs from the same candidates
    (:func:`flowalign.workflows.pairs.rechoose_pairs`).
    """
    from flowalign.data.media import load_media

    out_dir = Path(out_dir)
    rows, _ = read_candidate_scores(out_dir)
    media = torch.stack([load_media(out_dir / row["file"]) for row in rows])
    scores = {k: torch.tensor([row["scores"][k] for row in rows]) for k in rows[0]["scores"]}
    candidates = Candidates([row["prompt"] for row in rows], [row["seed"] for row in rows], media, scores)
    pairs = [
        json.loads(line)["meta"] for line in (out_dir / pairs_file).read_text().splitlines() if line.strip()
    ]
    return ToyPairs(candidates, [(m["candidate_w"], m["candidate_l"]) for m in pairs])


def toy_pairs_cached(base_dir: str | Path, out_dir: str | Path, **kwargs) -> ToyPairs:
    """:func:`toy_pairs`, or the pairs already written in ``out_dir`` (reused by re-runs of the demo)."""
    out_dir = Path(out_dir)
    if (out_dir / "pairs.jsonl").is_file() and (out_dir / "candidates.jsonl").is_file():
        return load_toy_pairs(out_dir)
    return toy_pairs(base_dir, out_dir, **kwargs)


class _PairItems(Dataset):
    def __init__(self, pairs: ToyPairs):
        self.pairs = pairs

    def __len__(self) -> int:
        return len(self.pairs.chosen)

    def __getitem__(self, i: int) -> dict:
        w, l_ = self.pairs.chosen[i]
        media = self.pairs.candidates.media
        return {
            "media_w": media[w],
            "media_l": media[l_],
            "prompt": self.pairs.candidates.prompts[w],
            "index": i,
        }


class _Winners(Dataset):
    def __init__(self, pairs: ToyPairs):
        self.pairs = pairs

    def __len__(self) -> int:
        return len(self.pairs.chosen)

    def __getitem__(self, i: int) -> dict:
        w, _ = self.pairs.chosen[i]
        return {
            "pixels": self.pairs.candidates.media[w],
            "prompt": self.pairs.candidates.prompts[w],
            "index": i,
        }


def _train_config(out_dir: Path, budget: AlignBudget) -> TrainConfig:
    return TrainConfig(
        output_dir=out_dir,
        seed=budget.seed,
        max_steps=budget.steps,
        batch_size=budget.batch_size,
        log_every=10,
        trackers=[],
        cpu=not torch.cuda.is_available(),
        optim=OptimConfig(lr=budget.lr, weight_decay=0.0),
        checkpoint=CheckpointConfig(every=0, keep_last=1),
    )


def _finish(result, method_name: str, out_dir: Path) -> Path:
    if result.export_dir is None:
        raise RuntimeError(
            f"{method_name} training in {out_dir} stopped at step {result.step} before finishing"
        )
    (out_dir / "final_metrics.json").write_text(json.dumps(result.metrics, indent=2, default=float))
    return result.export_dir


def train_toy_dpo(
    base_dir, pairs: ToyPairs, out_dir, budget: AlignBudget, dpo: DPOConfig, *, progress=True
) -> Path:
    """Flow-DPO (LoRA, reference = adapters off) on the pairs; returns the merged model folder."""
    out_dir = Path(out_dir)
    method = FlowDPO(load_flow_model(base_dir), dpo, lora=budget.lora)
    result = train(method, _PairItems(pairs), _train_config(out_dir, budget), resume=True, progress=progress)
    return _finish(result, "Flow-DPO", out_dir)


def train_toy_rwr(
    base_dir, pairs: ToyPairs, out_dir, budget: AlignBudget, rwr: RWRConfig, *, progress=True
) -> Path:
    """Flow-RWR on every candidate weighted by its oracle reward (same steps and batch as DPO's pairs x 2)."""
    out_dir = Path(out_dir)
    cand = pairs.candidates
    data = WeightedSamples(cand.media, cand.prompts, cand.scores["overall"], rwr)
    method = FlowRWR(load_flow_model(base_dir), rwr, lora=budget.lora)
    cfg = _train_config(out_dir, budget)
    cfg.batch_size = 2 * budget.batch_size  # DPO sees two samples per pair: same samples per step
    result = train(method, data, cfg, resume=True, progress=progress)
    return _finish(result, "Flow-RWR", out_dir)


def train_toy_sft_winners(base_dir, pairs: ToyPairs, out_dir, budget: AlignBudget, *, progress=True) -> Path:
    """Plain flow-matching SFT on the winners only (best-of-K fine-tuning), LoRA, same budget."""
    from flowalign.training.methods.common import freeze_all_but_transformer

    out_dir = Path(out_dir)
    model = load_flow_model(base_dir)
    method = FlowMatchingSFT(model, SFTConfig(caption_dropout=0.0, train_text_encoder=False))
    freeze_all_but_transformer(model, budget.lora)
    method.export = lambda d: _export_lora_model(model, d)  # keep the LoRA file beside the merged model
    cfg = _train_config(out_dir, budget)
    cfg.batch_size = 2 * budget.batch_size
    result = train(method, _Winners(pairs), cfg, resume=True, progress=progress)
    return _finish(result, "SFT on winners", out_dir)


def _export_lora_model(model, out_dir) -> None:
    from flowalign.models.lora import save_lora
    from flowalign.training.methods.dpo import export_merged

    model.transformer.eval()
    save_lora(model.transformer, Path(out_dir) / "lora")
    export_merged(model, Path(out_dir))
