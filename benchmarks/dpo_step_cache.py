"""Benchmark: a Flow-DPO step with cached prompt embeddings vs encoding the prompts every step.

    python benchmarks/dpo_step_cache.py                     # CPU, about a minute
    python benchmarks/dpo_step_cache.py --layers 12 --hidden 512 --steps 10

cached:   ``FlowDPO.cache_prompts`` encodes each distinct prompt once before training (its time is
          reported apart); each step reads the embeddings, and the text encoders leave the step
          (and, on a GPU, the device).
per-step: every step encodes its 2P prompts (chosen and rejected) through both text encoders.
Both run the same step otherwise: the tiny SD3 transformer with LoRA (rank 4), the policy and the
reference (adapters off) forward, backward, AdamW; pixels go through the VAE in both.

The model is the tiny SD3 pipeline with its two CLIP text encoders made large (``--layers``,
``--hidden``; about a CLIP-L per encoder at 12 x 768) so that encoding weighs what it weighs at
real size: with the package's 32-wide test encoders encoding costs nothing and there is nothing to
measure. Random weights, nothing downloaded. Each variant runs in its own subprocess so its peak
RSS (``ru_maxrss``) is its own; on the CPU both keep the encoders in RAM, so the RSS difference is
the encoders' activations only. "step modules" adds up the weights the loop would place on the
accelerator for the step (trainable + frozen modules): the saving the cache gives on a GPU.
"""

from __future__ import annotations

import argparse
import json
import resource
import tempfile
import time

from harness import mean_step_seconds, run_in_subprocess  # noqa: E402

PROMPTS = [
    "a red cube on a wooden table, studio light",
    "two cats sleeping on a blue sofa",
    "a lighthouse at dusk above a stormy sea",
    "a bowl of ramen with chopsticks, top view",
    "an astronaut riding a horse in a desert",
    "a watercolor painting of a small village",
    "a macro photo of a dew drop on a leaf",
    "a city street at night in the rain, neon signs",
]


