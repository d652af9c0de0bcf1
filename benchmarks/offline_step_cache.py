"""Benchmark: SFT and image-to-video DPO steps on cached conditioning vs encoding it every step.

    python benchmarks/offline_step_cache.py                 # CPU, about a minute
    python benchmarks/offline_step_cache.py --steps 10 --layers 12 --hidden 512

sft:     flow-matching SFT (full fine-tune) of the tiny SD3 transformer with the two large CLIP text
         encoders of ``dpo_step_cache.py``; per-step encodes the prompts and the pixels every step,
         cached reads the prompt cache (``cache_prompts``) and the latent cache (``cache_latents``).
i2v-dpo: Flow-DPO (LoRA r4) on the tiny Wan 2.1 I2V pipeline; per-step encodes each pair's text and its
         condition image (a zero-padded 5-frame clip through the VAE, and CLIP image tokens) every
         step, cached reads the prompt cache and the per-row condition cache
         (``flowalign/training/condition_cache.py``). The pair media go through the VAE in both.

Both variants of a method run the same step otherwise, in one process, one after the other, each
timed after a warm-up step. Caches are built once before the timed steps (their time is reported apart). Random weights,
nothing downloaded.
"""

from __future__ import annotations

import argparse
import tempfile
import time
from pathlib import Path

from dpo_step_cache import PROMPTS, build_model
from harness import mean_step_seconds


def sft_step(args, *, cached: bool, tmp: Path):
    import torch

    from flowalign.training.latent_cache import cache_media_latents, offload_vae
    from flowalign.training.method import StepContext
    from flowalign.training.methods.sft import FlowMatchingSFT, SFTConfig

    model = build_model(args.layers, args.hidden)
    method = FlowMatchingSFT(model, SFTConfig(caption_dropout=0.1))
    g = torch.Generator().manual_seed(0)
    pixels = torch.rand(len(PROMPTS), 3, args.resolution, args.resolution, generator=g)
    data = [{"pixels": pixels[i], "prompt": p, "index": i} for i, p in enumerate(PROMPTS)]
    start = time.perf_counter()
    if cached:
        method.cache_prompts(PROMPTS, cache_dir=tmp / "prompts")
        data = cache_media_latents(model, data, tmp / "latents", identity="bench")
        offload_vae(method)
    build = time.perf_counter() - start
    opt = torch.optim.AdamW([p for p in model.transformer.parameters() if p.requires_grad], lr=1e-5)

    def step(k: int) -> None:
        items = [data[(k * args.batch + j) % len(PROMPTS)] for j in range(args.batch)]
        batch = method.collate(items)
        ctx = StepContext(step=k, seed=0, modules=method.trainable_modules())
        method.compute_loss(batch, ctx, "default")[0].backward()
        opt.step()
        opt.zero_grad(set_to_none=True)

    return step, build


def i2v_step(args, *, cached: bool, tmp: Path):
    import numpy as np
    import torch

    from flowalign.config import LoraConfig
    from flowalign.models import load_flow_model
    from flowalign.models.tiny_conditioned import save_tiny_conditioned
    from flowalign.training.condition_cache import cache_condition_images
    from flowalign.training.method import StepContext
    from flowalign.training.methods.dpo import DPOConfig, FlowDPO

    folder = tmp / "wan-i2v"
    if not folder.exists():
        save_tiny_conditioned("wan-i2v", folder)
    model = load_flow_model(folder, device="cpu")
    method = FlowDPO(model, DPOConfig(), lora=LoraConfig(rank=4, export_merged=False))
    rng = np.random.default_rng(0)
    data = []
    for i, prompt in enumerate(PROMPTS[:4]):
        clips = torch.from_numpy(rng.random((2, 5, 3, 32, 32), dtype=np.float32))
        image = torch.from_numpy(rng.integers(0, 256, (3, 32, 32)).astype(np.float32) / 255)
        data.append(
            {"prompt": prompt, "media_w": clips[0], "media_l": clips[1], "condition": image, "index": i}
        )
    start = time.perf_counter()
    if cached:
        method.cache_prompts([d["prompt"] for d in data], cache_dir=tmp / "i2v-prompts")
        data = cache_condition_images(model, data, tmp / "i2v-conditions", identity="bench")
        method.conditions_cached = True
    build = time.perf_counter() - start
    opt = torch.optim.AdamW([p for p in model.transformer.parameters() if p.requires_grad], lr=1e-5)

    def step(k: int) -> None:
        items = [data[(k * args.batch + j) % len(data)] for j in range(args.batch)]
        ctx = StepContext(step=k, seed=0, modules=method.trainable_modules())
        method.compute_loss(method.collate(items), ctx, "default")[0].backward()
        opt.step()
        opt.zero_grad(set_to_none=True)

    return step, build


def main() -> None:
    import torch

    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--layers", type=int, default=12, help="layers per CLIP text encoder (sft)")
    parser.add_argument("--hidden", type=int, default=512, help="width of each CLIP text encoder (sft)")
    parser.add_argument("--resolution", type=int, default=64)
    parser.add_argument("--batch", type=int, default=2)
    parser.add_argument("--steps", type=int, default=4)
    parser.add_argument("--warmup", type=int, default=1)
    parser.add_argument("--threads", type=int, default=1)
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    print(f"CPU, {args.threads} thread(s), batch {args.batch}, {args.steps} timed steps after {args.warmup}")
    print(f"{'method':<9} {'per-step s':>11} {'cached s':>9} {'speed-up':>9} {'cache build s':>14}")
    with tempfile.TemporaryDirectory() as name:
        tmp = Path(name)
        for label, make in (("sft", sft_step), ("i2v-dpo", i2v_step)):
            seconds, build = {}, 0.0
            for cached in (False, True):
                step, spent = make(args, cached=cached, tmp=tmp)
                seconds[cached] = mean_step_seconds(step, warmup=args.warmup, steps=args.steps)
                build = spent if cached else build
            ratio = seconds[False] / seconds[True]
            print(f"{label:<9} {seconds[False]:>11.4f} {seconds[True]:>9.4f} {ratio:>8.2f}x {build:>14.3f}")


if __name__ == "__main__":
    main()
