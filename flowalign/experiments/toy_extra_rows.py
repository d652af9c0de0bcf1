"""Further rows of the toy online/offline comparison (``toy_grpo``): f-DPO and the base's guidance.

* f-DPO (``dpo.divergence``, e.g. "js") trained exactly as the offline Flow-DPO row: the same pairs
  (``offline_dpo_inputs``: K base samples per training prompt, best against worst by ta + vq), the same
  steps, pairs per step, LoRA, learning rate and beta; only the divergence differs.
* Flow-NRG: the base guided by a noise-aware latent reward (``toy_nrg``'s recipe: trained on the base's
  own oracle-scored samples plus counterfactual renders), sampled on the same held-out prompts and seeds.
* The base at other classifier-free guidance scales, on the same held-out prompts and seeds, each paired
  against the base at the comparison's guidance. The rule that picks "the guidance that best trades off":
  the scale with the highest mean ta + vq (the reward every trained row optimises), ties to the scale
  nearest the comparison's.

Every row is scored by ``evaluate_against_base``, so its differences are paired with the other rows'::

    python -m flowalign.experiments.toy_extra_rows runs/toy-grpo --fdpo js --guidance 1.5 2 4 5
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

from flowalign.experiments.toy_alignment import train_toy_dpo
from flowalign.experiments.toy_grpo import GRPOBudget, evaluate_against_base, offline_dpo_inputs
from flowalign.training.methods.dpo import DPOConfig

__all__ = ["base_guidance_rows", "best_guidance", "fdpo_row", "nrg_row"]


def fdpo_row(
    base_dir, out_dir, budget: GRPOBudget, *, divergence: str = "js", beta: float = 5000.0, progress=True
) -> dict[str, dict[str, float]]:
    """Train f-DPO on the offline row's pairs and budget; held-out scores paired against the base."""
    out_dir = Path(out_dir)
    pairs, align = offline_dpo_inputs(base_dir, out_dir, budget, progress=progress)
    dpo = DPOConfig(beta=beta, divergence=divergence)
    model_dir = train_toy_dpo(base_dir, pairs, out_dir / f"fdpo_{divergence}", align, dpo, progress=progress)
    return evaluate_against_base(base_dir, model_dir, budget)


