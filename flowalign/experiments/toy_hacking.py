"""A reward-hacking probe in the toy world: optimise a flawed proxy and watch the exact oracle.

The proxy is a reward blind to the prompt: visual quality alone (``{"vq": 1}``), as a reward model
that never learned to read the text would be. Best-against-worst pairs of the base's samples are
chosen by the proxy (from already scored candidates, :func:`flowalign.workflows.pairs.rechoose_pairs`:
nothing is sampled again) and Flow-DPO trains on them at several KL strengths β. On held-out prompts
the proxy's gain is set against the oracle's text alignment (which the proxy ignores) and the oracle
mix ta + vq, each as the paired difference to the base: hacking is the proxy rising while text
alignment falls, and the β at which the fall stops is the KL strength that prevents it.

    python -m flowalign.experiments.toy_hacking CANDIDATES_DIR OUT --betas 500,5000,50000
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

from flowalign.experiments.toy_alignment import AlignBudget, load_toy_pairs, train_toy_dpo
from flowalign.experiments.toy_grpo import GRPOBudget, _evaluate, paired_difference
from flowalign.training.methods.dpo import DPOConfig
from flowalign.workflows.pairs import rechoose_pairs

__all__ = ["proxy_oracle_agreement", "run_hacking_probe"]

BASE = Path(__file__).resolve().parents[1] / "assets" / "toy_base_image"


def proxy_oracle_agreement(pairs) -> float:
    """Fraction of the proxy's pairs whose winner also has the higher oracle ta + vq (ties count half)."""
    s = pairs.candidates.scores
    agree = 0.0
    for w, l_ in pairs.chosen:
        gap = float((s["ta"][w] + s["vq"][w]) - (s["ta"][l_] + s["vq"][l_]))
        agree += 1.0 if gap > 0 else 0.5 if gap == 0 else 0.0
    return agree / len(pairs.chosen)


def run_hacking_probe(
    candidates_dir, out_dir, *, betas=(500.0, 5000.0, 50000.0), proxy: dict | None = None,
    budget: GRPOBudget | None = None, base_dir=BASE, progress: bool = False,
) -> dict:  # fmt: skip
    """Flow-DPO on proxy-chosen pairs at each β; returns and writes ``out_dir/hacking.json``.

    ``candidates_dir``: a folder of scored base samples written by ``flowalign pairs`` (the oracles'
    ``ta`` and ``vq`` among its scores); the proxy's pairs are written beside them as ``proxy_pairs.jsonl``.
    """
    proxy = proxy or {"vq": 1.0}
    budget = budget or GRPOBudget()
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    rechoose_pairs(candidates_dir, proxy, filename="proxy_pairs.jsonl", overwrite=True)
    pairs = load_toy_pairs(candidates_dir, "proxy_pairs.jsonl")
    align = AlignBudget(
        steps=budget.steps, batch_size=budget.prompts_per_step * budget.num_samples // 2, lr=budget.lr,
        lora=budget.lora, seed=budget.seed,
    )  # fmt: skip
    base = _evaluate(base_dir, budget)
    rows = {}
    for beta in betas:
        model_dir = train_toy_dpo(
            base_dir, pairs, out_dir / f"beta_{beta:g}", align, DPOConfig(beta=beta), progress=progress
        )
        scores = _evaluate(model_dir, budget)
        rows[f"{beta:g}"] = {
            "proxy_vq": paired_difference(scores["vq"], base["vq"]),
            "oracle_ta": paired_difference(scores["ta"], base["ta"]),
            "oracle_mix": paired_difference(scores["ta"] + scores["vq"], base["ta"] + base["vq"]),
            "all_correct": paired_difference(scores["all_correct"], base["all_correct"]),
        }
    result = {
        "proxy": proxy, "pairs": len(pairs.chosen), "proxy_oracle_agreement": proxy_oracle_agreement(pairs),
        "steps": budget.steps, "lr": budget.lr, "eval_samples": budget.eval_samples, "betas": rows,
    }  # fmt: skip
    (out_dir / "hacking.json").write_text(json.dumps(result, indent=2))
    return result


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("candidates_dir", type=Path)
    parser.add_argument("out_dir", type=Path)
    parser.add_argument("--betas", default="500,5000,50000")
    parser.add_argument("--steps", type=int, default=40)
    args = parser.parse_args(argv)
    betas = tuple(float(b) for b in args.betas.split(","))
    result = run_hacking_probe(
        args.candidates_dir, args.out_dir, betas=betas, budget=GRPOBudget(steps=args.steps)
    )
    print(json.dumps(result, indent=2))


if __name__ == "__main__":
    main()
