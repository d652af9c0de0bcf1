"""Benchmark: flowalign's Flow-DPO step vs a straightforward one, same model, side by side.

    python benchmarks/dpo_step.py                      # CPU, tiny SD3 transformer, LoRA
    python benchmarks/dpo_step.py --full               # full fine-tune (frozen copy as reference in both)
    python benchmarks/dpo_step.py --device cuda --size sd35m --resolution 1024 --dtype bf16   # GPU, real size

ours:     chosen + rejected in ONE policy forward and ONE reference forward; the reference is the
          policy with its LoRA adapters disabled (no second copy of the weights).
baseline: a full frozen copy of the transformer as reference and separate forwards for chosen and
          rejected (4 forwards per step), as in a straightforward port of Diffusion-DPO.
Each variant runs in its own subprocess so peak memory (CUDA max allocated, or CPU max RSS) is its own.
Prints time per step, peak memory, and for CUDA the achieved TFLOP/s and MFU from a FLOP count.
"""

from __future__ import annotations

import argparse
import copy
import json
import resource
import time

from harness import run_in_subprocess  # noqa: E402

from flowalign.models.tiny import TINY_SD3_TRANSFORMER

SIZES = {
    # name: SD3Transformer2DModel kwargs (random weights; sd35m is SD3.5-medium's transformer shape)
    "tiny": TINY_SD3_TRANSFORMER,
    "sd35m": dict(
        sample_size=128,
        patch_size=2,
        in_channels=16,
        out_channels=16,
        num_layers=24,
        attention_head_dim=64,
        num_attention_heads=24,
        joint_attention_dim=4096,
        caption_projection_dim=1536,
        pooled_projection_dim=2048,
        pos_embed_max_size=384,
        dual_attention_layers=tuple(range(13)),
        qk_norm="rms_norm",
    ),
}


