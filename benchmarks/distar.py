"""Benchmark: one Diff-Instruct* iteration vs one f-distill iteration on the same teacher, side by side.

    python benchmarks/distar.py [--size tiny|real] [--batch 4] [--repeats 5] [--device cuda]

Variants (same teacher, batch, noise; measured in one process):

- f-distill:  JS + GAN (generator step: generator fwd+bwd, teacher x2 (CFG), fake fwd, discriminator on
              teacher features fwd+bwd; critic step: fake fwd+bwd + discriminator on real and fake);
- DI*:        score-divergence regulariser (generator step: generator fwd+bwd, decode + reward fwd+bwd, and a
              backward through BOTH score networks: fake fwd+bwd and teacher x2 fwd+bwd, parameters frozen;
              critic step: fake fwd+bwd only);
- DI* (KL):   the KL-regularised baseline (score networks without grad: no backward through them).

The reward is a small convolutional pixel scorer (stand-in for PickScore-class models, which cost more).
Sizes as in ``benchmarks/fdistill.py`` (``--size real``: SD3.5-Medium-sized transformer, 1024x1024, bf16).
"""

from __future__ import annotations

import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))

import torch  # noqa: E402
from fdistill import build_teacher, fdistill_factory, iteration, parse_args  # noqa: E402
from torch import Tensor, nn  # noqa: E402

from flowalign.rewards.base import RewardModel  # noqa: E402


class ConvReward(RewardModel):
    """A small differentiable pixel scorer: 4 strided convs, global pool, linear."""

    name = "conv"
    dimensions = ("ta",)
    needs_prompts = False

    def __init__(self, width: int = 64) -> None:
        super().__init__()
        layers, c = [], 3
        for _ in range(4):
            layers += [nn.Conv2d(c, width, 3, stride=2, padding=1), nn.SiLU()]
            c = width
        self.net = nn.Sequential(*layers, nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(width, 1))

    def _score_images(self, images: Tensor, prompts: list[str] | None) -> dict[str, Tensor]:
        return {"ta": self.net(images.to(self.dtype))[:, 0]}


def distar_factory(regularizer: str, device: str):
    def make(model, side):
        from flowalign.training.methods.distar import DiffInstructStar, DistarConfig

        cfg = DistarConfig(
            reward="conv",
            reward_scale=1.0,
            regularizer=regularizer,
            guidance_scale=4.5,
            height=side,
            width=side,
        )
        return DiffInstructStar(model, cfg, reward=ConvReward().to(device))

    return make


def main(argv=None) -> None:
    args = parse_args(argv)
    torch.set_num_threads(args.threads)
    sync = torch.cuda.synchronize if args.device.startswith("cuda") else None
    results = {}
    for name, factory in (
        ("f-distill (JS+GAN)", fdistill_factory),
        ("DI* (score div.)", distar_factory("score", args.device)),
        ("DI* (KL baseline)", distar_factory("kl", args.device)),
    ):
        model, side = build_teacher(args.size, args.device)  # fresh teacher: methods attach their own state
        results[name] = iteration(model, side, args, sync, factory)
        del model
    mem = "peak alloc MiB" if args.device.startswith("cuda") else "proc peak RSS MiB"
    print(f"\ndevice {args.device}, size {args.size}, batch {args.batch}, bf16 autocast {args.bf16}")
    print(
        f"{'method':<22} {'gen ms':>9} {'critic ms':>10} {'K-cycle ms':>11} {'gen ' + mem:>20} {'x f-distill gen':>16}"
    )
    ref = results["f-distill (JS+GAN)"]["generator"]
    for name, r in results.items():
        print(
            f"{name:<22} {r['generator'] * 1e3:9.1f} {r['critic'] * 1e3:10.1f} {r['cycle_mean'] * 1e3:11.1f} "
            f"{r['generator_peak_mb']:20.1f} {r['generator'] / ref:16.2f}"
        )


if __name__ == "__main__":
    main()