def build_model(layers: int, hidden: int):
    """The tiny SD3 pipeline with two large CLIP text encoders (and a transformer sized to read them)."""
    import torch
    from diffusers import FlowMatchEulerDiscreteScheduler, SD3Transformer2DModel, StableDiffusion3Pipeline
    from transformers import CLIPTextConfig, CLIPTextModelWithProjection

    from flowalign.models.sd3 import SD3Model
    from flowalign.models.tiny import TINY_SD3_TRANSFORMER, _tiny_vae, tiny_clip_tokenizer

    torch.manual_seed(0)
    tok = tiny_clip_tokenizer()
    n = len(tok)

    def encoder():
        cfg = CLIPTextConfig(
            vocab_size=n,
            hidden_size=hidden,
            intermediate_size=4 * hidden,
            num_attention_heads=max(1, hidden // 64),
            num_hidden_layers=layers,
            max_position_embeddings=77,
            projection_dim=32,
            bos_token_id=n - 2,
            eos_token_id=n - 1,
            pad_token_id=n - 1,
        )
        return CLIPTextModelWithProjection(cfg).eval()

    # SD3 concatenates the two CLIP hidden states (2 x hidden) and the two pooled projections (2 x 32)
    cfg = dict(TINY_SD3_TRANSFORMER, joint_attention_dim=2 * hidden, pooled_projection_dim=64)
    pipe = StableDiffusion3Pipeline(
        transformer=SD3Transformer2DModel(**cfg),
        scheduler=FlowMatchEulerDiscreteScheduler(shift=3.0),
        vae=_tiny_vae().eval(),
        text_encoder=encoder(),
        tokenizer=tok,
        text_encoder_2=encoder(),
        tokenizer_2=tiny_clip_tokenizer(),
        text_encoder_3=None,
        tokenizer_3=None,
    )
    return SD3Model(pipe)


def run_variant(args) -> dict:
    import torch

    from flowalign.config import LoraConfig
    from flowalign.training.method import StepContext
    from flowalign.training.methods.dpo import DPOConfig, FlowDPO

    torch.set_num_threads(args.threads)
    model = build_model(args.layers, args.hidden)
    method = FlowDPO(model, DPOConfig(), lora=LoraConfig(rank=4, alpha=4.0))
    encoders = sum(
        p.numel() for n in ("text_encoder", "text_encoder_2") for p in model.modules()[n].parameters()
    )
    cache_s = None
    tmp = tempfile.TemporaryDirectory()  # the cache is read from its files during the steps
    if args.variant == "cached":
        start = time.perf_counter()
        method.cache_prompts(PROMPTS, cache_dir=tmp.name)
        cache_s = time.perf_counter() - start
    step_modules = {**method.trainable_modules(), **method.frozen_modules()}
    step_bytes = sum(
        p.numel() * p.element_size()
        for m in {id(m): m for m in step_modules.values()}.values()
        for p in m.parameters()
    )
    params = [p for p in model.transformer.parameters() if p.requires_grad]
    opt = torch.optim.AdamW(params, lr=1e-5)
    g = torch.Generator().manual_seed(0)
    media = torch.rand(2 * args.pairs, 3, args.resolution, args.resolution, generator=g)

    def step(k: int) -> None:
        ids = torch.arange(k * args.pairs, (k + 1) * args.pairs)
        batch = {
            "prompt": [PROMPTS[int(i) % len(PROMPTS)] for i in ids],
            "index": ids,
            "media_w": media[: args.pairs],
            "media_l": media[args.pairs :],
        }
        ctx = StepContext(step=k, seed=0, group="default", modules=method.trainable_modules())
        loss, _ = method.compute_loss(batch, ctx, "default")
        loss.backward()
        opt.step()
        opt.zero_grad(set_to_none=True)

    seconds = mean_step_seconds(step, warmup=args.warmup, steps=args.steps)
    peak_gb = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20  # Linux: KiB
    tmp.cleanup()
    return {
        "variant": args.variant,
        "s_per_step": seconds,
        "peak_rss_gb": peak_gb,
        "step_module_gb": step_bytes / 2**30,
        "cache_s": cache_s,
        "encoder_params": encoders,
        "transformer_params": sum(p.numel() for p in model.transformer.parameters()),
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--layers", type=int, default=12, help="layers per CLIP text encoder")
    parser.add_argument("--hidden", type=int, default=512, help="width of each CLIP text encoder")
    parser.add_argument("--resolution", type=int, default=64)
    parser.add_argument("--pairs", type=int, default=2)
    parser.add_argument("--steps", type=int, default=6)
    parser.add_argument("--warmup", type=int, default=1)
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--variant", choices=["cached", "per-step"], help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.variant:
        print(json.dumps(run_variant(args)))
        return
    results = {
        variant: run_in_subprocess(__file__, variant, threads=args.threads)
        for variant in ("per-step", "cached")
    }
    p, c = results["per-step"], results["cached"]
    print(
        f"Flow-DPO step, CPU ({args.threads} thread), tiny SD3 transformer ({p['transformer_params'] / 1e6:.2f}M) "
        f"with LoRA r4, {args.resolution}px, {args.pairs} pairs; text encoders made large on purpose: "
        f"2 x CLIP {args.layers} layers x {args.hidden} wide = {p['encoder_params'] / 1e6:.1f}M parameters"
    )
    print(f"{'variant':<10} {'s/step':>9} {'peak RSS GB':>12} {'step modules GB':>16}")
    for name, r in results.items():
        print(f"{name:<10} {r['s_per_step']:>9.4f} {r['peak_rss_gb']:>12.3f} {r['step_module_gb']:>16.3f}")
    print(f"cache build (once, {len(PROMPTS)} prompts): {c['cache_s']:.3f} s")
    print(
        f"speed-up (per-step / cached): {p['s_per_step'] / c['s_per_step']:.2f}x; "
        f"peak RSS ratio (cached / per-step): {c['peak_rss_gb'] / p['peak_rss_gb']:.2f}; "
        f"step-module memory ratio (cached / per-step): {c['step_module_gb'] / p['step_module_gb']:.2f}"
    )


if __name__ == "__main__":
    main()
