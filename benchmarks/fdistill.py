"""Benchmark: one-step generation vs the teacher's N-step sampling, and the cost of one f-distill iteration.

    python benchmarks/fdistill.py [--size tiny|real] [--batch 4] [--steps 28] [--repeats 5] [--device cuda]

Part 1, sampling latency (same model, same noise, interleaved): the teacher with N Euler steps and CFG
(2N transformer forwards) vs the one-step generator (1 forward, no CFG). Prints ms per batch and the ratio.

Part 2, one distillation iteration of :class:`~flowalign.training.methods.fdistill.FDistill` (JS, GAN on):
the generator step (generator fwd+bwd, teacher fwd x2 for CFG, fake fwd, discriminator on teacher
features fwd+bwd), the critic step (generator fwd, fake fwd+bwd, teacher features on real + fake, heads
fwd+bwd) and the mean over a K-step cycle (1 generator + K-1 critic steps). Peak memory: CUDA's
max_memory_allocated on GPU, the process's peak RSS growth on CPU.

``--size tiny``: the tiny SD3 pipeline of the tests (CPU seconds). ``--size real``: the same pipeline
with an SD3.5-Medium-sized transformer (24 joint blocks, width 1536, patch 2, 16 latent channels,
1024x1024 -> 128x128 latents), random weights, bf16 autocast: the GPU configuration. The text encoders
and VAE stay tiny (they are not in the distillation loop's hot path); no weights are downloaded.
"""

from __future__ import annotations

import argparse
import copy
import os
import resource
import sys
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")
sys.path.insert(0, str(Path(__file__).resolve().parent))

import torch  # noqa: E402
from harness import interleaved, time_fn  # noqa: E402

from flowalign.models.sd3 import SD3Model  # noqa: E402
from flowalign.models.tiny import tiny_sd3_pipeline  # noqa: E402
from flowalign.pipelines import FlowPipeline  # noqa: E402
from flowalign.training.method import StepContext  # noqa: E402

REAL_SD35M = dict(
    num_layers=24, attention_head_dim=64, num_attention_heads=24, caption_projection_dim=1536,
    patch_size=2, in_channels=16, out_channels=16, sample_size=128, pos_embed_max_size=192,
    joint_attention_dim=64, pooled_projection_dim=64,  # the tiny text encoders' widths
)  # fmt: skip


def build_teacher(size: str, device: str) -> tuple[SD3Model, int]:
    """(teacher adapter, image side in pixels)."""
    pipe = tiny_sd3_pipeline(0)
    side = 64
    if size == "real":
        config = {**dict(pipe.transformer.config), **REAL_SD35M}
        pipe.transformer = type(pipe.transformer).from_config(config).eval()
        side = 1024
    model = SD3Model(pipe)
    model.to(device=device)
    return model, side


def peak_memory_mb(device: str) -> float:
    """CUDA: peak allocated since the last reset. CPU: the process's peak RSS so far (a high-water mark)."""
    if device.startswith("cuda"):
        return torch.cuda.max_memory_allocated() / 2**20
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024  # KiB on Linux


def reset_peak(device: str) -> None:
    if device.startswith("cuda"):
        torch.cuda.synchronize()
        torch.cuda.reset_peak_memory_stats()


