"""Online against offline preference optimisation in the toy world, at a matched budget.

Three models are compared on held-out prompts with the exact oracles: the base, offline Flow-DPO
(best-vs-worst pairs of K base samples per training prompt, sampled once) and Flow-GRPO (K fresh
SDE samples per prompt every step). The budget is matched: both methods see the same number of
sampled images (GRPO: steps x prompts_per_step x K; DPO: that many candidates) and take the same
number of optimizer steps on the same number of images per step (DPO: K x prompts_per_step / 2
pairs), with the same LoRA, learning rate and reward mix (ta + vq). Every model is evaluated on the
same held-out prompts and seeds, so differences to the base are paired (mean and standard error of
the per-sample difference).

Run one process at a time (``OMP_NUM_THREADS=1``)::

    python -m flowalign.experiments.toy_grpo runs/toy-grpo --steps 40
"""

from __future__ import annotations

import argparse
import json
import math
from dataclasses import asdict, dataclass, field
from pathlib import Path

import torch

from flowalign.config import CheckpointConfig, LoraConfig, OptimConfig, TrainConfig
from flowalign.experiments.toy_alignment import AlignBudget, toy_pairs_cached, train_toy_dpo
from flowalign.experiments.toy_base import evaluate_toy
from flowalign.models import load_flow_model
from flowalign.rewards.combine import RewardCombiner
from flowalign.rewards.toy import ToyOracleReward
from flowalign.toy.world import toy_prompts
from flowalign.training.loop import train
from flowalign.training.methods.dpo import DPOConfig
from flowalign.training.methods.grpo import FlowGRPO, GRPOConfig, PromptItems

__all__ = [
    "GRPOBudget",
    "evaluate_against_base",
    "offline_dpo_inputs",
    "paired_difference",
    "run_toy_grpo_experiment",
    "train_toy_grpo",
]

WEIGHTS = {"ta": 1.0, "vq": 1.0}


@dataclass
class GRPOBudget:
    """The shared budget of the compared methods."""

    steps: int = 40
    prompts_per_step: int = 8
    num_samples: int = 4
    num_inference_steps: int = 10
    guidance_scale: float = 3.0
    lr: float = 1e-3
    lora: LoraConfig = field(default_factory=lambda: LoraConfig(rank=16, alpha=16.0))
    eval_samples: int = 256
    seed: int = 0

    @property
    def images(self) -> int:
        """Sampled images of either method."""
        return self.steps * self.prompts_per_step * self.num_samples


def paired_difference(a: torch.Tensor, b: torch.Tensor) -> tuple[float, float]:
    """Mean and standard error of a - b over paired samples."""
    d = (a.double() - b.double()).flatten()
    return float(d.mean()), float(d.std(unbiased=True) / math.sqrt(d.numel()))


def train_toy_grpo(
    base_dir, out_dir, budget: GRPOBudget, grpo: GRPOConfig, *, weights: dict | None = None, progress=True
) -> Path:
    """Flow-GRPO (LoRA) with the oracles' mix (default ta + vq); returns the merged model folder."""
    out_dir = Path(out_dir)
    torch.manual_seed(budget.seed)
    combiner = RewardCombiner([ToyOracleReward()], weights or WEIGHTS)
    method = FlowGRPO(load_flow_model(base_dir), combiner.score, grpo, lora=budget.lora)
    cfg = TrainConfig(
        output_dir=out_dir, seed=budget.seed, max_steps=budget.steps, batch_size=budget.prompts_per_step,
        log_every=1, trackers=[], cpu=not torch.cuda.is_available(),
        optim=OptimConfig(lr=budget.lr, weight_decay=0.0), checkpoint=CheckpointConfig(every=10, keep_last=1),
    )  # fmt: skip
    result = train(method, PromptItems(toy_prompts("train", "image")), cfg, resume=True, progress=progress)
    if result.export_dir is None:
        raise RuntimeError(f"Flow-GRPO in {out_dir} stopped at step {result.step} before finishing")
    return result.export_dir


def _evaluate(model_dir, budget: GRPOBudget) -> dict[str, torch.Tensor]:
    ev = evaluate_toy(
        model_dir, num_samples=budget.eval_samples, guidance_scale=budget.guidance_scale,
        num_inference_steps=budget.num_inference_steps,
    )  # fmt: skip
    return {k: v for k, v in ev.scores.items() if k in ("ta", "vq", "all_correct")}


