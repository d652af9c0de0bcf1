"""Iterative Flow-DPO in the toy world at the budget of :mod:`flowalign.experiments.toy_grpo`.

The same number of sampled images as offline Flow-DPO and Flow-GRPO, split over ``rounds`` rounds:
each round samples K candidates for ``images / (rounds · K)`` training prompts from the current policy
(guidance and steps of the evaluation), keeps best against worst by the oracles' ta + vq mix, and
trains ``steps / rounds`` optimizer steps of ``prompts_per_step · K / 2`` pairs on them (the batch of
offline DPO). The reference is the base (``reference="fixed"``) or the policy at the round's start.

Run one process at a time (``OMP_NUM_THREADS=1``)::

    python -m flowalign.experiments.toy_online_dpo runs/toy-grpo --rounds 4
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

import torch

from flowalign.config import CheckpointConfig, OptimConfig, TrainConfig
from flowalign.experiments.toy_grpo import WEIGHTS, GRPOBudget, evaluate_against_base
from flowalign.models import load_flow_model
from flowalign.rewards.combine import RewardCombiner
from flowalign.rewards.toy import ToyOracleReward
from flowalign.toy.world import toy_prompts
from flowalign.training.loop import train
from flowalign.training.methods.dpo import DPOConfig
from flowalign.workflows.online_dpo import OnlineDPOConfig, OnlineFlowDPO

__all__ = ["online_config", "train_toy_online_dpo"]


def online_config(budget: GRPOBudget, rounds: int, reference: str = "fixed") -> OnlineDPOConfig:
    """The rounds of a budget: ``images / rounds`` candidates and ``steps / rounds`` steps each."""
    if rounds < 1 or budget.steps % rounds or budget.images % (rounds * budget.num_samples):
        raise ValueError(
            f"rounds={rounds} must divide the {budget.steps} steps and the {budget.images} images"
        )
    return OnlineDPOConfig(
        regenerate_every=budget.steps // rounds, num_candidates=budget.num_samples,
        prompts_per_round=budget.images // (rounds * budget.num_samples), reference=reference,
        guidance_scale=budget.guidance_scale, num_inference_steps=budget.num_inference_steps,
    )  # fmt: skip


def train_toy_online_dpo(
    base_dir, out_dir, budget: GRPOBudget, *, rounds: int = 4, reference: str = "fixed",
    dpo_beta: float = 5000.0, progress: bool = True,
) -> Path:  # fmt: skip
    """Iterative Flow-DPO (LoRA) with the oracles' ta + vq mix; returns the merged model folder."""
    out_dir = Path(out_dir)
    torch.manual_seed(budget.seed)
    combiner = RewardCombiner([ToyOracleReward()], WEIGHTS)
    method = OnlineFlowDPO(
        load_flow_model(base_dir), combiner.score, toy_prompts("train", "image"), out_dir,
        DPOConfig(beta=dpo_beta), online_config(budget, rounds, reference), seed=budget.seed, lora=budget.lora,
    )  # fmt: skip
    cfg = TrainConfig(
        output_dir=out_dir, seed=budget.seed, max_steps=budget.steps,
        batch_size=budget.prompts_per_step * budget.num_samples // 2, log_every=1, trackers=[],
        cpu=not torch.cuda.is_available(), optim=OptimConfig(lr=budget.lr, weight_decay=0.0),
        checkpoint=CheckpointConfig(every=budget.steps // rounds, keep_last=1),
    )  # fmt: skip
    result = train(method, method.slots(), cfg, resume=True, progress=progress)
    if result.export_dir is None:
        raise RuntimeError(f"iterative Flow-DPO in {out_dir} stopped at step {result.step} before finishing")
    return result.export_dir


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("out_dir", type=Path)
    parser.add_argument(
        "--base", type=Path, default=Path(__file__).resolve().parents[1] / "assets" / "toy_base_image"
    )
    parser.add_argument("--steps", type=int, default=40)
    parser.add_argument("--rounds", type=int, default=4)
    parser.add_argument("--reference", choices=["fixed", "refresh"], default="fixed")
    args = parser.parse_args(argv)
    budget = GRPOBudget(steps=args.steps)
    name = f"online_dpo_r{args.rounds}_{args.reference}"
    model_dir = train_toy_online_dpo(
        args.base, args.out_dir / name, budget, rounds=args.rounds, reference=args.reference
    )
    result = evaluate_against_base(args.base, model_dir, budget)
    print(json.dumps({name: result}, indent=2))


if __name__ == "__main__":
    main()