def sampling(model: SD3Model, side: int, args, sync) -> None:
    prompts = ["a photo of a red circle"] * args.batch
    student = copy.copy(model)  # shares components; a real student is a fine-tuned transformer copy
    pipe = FlowPipeline(model)

    def noise():
        return model.prepare_noise(
            args.batch, height=side, width=side, generator=torch.Generator(args.device).manual_seed(0)
        )

    def teacher():
        pipe(
            prompts,
            latents=noise(),
            num_inference_steps=args.steps,
            guidance_scale=4.5,
            height=side,
            width=side,
            output_type="latent",
        )

    def one_step():
        FlowPipeline(student)(
            prompts,
            latents=noise(),
            one_step=True,
            guidance_scale=1.0,
            height=side,
            width=side,
            output_type="latent",
        )

    with torch.autocast(device_type=args.device.split(":")[0], dtype=torch.bfloat16, enabled=args.bf16):
        timings = interleaved({"teacher": teacher, "one_step": one_step}, repeats=args.repeats, sync=sync)
    t, o = timings["teacher"].median, timings["one_step"].median
    print(f"\n== sampling, batch {args.batch}, {side}x{side} ==")
    print(f"{'teacher ' + str(args.steps) + '-step CFG (2 fwd/step)':<36} {t * 1e3:10.1f} ms")
    print(f"{'one-step generator (1 fwd)':<36} {o * 1e3:10.1f} ms")
    print(
        f"speed-up teacher / one-step: {t / o:.1f}x ({2 * args.steps} transformer forwards vs 1; prompt "
        "encoding and per-call overhead are in both, decoding in neither)"
    )


def iteration(model: SD3Model, side: int, args, sync, method_factory) -> dict[str, float]:
    from flowalign.objectives._common import upcast  # noqa: F401  (import cost outside the timing)

    method = method_factory(model, side)
    modules = method.trainable_modules()
    for m in modules.values():
        m.to(args.device).train()
    batch = {"prompt": ["a photo of a red circle"] * args.batch, "index": torch.arange(args.batch)}
    batch["pixels"] = torch.rand(args.batch, 3, side, side, device=args.device)
    out = {}
    for group in ("generator", "critic"):

        def step(group=group):
            for m in modules.values():
                for p in m.parameters():
                    p.grad = None
            ctx = StepContext(step=0, seed=0, group=group, modules=modules, device=args.device)
            with torch.autocast(
                device_type=args.device.split(":")[0], dtype=torch.bfloat16, enabled=args.bf16
            ):
                loss, _ = method.compute_loss(batch, ctx, group)
            loss.backward()

        reset_peak(args.device)
        timing = time_fn(group, step, repeats=args.repeats, warmup=1, sync=sync)
        out[group] = timing.median
        out[f"{group}_peak_mb"] = peak_memory_mb(args.device)
    k = method.common.generator_every
    out["cycle_mean"] = (out["generator"] + (k - 1) * out["critic"]) / k
    return out


def fdistill_factory(model, side):
    from flowalign.training.methods.fdistill import FDistill, FDistillConfig

    return FDistill(
        model, FDistillConfig(divergence="js", gan_weight=1e-3, guidance_scale=4.5, height=side, width=side)
    )


def print_iteration(name: str, r: dict[str, float], device: str) -> None:
    mem = "peak allocated" if device.startswith("cuda") else "process peak RSS"
    print(f"\n== one {name} iteration ==")
    print(f"generator step  {r['generator'] * 1e3:10.1f} ms   {mem} {r['generator_peak_mb']:9.1f} MiB")
    print(f"critic step     {r['critic'] * 1e3:10.1f} ms   {mem} {r['critic_peak_mb']:9.1f} MiB")
    print(f"mean per step over a K-cycle: {r['cycle_mean'] * 1e3:.1f} ms")


def parse_args(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--size", choices=["tiny", "real"], default="tiny")
    parser.add_argument("--batch", type=int, default=4)
    parser.add_argument("--steps", type=int, default=28)
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--skip-sampling", action="store_true")
    args = parser.parse_args(argv)
    args.bf16 = args.device.startswith("cuda")
    return args


def main(argv=None) -> None:
    args = parse_args(argv)
    torch.set_num_threads(args.threads)
    sync = torch.cuda.synchronize if args.device.startswith("cuda") else None
    model, side = build_teacher(args.size, args.device)
    print(
        f"device {args.device}, size {args.size}, transformer {sum(p.numel() for p in model.transformer.parameters()) / 1e6:.1f}M params, bf16 autocast {args.bf16}"
    )
    if not args.skip_sampling:
        sampling(model, side, args, sync)
    print_iteration("f-distill (JS + GAN)", iteration(model, side, args, sync, fdistill_factory), args.device)


if __name__ == "__main__":
    main()
