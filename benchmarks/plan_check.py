"""The memory planner against a measured LoRA Flow-DPO step on the CPU, at real size.

    python benchmarks/plan_check.py                                  # SD3.5-M at 256^2 and 512^2
    python benchmarks/plan_check.py --model wan-1.3b --size 480x832x9
    python benchmarks/plan_check.py --layers 4 --size 256x256        # first 4 blocks only (quick)

Each case runs in a fresh process: the transformer is built from its published configuration with random
weights directly in bf16 (no fp32 copy), LoRA rank 16 (fp32) is attached to to_q, to_k, to_v, to_out.0
with the package's ``add_lora``, and one Flow-DPO step runs under bf16 autocast: the policy forward on
winner + loser (one pair, random latents and random cached text embeddings), the reference forward with
the adapters disabled under no_grad, the Flow-DPO loss, backward and one AdamW step.

Measurement: peak resident set size from ``/proc/self/status`` (VmHWM). After loading, the process is
settled (garbage collected), its RSS read as the baseline, and the peak counter reset by writing 5 to
``/proc/self/clear_refs``; after the step, measured = VmHWM - baseline: every byte the step added at its
peak. glibc's mmap threshold is pinned (``MALLOC_MMAP_THRESHOLD_``) so large freed buffers go back to the
system instead of staying in the heap. Predicted = ``flowalign.planning.memory.plan`` in CPU mode
(no CUDA reserve, cached text and latents) minus the weights loaded before the baseline.

Measured on a 2-core CPU (one thread), LoRA rank 16, one pair, no checkpointing (step peak GiB,
measured / predicted): SD3.5-M 256^2 1.77 / 1.75 (0.99), 512^2 4.76 / 4.63 (0.97); Wan2.1-1.3B
240x416x1 2.31 / 2.75 (1.19); SD3.5-M cut to 4 blocks, 512^2 with checkpointing 0.35 / 0.36 (1.04).
"""

from __future__ import annotations

import argparse
import gc
import json
import os
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def _status(field: str) -> int:
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith(field + ":"):
            return int(line.split()[1]) * 1024
    raise RuntimeError(f"{field} not in /proc/self/status")


def _reset_peak() -> None:
    Path("/proc/self/clear_refs").write_text("5")


def _parse_size(text: str) -> tuple[int, int, int]:
    parts = [int(p) for p in text.lower().split("x")]
    if len(parts) == 2:
        return parts[0], parts[1], 1
    if len(parts) == 3:
        return parts[0], parts[1], parts[2]
    raise ValueError(f"--size must be HxW or HxWxFRAMES, got {text!r}")


def _inputs(arch, height: int, width: int, frames: int, gen):
    import torch

    c, lf, lh, lw = arch.latent_shape(height, width, frames)
    shape = (1, c, lh, lw) if arch.family == "sd3" else (1, c, lf, lh, lw)
    x0 = torch.randn(2, *shape[1:], generator=gen)
    noise = torch.randn(1, *shape[1:], generator=gen).repeat(2, *([1] * (len(shape) - 1)))
    t = torch.rand(1, generator=gen).repeat(2)
    cond = {"encoder_hidden_states": torch.randn(2, arch.text_tokens, 4096, generator=gen).bfloat16()}
    if arch.family == "sd3":
        cond["pooled_projections"] = torch.randn(2, 2048, generator=gen).bfloat16()
    return x0, noise, t, cond


def _velocity(net, arch, x_t, t, cond):
    scale = 1000.0  # diffusers' flow transformers take the timestep in [0, 1000]
    out = net(hidden_states=x_t.bfloat16(), timestep=t * scale, return_dict=False, **cond)[0]
    return out.float()