def evaluate_against_base(base_dir, model_dir, budget: GRPOBudget) -> dict[str, dict[str, float]]:
    """Held-out scores of ``model_dir`` and their paired difference to the base's (same prompts, seeds):
    ``{dim: {"mean", "diff", "se"}}``."""
    base, scores = _evaluate(base_dir, budget), _evaluate(model_dir, budget)
    out = {}
    for dim, v in scores.items():
        diff, se = paired_difference(v, base[dim])
        out[dim] = {"mean": float(v.double().mean()), "diff": diff, "se": se}
    return out


def offline_dpo_inputs(base_dir, out_dir, budget: GRPOBudget, *, progress=True):
    """The offline arm's pairs (K base samples per training prompt, sampled once into ``out_dir/pairs``
    and reused from there) and its :class:`AlignBudget` (same steps, images per step, LoRA, lr)."""
    train_prompts = toy_prompts("train", "image")
    per_prompt = max(2, budget.images // len(train_prompts))
    pairs = toy_pairs_cached(
        base_dir, out_dir / "pairs", num_prompts=min(len(train_prompts), budget.images // per_prompt),
        num_candidates=per_prompt, weights=WEIGHTS, guidance_scale=budget.guidance_scale,
        num_inference_steps=budget.num_inference_steps, progress=progress,
    )  # fmt: skip
    align = AlignBudget(
        steps=budget.steps, batch_size=budget.prompts_per_step * budget.num_samples // 2,
        lr=budget.lr, lora=budget.lora, seed=budget.seed,
    )  # fmt: skip
    return pairs, align


def run_toy_grpo_experiment(
    base_dir, out_dir, budget: GRPOBudget, *, dpo_beta: float = 5000.0, progress=True
):
    """Base vs offline Flow-DPO vs Flow-GRPO; writes ``results.json`` and ``results.md`` in ``out_dir``."""
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    pairs, align = offline_dpo_inputs(base_dir, out_dir, budget, progress=progress)
    dpo_dir = train_toy_dpo(
        base_dir, pairs, out_dir / "dpo", align, DPOConfig(beta=dpo_beta), progress=progress
    )
    grpo_cfg = GRPOConfig(
        num_samples=budget.num_samples, num_inference_steps=budget.num_inference_steps,
        guidance_scale=budget.guidance_scale, window="random", window_size=2,
    )  # fmt: skip
    grpo_dir = train_toy_grpo(base_dir, out_dir / "grpo", budget, grpo_cfg, progress=progress)
    scores = {"base": _evaluate(base_dir, budget)}
    scores["flow_dpo"] = _evaluate(dpo_dir, budget)
    scores["flow_grpo"] = _evaluate(grpo_dir, budget)
    results = {
        "budget": {**asdict(budget), "images": budget.images, "dpo_pairs": len(pairs.chosen)},
        "grpo": asdict(grpo_cfg),
        "models": {
            name: {
                dim: {
                    "mean": float(v.double().mean()),
                    "diff_vs_base": paired_difference(v, scores["base"][dim]),
                }
                for dim, v in s.items()
            }
            for name, s in scores.items()
        },
    }
    (out_dir / "results.json").write_text(json.dumps(results, indent=2, default=str))
    (out_dir / "results.md").write_text(_table(results))
    return results


def _table(results: dict) -> str:
    rows = [
        "| model | ta | Δta (paired s.e.) | vq | Δvq (paired s.e.) | all correct |",
        "|---|---|---|---|---|---|",
    ]
    for name, dims in results["models"].items():
        ta, vq, ac = dims["ta"], dims["vq"], dims["all_correct"]
        rows.append(
            f"| {name} | {ta['mean']:.3f} | {ta['diff_vs_base'][0]:+.3f} ({ta['diff_vs_base'][1]:.3f}) | "
            f"{vq['mean']:.3f} | {vq['diff_vs_base'][0]:+.3f} ({vq['diff_vs_base'][1]:.3f}) | {ac['mean']:.3f} |"
        )
    return "\n".join(rows) + "\n"


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("out_dir", type=Path)
    parser.add_argument(
        "--base", type=Path, default=Path(__file__).resolve().parents[1] / "assets" / "toy_base_image"
    )
    parser.add_argument("--steps", type=int, default=40)
    parser.add_argument("--lr", type=float, default=1e-3)
    args = parser.parse_args(argv)
    results = run_toy_grpo_experiment(args.base, args.out_dir, GRPOBudget(steps=args.steps, lr=args.lr))
    print(_table(results))


if __name__ == "__main__":
    main()
