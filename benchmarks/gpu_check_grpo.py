"""The GRPO row of ``benchmarks/gpu_check.py``: one Flow-GRPO step, the fast window against every step.

A Flow-GRPO step (LoRA) on the check's benchmark transformer (random weights, random prompt
embeddings): K SDE trajectories of one prompt with CFG (no gradient), then the clipped surrogate and
the KL to the reference over the trained steps, forward and backward. ``ours`` trains a random window
of ``window`` steps (Flow-GRPO-Fast / MixGRPO), ``baseline`` every step of the grid; sampling costs
the same in both, so the ratio is what the window saves. The reward is the mean of the final latent
(random weights and no VAE: decoding and scoring are not part of this row; ``benchmarks/grpo_step.py``
times them on a tiny model).
"""

from __future__ import annotations

from harness import interleaved

SIZES = {
    "real": {"resolution": 512, "samples": 2, "steps": 10, "window": 2, "repeats": 2, "need_s": 60.0},
    "tiny": {"resolution": 64, "samples": 2, "steps": 3, "window": 1, "repeats": 1, "need_s": 1.0},
}

ROW = "GRPO Flow-GRPO step LoRA r{rank}, window vs all steps"


def section_grpo(env, report, state, *, build_model, row_cls) -> None:
    """Add the GRPO row to ``report`` (``build_model`` and ``row_cls`` are gpu_check's)."""
    from flowalign.config import LoraConfig
    from flowalign.objectives.grpo import group_advantages
    from flowalign.training.method import StepContext
    from flowalign.training.methods.grpo import FlowGRPO, GRPOConfig, training_window

    size = SIZES["tiny" if env.s.size == "tiny" else "real"]
    name = ROW.format(rank=env.s.lora_rank)
    env.budget.need(size["need_s"], name)
    model = build_model(env)
    k, side = size["samples"], size["resolution"]
    cfg = GRPOConfig(
        num_samples=k, num_inference_steps=size["steps"], guidance_scale=4.5, window="random",
        window_size=size["window"], height=side, width=side,
    )  # fmt: skip
    method = FlowGRPO(model, lambda media, prompts: {}, cfg, lora=LoraConfig(rank=env.s.lora_rank))
    for p in model.transformer.parameters():
        if p.requires_grad:
            p.data = p.data.float()
    prompts, ids = ["a benchmark prompt"] * k, list(range(k))
    ctx = StepContext(step=0, seed=0, device=env.device, modules=method.trainable_modules())
    windows = {"window": training_window(cfg, 0, 0), "all": list(range(size["steps"]))}
    split: dict[str, dict[str, float]] = {}

    def step(which: str) -> None:
        import time

        sync = env.sync or (lambda: None)
        start = time.perf_counter()
        with env.autocast():
            traj, ts = method.sample_trajectories(prompts, ids, ctx, windows[which])
        sync()
        sampled = time.perf_counter()
        reward = traj.x0.float().flatten(1).mean(1)
        with env.autocast():
            loss, _ = method.policy_loss(traj, ts, group_advantages(reward, k), prompts, ctx)
        loss.backward()
        model.transformer.zero_grad(set_to_none=True)
        sync()
        split[which] = {"sampling s": sampled - start, "training s": time.perf_counter() - sampled}

    env.reset_peak()
    times = interleaved(
        {w: (lambda w=w: step(w)) for w in windows}, repeats=size["repeats"], warmup=1, sync=env.sync
    )
    peak = env.peak_gb()
    ours, base = times["window"].median, times["all"].median
    details = {
        "samples": k, "side": side, "grid steps": size["steps"], "trained steps": len(windows["window"]),
        **{f"{w} {key}": value for w, phases in split.items() for key, value in phases.items()},
    }  # fmt: skip
    if peak is not None:
        details["peak GB"] = peak
    report.add(
        row_cls(
            "GRPO", name, "s/step", ours, base, base / ours, "all steps / window", "", None, details,
        )
    )  # fmt: skip
