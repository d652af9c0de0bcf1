"""Benchmark: a LoRA training step of an SD3 transformer, eager vs regional ``torch.compile``.

    python benchmarks/compile_step.py                          # CPU: compiling takes minutes here
    python benchmarks/compile_step.py --device cuda --dtype bf16 --layers 12 --heads 16 --resolution 512

compiled: ``train.compile`` (``flowalign.training.speed.compile_blocks``): each transformer block is
          compiled on its own (inductor by default, ``--backend``); the first steps (reported apart
          as "first step") pay the compile time.
eager:    the same step without compilation.
Both run the policy forward (LoRA rank 16 on the attention projections), the reference forward with
the adapters off, backward and AdamW, as a Flow-DPO step does. Random weights, nothing downloaded.
Each variant runs in its own subprocess. Prints s/step of both and the ratio eager / compiled.
"""

from __future__ import annotations

import argparse
import json
import time

from harness import run_in_subprocess  # noqa: E402


def run_variant(args) -> dict:
    import torch
    from diffusers import SD3Transformer2DModel

    from flowalign.config import LoraConfig
    from flowalign.models.lora import adapters_disabled, add_lora
    from flowalign.training.speed import compile_blocks

    torch.set_num_threads(args.threads)
    torch.manual_seed(0)
    dtype = {"fp32": torch.float32, "bf16": torch.bfloat16}[args.dtype]
    width = args.heads * 64
    net = SD3Transformer2DModel(
        sample_size=args.resolution // 8, patch_size=2, in_channels=16, num_layers=args.layers,
        attention_head_dim=64, num_attention_heads=args.heads, joint_attention_dim=width,
        caption_projection_dim=width, pooled_projection_dim=width, out_channels=16,
        pos_embed_max_size=max(96, args.resolution // 8),
    ).to(args.device, dtype)  # fmt: skip
    add_lora(net, LoraConfig(rank=16))
    for p in net.parameters():
        if p.requires_grad:
            p.data = p.data.float()
    if args.variant == "compiled":
        compile_blocks(net, "transformer", backend=args.backend)
    params = [p for p in net.parameters() if p.requires_grad]
    opt = torch.optim.AdamW(params, lr=1e-5)
    side = args.resolution // 8
    g = torch.Generator().manual_seed(0)
    x = torch.randn(2 * args.pairs, 16, side, side, generator=g).to(args.device, dtype)
    text = torch.randn(2 * args.pairs, 77, width, generator=g).to(args.device, dtype)
    pooled = torch.randn(2 * args.pairs, width, generator=g).to(args.device, dtype)
    t = torch.rand(2 * args.pairs, generator=g).to(args.device) * 1000
    sync = torch.cuda.synchronize if args.device.startswith("cuda") else (lambda: None)
    autocast = torch.autocast(args.device.split(":")[0], dtype=dtype, enabled=dtype != torch.float32)

    def step() -> None:
        with autocast:
            v = net(hidden_states=x, timestep=t, encoder_hidden_states=text, pooled_projections=pooled)[0]
            with torch.no_grad(), adapters_disabled(net):
                v_ref = net(
                    hidden_states=x, timestep=t, encoder_hidden_states=text, pooled_projections=pooled
                )[0]
        ((v.float() - v_ref.float()) ** 2).mean().backward()
        opt.step()
        opt.zero_grad(set_to_none=True)

    start = time.perf_counter()
    for _ in range(args.warmup):
        step()
    sync()
    first = time.perf_counter() - start
    start = time.perf_counter()
    for _ in range(args.steps):
        step()
    sync()
    return {
        "variant": args.variant,
        "s_per_step": (time.perf_counter() - start) / args.steps,
        "first_steps_s": first,
        "params": sum(p.numel() for p in net.parameters()),
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--layers", type=int, default=4)
    parser.add_argument("--heads", type=int, default=4, help="attention heads of 64 channels each")
    parser.add_argument("--resolution", type=int, default=128)
    parser.add_argument("--pairs", type=int, default=1)
    parser.add_argument("--steps", type=int, default=5)
    parser.add_argument(
        "--warmup", type=int, default=2, help="steps before timing (compilation happens here)"
    )
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--dtype", choices=["fp32", "bf16"], default="fp32")
    parser.add_argument("--backend", default="inductor", help="torch.compile backend of the compiled variant")
    parser.add_argument("--variant", choices=["eager", "compiled"], help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.variant:
        print(json.dumps(run_variant(args)))
        return
    results = {v: run_in_subprocess(__file__, v, threads=args.threads) for v in ("eager", "compiled")}
    e, c = results["eager"], results["compiled"]
    print(
        f"LoRA step (policy + reference forward, backward, AdamW), SD3 transformer {e['params'] / 1e6:.1f}M "
        f"({args.layers} blocks x {args.heads * 64} wide), {args.resolution}px, {args.pairs} pair(s), "
        f"{args.device} {args.dtype}, compile backend {args.backend}"
    )
    print(f"{'variant':<10} {'s/step':>9} {'first ' + str(args.warmup) + ' steps s':>18}")
    for name, r in results.items():
        print(f"{name:<10} {r['s_per_step']:>9.4f} {r['first_steps_s']:>18.2f}")
    print(f"speed-up (eager / compiled): {e['s_per_step'] / c['s_per_step']:.2f}x")


if __name__ == "__main__":
    main()