def run_variant(args) -> dict:
    import torch
    import torch.nn.functional as F
    from diffusers import SD3Transformer2DModel

    from flowalign.config import LoraConfig
    from flowalign.models.lora import adapters_disabled, add_lora

    torch.manual_seed(0)
    device = torch.device(args.device)
    dtype = {"fp32": torch.float32, "bf16": torch.bfloat16}[args.dtype]
    cfg = SIZES[args.size]
    net = SD3Transformer2DModel(**cfg).to(device)
    latent = args.resolution // 8
    pairs, text_len = args.pairs, 154 if args.size == "sd35m" else 16
    x0 = torch.randn(2 * pairs, 16, latent, latent, device=device)
    noise = torch.randn(pairs, 16, latent, latent, device=device).repeat(2, 1, 1, 1)
    t = torch.rand(pairs, device=device).repeat(2)
    text = torch.randn(2 * pairs, text_len, cfg["joint_attention_dim"], device=device)
    pooled = torch.randn(2 * pairs, cfg["pooled_projection_dim"], device=device)
    x_t = (1 - t.view(-1, 1, 1, 1)) * x0 + t.view(-1, 1, 1, 1) * noise
    target = noise - x0

    reference = None
    if args.full or args.variant == "baseline":
        reference = copy.deepcopy(net).requires_grad_(False).eval()
    if args.full:
        params = list(net.parameters())
    else:
        params = add_lora(net, LoraConfig(rank=args.rank, alpha=float(args.rank)))  # baseline keeps its copy
    opt = torch.optim.AdamW(params, lr=1e-5)

    def forward(model, rows):
        with torch.autocast(device.type, dtype=dtype, enabled=dtype != torch.float32):
            return model(
                hidden_states=x_t[rows],
                timestep=t[rows] * 1000,
                encoder_hidden_states=text[rows],
                pooled_projections=pooled[rows],
                return_dict=False,
            )[0].float()

    def err(v, rows):
        return (v - target[rows]).pow(2).mean(dim=(1, 2, 3))

    w_rows, l_rows, all_rows = slice(0, pairs), slice(pairs, 2 * pairs), slice(0, 2 * pairs)

    def step_ours():
        v = forward(net, all_rows)
        with torch.no_grad():
            if reference is not None:
                v_ref = forward(reference, all_rows)
            else:
                with adapters_disabled(net):
                    v_ref = forward(net, all_rows)
        e, e_ref = err(v, all_rows), err(v_ref, all_rows)
        inside = -0.5 * 5000 * ((e[:pairs] - e_ref[:pairs]) - (e[pairs:] - e_ref[pairs:]))
        loss = F.softplus(-inside).mean()
        loss.backward()
        opt.step()
        opt.zero_grad(set_to_none=True)

    def step_baseline():
        e_w, e_l = err(forward(net, w_rows), w_rows), err(forward(net, l_rows), l_rows)
        with torch.no_grad():
            r_w, r_l = err(forward(reference, w_rows), w_rows), err(forward(reference, l_rows), l_rows)
        loss = F.softplus(0.5 * 5000 * ((e_w - r_w) - (e_l - r_l))).mean()
        loss.backward()
        opt.step()
        opt.zero_grad(set_to_none=True)

    step = step_ours if args.variant == "ours" else step_baseline
    sync = torch.cuda.synchronize if device.type == "cuda" else (lambda: None)
    flops = None
    if device.type == "cuda":
        from torch.utils.flop_counter import FlopCounterMode

        with FlopCounterMode(display=False) as counter:
            step()
        flops = counter.get_total_flops()
        torch.cuda.reset_peak_memory_stats()
    for _ in range(args.warmup):
        step()
    sync()
    start = time.perf_counter()
    for _ in range(args.steps):
        step()
    sync()
    seconds = (time.perf_counter() - start) / args.steps
    if device.type == "cuda":
        peak_gb = torch.cuda.max_memory_allocated() / 2**30
    else:
        peak_gb = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20
    out = {"variant": args.variant, "s_per_step": seconds, "peak_gb": peak_gb, "pairs": pairs}
    if flops is not None:
        out["tflops"] = flops / seconds / 1e12
        out["mfu_vs_989"] = out["tflops"] / 989.0  # H100 SXM dense bf16 peak
    return out


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--size", default="tiny", choices=sorted(SIZES))
    parser.add_argument("--resolution", type=int, default=256)
    parser.add_argument("--pairs", type=int, default=2)
    parser.add_argument("--rank", type=int, default=16)
    parser.add_argument("--full", action="store_true", help="full fine-tune instead of LoRA")
    parser.add_argument("--dtype", default="fp32", choices=["fp32", "bf16"])
    parser.add_argument("--steps", type=int, default=10)
    parser.add_argument("--warmup", type=int, default=2)
    parser.add_argument("--variant", choices=["ours", "baseline"], help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.variant:
        print(json.dumps(run_variant(args)))
        return
    results = {variant: run_in_subprocess(__file__, variant) for variant in ("baseline", "ours")}
    mode = "full fine-tune" if args.full else f"LoRA r{args.rank}"
    print(
        f"Flow-DPO step, {args.size} transformer, {args.resolution}px, {args.pairs} pairs, {mode}, "
        f"{args.dtype}, {args.device}"
    )
    print(f"{'variant':<10} {'s/step':>10} {'peak GB':>10} {'TFLOP/s':>10} {'MFU':>8}")
    for name, r in results.items():
        tf = f"{r['tflops']:.1f}" if "tflops" in r else "-"
        mfu = f"{100 * r['mfu_vs_989']:.1f}%" if "mfu_vs_989" in r else "-"
        print(f"{name:<10} {r['s_per_step']:>10.4f} {r['peak_gb']:>10.3f} {tf:>10} {mfu:>8}")
    b, o = results["baseline"], results["ours"]
    print(
        f"speed-up (baseline / ours): {b['s_per_step'] / o['s_per_step']:.2f}x; "
        f"peak memory ratio (ours / baseline): {o['peak_gb'] / b['peak_gb']:.2f}"
    )


if __name__ == "__main__":
    main()