def child(args) -> dict:
    """Build, load, measure one step; returns the measured numbers."""
    import torch

    from flowalign.config import LoraConfig
    from flowalign.models.lora import adapters_disabled, add_lora
    from flowalign.objectives.dpo import flow_dpo_loss, velocity_errors_for_pairs
    from flowalign.planning.architectures import build_transformer, get_architecture, shrunk

    torch.manual_seed(0)
    arch = get_architecture(args.model)
    if args.layers:
        arch = shrunk(arch, args.layers, single_layers=args.layers if arch.family == "flux" else None)
    height, width, frames = _parse_size(args.size)
    rss_start = _status("VmRSS")
    torch.set_default_dtype(torch.bfloat16)
    net = build_transformer(arch, device="cpu").to(torch.bfloat16)  # buffers too, as a bf16 load does
    torch.set_default_dtype(torch.float32)
    params = add_lora(net, LoraConfig(rank=args.rank, alpha=float(args.rank)))
    for p in params:
        p.data = p.data.float()
    if args.checkpointing:
        net.enable_gradient_checkpointing()
    net.train()
    opt = torch.optim.AdamW(params, lr=1e-4)
    gen = torch.Generator().manual_seed(0)
    x0, noise, t, cond = _inputs(arch, height, width, frames, gen)
    gc.collect()
    baseline = _status("VmRSS")
    _reset_peak()
    start = time.perf_counter()
    with torch.autocast("cpu", dtype=torch.bfloat16):
        x_t = (1 - t.view(-1, *[1] * (x0.ndim - 1))) * x0 + t.view(-1, *[1] * (x0.ndim - 1)) * noise
        target = noise - x0
        v = _velocity(net, arch, x_t, t, cond)
        with torch.no_grad(), adapters_disabled(net):
            v_ref = _velocity(net, arch, x_t, t, cond)
        err_w, err_l = velocity_errors_for_pairs(v, target)
        ref_w, ref_l = velocity_errors_for_pairs(v_ref, target)
        loss, _ = flow_dpo_loss(err_w, err_l, ref_w, ref_l, beta=500.0, t=t[:1])
    loss.mean().backward()
    opt.step()
    seconds = time.perf_counter() - start
    peak = _status("VmHWM")
    return {
        "model": arch.name,
        "size": args.size,
        "checkpointing": args.checkpointing,
        "rank": args.rank,
        "load_bytes": baseline - rss_start,
        "step_peak_bytes": peak - baseline,
        "step_seconds": seconds,
        "loss": float(loss.mean()),
    }


def predicted(args) -> dict:
    from flowalign.planning.architectures import get_architecture, shrunk
    from flowalign.planning.memory import Recipe, plan

    arch = get_architecture(args.model)
    if args.layers:
        arch = shrunk(arch, args.layers, single_layers=args.layers if arch.family == "flux" else None)
    height, width, frames = _parse_size(args.size)
    recipe = Recipe(
        arch, height=height, width=width, frames=frames, lora_rank=args.rank,
        gradient_checkpointing=args.checkpointing, text_encoders="cached", vae="cached", device="cpu",
    )  # fmt: skip
    p = plan(recipe)
    loaded = sum(p.resident[k] for k in ("frozen weights", "buffers (bf16 position tables)"))
    loaded += p.resident["trainable weights (fp32)"]
    return {"load_bytes": loaded, "step_peak_bytes": p.step_peak - loaded, "plan": p}


def run_case(args) -> dict:
    """Measure one case in a fresh process and compare with the planner."""
    cmd = [sys.executable, __file__, "--child", "--model", args.model, "--size", args.size]
    cmd += ["--rank", str(args.rank), "--layers", str(args.layers)]
    cmd += ["--checkpointing"] if args.checkpointing else []
    env = dict(os.environ, MALLOC_MMAP_THRESHOLD_="65536", PYTHONPATH=str(ROOT))
    out = subprocess.run(cmd, env=env, capture_output=True, text=True, check=False)
    if out.returncode != 0:
        raise RuntimeError(f"measurement failed (exit code {out.returncode}):\n{out.stderr[-3000:]}")
    measured = json.loads(out.stdout.strip().splitlines()[-1])
    pred = predicted(args)
    measured["predicted_step_peak_bytes"] = pred["step_peak_bytes"]
    measured["predicted_load_bytes"] = pred["load_bytes"]
    measured["ratio"] = pred["step_peak_bytes"] / measured["step_peak_bytes"]
    return measured


def _gib(x: float) -> str:
    return f"{x / 1024**3:6.2f}"


def main(argv: list[str] | None = None) -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model", default="sd35m")
    ap.add_argument("--size", action="append", help="HxW or HxWxFRAMES (repeatable)")
    ap.add_argument("--rank", type=int, default=16)
    ap.add_argument("--layers", type=int, default=0, help="keep only the first N blocks (0 = all)")
    ap.add_argument("--checkpointing", action="store_true")
    ap.add_argument("--child", action="store_true", help=argparse.SUPPRESS)
    ap.add_argument("--json", type=Path, help="also write the rows here")
    args = ap.parse_args(argv)
    if args.child:
        args.size = args.size[0]
        print(json.dumps(child(args)))
        return
    rows = []
    print("model      size        ckpt  load GiB meas/pred   step peak GiB meas / pred   ratio   s/step")
    for size in args.size or ["256x256", "512x512"]:
        case = argparse.Namespace(**{**vars(args), "size": size})
        r = run_case(case)
        rows.append(r)
        print(
            f"{r['model']:<10} {size:<11} {str(r['checkpointing']):<5} {_gib(r['load_bytes'])} /"
            f"{_gib(r['predicted_load_bytes'])}   {_gib(r['step_peak_bytes'])} /"
            f"{_gib(r['predicted_step_peak_bytes'])}   {r['ratio']:5.3f}  {r['step_seconds']:7.1f}",
            flush=True,
        )
    if args.json:
        args.json.write_text(json.dumps(rows, indent=2))


if __name__ == "__main__":
    main()
