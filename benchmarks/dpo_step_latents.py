"""Benchmark: a Flow-DPO step on cached VAE latents vs encoding the pairs' pixels every step.

    python benchmarks/dpo_step_latents.py                   # CPU, a minute or two
    python benchmarks/dpo_step_latents.py --vae-width 512 --resolution 256

latents:  ``cache_latents`` (``flowalign.training.latent_cache``): every pair's two pictures go
          through the VAE once before training (its time is reported apart); each step reads the
          latents, and the VAE leaves the step (and, on a GPU, the device).
pixels:   every step encodes its 2P pictures through the VAE.
Both cache the prompt embeddings (``dpo_step_cache.py`` measures that) and run the same step
otherwise: the tiny SD3 transformer with LoRA (rank 4), policy and reference forward, backward, AdamW.

The VAE is an SD3-layout AutoencoderKL made wide on purpose (``--vae-width``: channels
w/4, w/2, w, w, two layers per block; SD3's own is 128, 256, 512, 512) so that encoding weighs
what it weighs at real size; the package's test VAE is 32 wide and costs nothing. Random weights,
nothing downloaded. Each variant runs in its own subprocess (peak RSS its own).
"""

from __future__ import annotations

import argparse
import json
import resource
import tempfile
import time

from dpo_step_cache import PROMPTS, build_model  # noqa: E402
from harness import mean_step_seconds, run_in_subprocess  # noqa: E402


def wide_vae(width: int):
    from diffusers import AutoencoderKL

    return AutoencoderKL(
        in_channels=3, out_channels=3, latent_channels=16,
        down_block_types=("DownEncoderBlock2D",) * 4, up_block_types=("UpDecoderBlock2D",) * 4,
        block_out_channels=(width // 4, width // 2, width, width), layers_per_block=2,
        norm_num_groups=min(32, width // 4), sample_size=64, use_quant_conv=False, use_post_quant_conv=False,
        shift_factor=0.0609, scaling_factor=1.5035,
    ).eval()  # fmt: skip


def run_variant(args) -> dict:
    import torch

    from flowalign.config import LoraConfig
    from flowalign.training.latent_cache import cache_media_latents, offload_vae
    from flowalign.training.method import StepContext
    from flowalign.training.methods.dpo import DPOConfig, FlowDPO

    torch.set_num_threads(args.threads)
    model = build_model(args.text_layers, args.text_hidden)
    model.pipe.register_modules(vae=wide_vae(args.vae_width))
    method = FlowDPO(model, DPOConfig(), lora=LoraConfig(rank=4, alpha=4.0))
    tmp = tempfile.TemporaryDirectory()
    method.cache_prompts(PROMPTS, cache_dir=f"{tmp.name}/prompts")
    g = torch.Generator().manual_seed(0)
    n = args.pairs * (args.steps + args.warmup)
    items: list[dict] = [
        {
            "media_w": torch.rand(3, args.resolution, args.resolution, generator=g),
            "media_l": torch.rand(3, args.resolution, args.resolution, generator=g),
            "prompt": PROMPTS[i % len(PROMPTS)],
            "index": i,
        }
        for i in range(n)
    ]
    cache_s = None
    if args.variant == "latents":
        start = time.perf_counter()
        items = cache_media_latents(model, items, f"{tmp.name}/latents", identity="bench")
        offload_vae(method)
        cache_s = time.perf_counter() - start
    step_modules = {**method.trainable_modules(), **method.frozen_modules()}
    step_bytes = sum(
        p.numel() * p.element_size()
        for m in {id(m): m for m in step_modules.values()}.values()
        for p in m.parameters()
    )
    params = [p for p in model.transformer.parameters() if p.requires_grad]
    opt = torch.optim.AdamW(params, lr=1e-5)

    def step(k: int) -> None:
        batch = method.collate([items[i] for i in range(k * args.pairs, (k + 1) * args.pairs)])
        ctx = StepContext(step=k, seed=0, group="default", modules=method.trainable_modules())
        loss, _ = method.compute_loss(batch, ctx, "default")
        loss.backward()
        opt.step()
        opt.zero_grad(set_to_none=True)

    seconds = mean_step_seconds(step, warmup=args.warmup, steps=args.steps)
    tmp.cleanup()
    return {
        "variant": args.variant,
        "s_per_step": seconds,
        "peak_rss_gb": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20,  # Linux: KiB
        "step_module_gb": step_bytes / 2**30,
        "cache_s": cache_s,
        "cached_items": n,
        "vae_params": sum(p.numel() for p in model.pipe.vae.parameters()),
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--vae-width", type=int, default=256, help="widest VAE block (SD3: 512)")
    parser.add_argument("--resolution", type=int, default=128)
    parser.add_argument("--pairs", type=int, default=2)
    parser.add_argument("--steps", type=int, default=4)
    parser.add_argument("--warmup", type=int, default=1)
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--text-layers", type=int, default=2)
    parser.add_argument("--text-hidden", type=int, default=64)
    parser.add_argument("--variant", choices=["pixels", "latents"], help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.variant:
        print(json.dumps(run_variant(args)))
        return
    results = {v: run_in_subprocess(__file__, v, threads=args.threads) for v in ("pixels", "latents")}
    p, c = results["pixels"], results["latents"]
    print(
        f"Flow-DPO step, CPU ({args.threads} thread), tiny SD3 transformer with LoRA r4, prompts cached in both, "
        f"{args.resolution}px, {args.pairs} pairs; VAE {p['vae_params'] / 1e6:.1f}M parameters (widest block "
        f"{args.vae_width})"
    )
    print(f"{'variant':<10} {'s/step':>9} {'peak RSS GB':>12} {'step modules GB':>16}")
    for name, r in results.items():
        print(f"{name:<10} {r['s_per_step']:>9.4f} {r['peak_rss_gb']:>12.3f} {r['step_module_gb']:>16.4f}")
    print(f"latent cache build (once, {c['cached_items']} pairs): {c['cache_s']:.3f} s")
    print(
        f"speed-up (pixels / latents): {p['s_per_step'] / c['s_per_step']:.2f}x; "
        f"peak RSS ratio (latents / pixels): {c['peak_rss_gb'] / p['peak_rss_gb']:.2f}; "
        f"step-module memory ratio (latents / pixels): {c['step_module_gb'] / p['step_module_gb']:.2f}"
    )


if __name__ == "__main__":
    main()