def nrg_row(
    base_dir,
    out_dir,
    budget: GRPOBudget,
    *,
    weights=None,
    strength: float = 1.0,
    num_train_prompts: int = 64,
    samples_per_prompt: int = 8,
    train_steps: int = 300,
    counterfactual_pairs: int = 1024,
    batch_size: int = 32,
) -> dict[str, dict[str, float]]:
    """Train the noise-aware latent reward on the base (``toy_nrg``'s distillation set, sampled with the
    comparison's steps and guidance) and score the base guided by it, paired against the unguided base."""
    from flowalign.config import OptimConfig, TrainConfig
    from flowalign.experiments.toy_base import evaluate_toy
    from flowalign.experiments.toy_grpo import _evaluate, paired_difference
    from flowalign.experiments.toy_nrg import _distillation_pairs, _training_prompts
    from flowalign.models import load_flow_model
    from flowalign.rewards.latent import LatentRewardModel
    from flowalign.sampling.nrg import latent_reward_guidance
    from flowalign.training.loop import train
    from flowalign.training.methods.latent_reward import LatentRewardTraining, LatentRewardTrainingConfig

    weights = dict(weights or {"vq": 0.5, "ta": 0.5})
    model = load_flow_model(base_dir).eval()
    size = model.default_height
    prompts, noise = _training_prompts(num_train_prompts, samples_per_prompt, size=size, seed=budget.seed)
    sample = dict(steps=budget.num_inference_steps, cfg_scale=budget.guidance_scale, batch_size=64)
    pairs = _distillation_pairs(
        model, prompts, noise, sample, counterfactual_pairs, seed=budget.seed, size=size
    )
    cfg = LatentRewardTrainingConfig(dimensions=["vq", "ta"], num_blocks=2, trunk_training="lora")
    run = TrainConfig(
        output_dir=Path(out_dir) / "nrg_rm", max_steps=train_steps, batch_size=batch_size, seed=budget.seed,
        trackers=[], cpu=model.device.type == "cpu", log_every=50,
        optim=OptimConfig(lr=3e-4, weight_decay=0.0, warmup_steps=min(20, train_steps // 10)),
    )  # fmt: skip
    result = train(LatentRewardTraining(model, cfg), pairs, run, progress=False, resume=True)
    guide = LatentRewardModel.from_pretrained(result.export_dir, model=model, device=model.device)
    ev = evaluate_toy(
        model, num_samples=budget.eval_samples, guidance_scale=budget.guidance_scale,
        num_inference_steps=budget.num_inference_steps,
        velocity_transforms_factory=lambda chunk: [
            latent_reward_guidance(model, guide, chunk, weights, strength=strength)
        ],
    )  # fmt: skip
    ref = _evaluate(base_dir, budget)
    return {
        dim: dict(zip(("diff", "se"), paired_difference(ev.scores[dim], ref[dim]), strict=True))
        | {"mean": float(ev.scores[dim].double().mean())}
        for dim in ref
    }


def base_guidance_rows(base_dir, budget: GRPOBudget, scales) -> dict[float, dict[str, dict[str, float]]]:
    """The base sampled at each guidance scale, paired against the base at ``budget.guidance_scale``."""
    from flowalign.experiments.toy_grpo import _evaluate, paired_difference

    ref = _evaluate(base_dir, budget)
    rows = {}
    for scale in scales:
        b = GRPOBudget(**{**budget.__dict__, "guidance_scale": float(scale)})
        scores = _evaluate(base_dir, b)
        rows[float(scale)] = {
            dim: dict(zip(("diff", "se"), paired_difference(v, ref[dim]), strict=True))
            | {"mean": float(v.double().mean())}
            for dim, v in scores.items()
        }
    return rows


def best_guidance(rows: dict[float, dict[str, dict[str, float]]], reference: float) -> float:
    """The scale with the highest mean ta + vq; ties go to the scale nearest ``reference``."""
    if not rows:
        raise ValueError("error: best_guidance needs at least one guidance scale")
    return max(rows, key=lambda s: (rows[s]["ta"]["mean"] + rows[s]["vq"]["mean"], -abs(s - reference)))


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("out_dir", type=Path, help="the toy_grpo run folder (its pairs/ are reused)")
    parser.add_argument(
        "--base", type=Path, default=Path(__file__).resolve().parents[1] / "assets" / "toy_base_image"
    )
    parser.add_argument("--fdpo", default=None, help="divergence of an f-DPO row (e.g. js)")
    parser.add_argument("--nrg", action="store_true", help="a Flow-NRG row (default vq 0.5 + ta 0.5)")
    parser.add_argument("--nrg-vq", type=float, default=0.5, help="Flow-NRG weight of vq (ta: 1 - this)")
    parser.add_argument("--nrg-strength", type=float, default=1.0)
    parser.add_argument("--guidance", type=float, nargs="*", default=[], help="base guidance scales")
    args = parser.parse_args(argv)
    budget = GRPOBudget()
    out: dict = {}
    if args.fdpo:
        out[f"fdpo_{args.fdpo}"] = fdpo_row(args.base, args.out_dir, budget, divergence=args.fdpo)
    if args.nrg:
        weights = {"vq": args.nrg_vq, "ta": 1.0 - args.nrg_vq}
        key = f"flow_nrg_vq{args.nrg_vq:g}_s{args.nrg_strength:g}"
        out[key] = nrg_row(args.base, args.out_dir, budget, weights=weights, strength=args.nrg_strength)
    if args.guidance:
        rows = base_guidance_rows(args.base, budget, args.guidance)
        out["base_guidance"] = {str(k): v for k, v in rows.items()}
        out["best_guidance"] = best_guidance({**rows}, budget.guidance_scale)
    text = json.dumps(out, indent=2)
    name = "extra_rows" + "".join(f"_{k}" for k in out if k != "best_guidance") + ".json"
    (args.out_dir / name).write_text(text)
    print(text)


if __name__ == "__main__":
    main()
