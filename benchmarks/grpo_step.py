"""Benchmark: where one Flow-GRPO step spends its time: sampling, scoring, training.

    python benchmarks/grpo_step.py                        # CPU, tiny SD3, LoRA, toy oracle reward
    python benchmarks/grpo_step.py --window all           # every step an SDE step (trained)
    python benchmarks/grpo_step.py --device cuda --prompts 8 --samples 8

sampling: K SDE trajectories per prompt with CFG (no gradient), the whole time grid;
scoring:  decoding and the reward (the toy oracles, batched);
training: the clipped surrogate and the KL over the window's steps, forward and backward.
Prints the median seconds of each phase and its share of the step.
"""

from __future__ import annotations

import argparse
import json
import tempfile

from harness import time_fn  # noqa: E402


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--prompts", type=int, default=2)
    parser.add_argument("--samples", type=int, default=4)
    parser.add_argument("--steps", type=int, default=10)
    parser.add_argument("--window", default="random", choices=["all", "random", "sliding"])
    parser.add_argument("--window-size", type=int, default=2)
    parser.add_argument("--resolution", type=int, default=64)
    parser.add_argument("--repeats", type=int, default=3)
    args = parser.parse_args()

    import torch

    from flowalign.config import LoraConfig
    from flowalign.models import load_flow_model
    from flowalign.models.tiny import save_tiny_model
    from flowalign.objectives.grpo import group_advantages
    from flowalign.rewards.combine import RewardCombiner
    from flowalign.rewards.toy import ToyOracleReward
    from flowalign.toy.world import toy_prompts
    from flowalign.training.method import StepContext
    from flowalign.training.methods.grpo import FlowGRPO, GRPOConfig, training_window

    with tempfile.TemporaryDirectory() as tmp:
        model = load_flow_model(save_tiny_model("sd3", tmp), device=args.device)
    cfg = GRPOConfig(
        num_samples=args.samples, num_inference_steps=args.steps, guidance_scale=3.0,
        window=args.window, window_size=args.window_size, height=args.resolution, width=args.resolution,
    )  # fmt: skip
    combiner = RewardCombiner([ToyOracleReward()], {"ta": 1.0, "vq": 1.0})
    method = FlowGRPO(model, combiner.score, cfg, lora=LoraConfig(rank=8))
    prompts = [p for p in toy_prompts("train", "image")[: args.prompts] for _ in range(args.samples)]
    ids = list(range(len(prompts)))
    ctx = StepContext(step=0, seed=0, device=args.device, modules=method.trainable_modules())
    window = training_window(cfg, 0, 0)
    sync = torch.cuda.synchronize if args.device.startswith("cuda") else None
    state = {}

    def sampling():
        state["traj"], state["ts"] = method.sample_trajectories(prompts, ids, ctx, window)

    def scoring():
        state["scores"] = method.score(state["traj"].x0, prompts, ctx.device)

    def training():
        adv = group_advantages(state["scores"]["overall"], args.samples)
        loss, _ = method.policy_loss(state["traj"], state["ts"], adv, prompts, ctx)
        loss.backward()

    timings = {}
    for name, fn in (("sampling", sampling), ("scoring", scoring), ("training", training)):
        timings[name] = time_fn(name, fn, repeats=args.repeats, warmup=1, sync=sync).median
    total = sum(timings.values())
    record = {
        "device": args.device,
        "samples": len(prompts),
        "grid_steps": args.steps,
        "window": window,
        **{f"{k}_s": round(v, 4) for k, v in timings.items()},
        **{f"{k}_share": round(v / total, 3) for k, v in timings.items()},
    }
    print(json.dumps(record))


if __name__ == "__main__":
    main()
