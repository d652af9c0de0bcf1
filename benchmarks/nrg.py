"""Benchmark: per-step cost of Flow-NRG latent guidance vs pixel-space guidance vs no guidance.

    python benchmarks/nrg.py [--family toy|sd3] [--steps 8] [--batch 4] [--repeats 5] [--device cuda]

One sampling run per variant, measured interleaved in one process on the same model and noise:

- none:          the unguided sampler (CFG on);
- latent:        Flow-NRG with a latent reward cut from the model's first ``--blocks`` blocks
                 (one forward + backward through that trunk per step);
- pixel:         clean-reward guidance on decode(x0_hat), velocity held constant (decode + reward
                 forward + backward per step);
- pixel+model:   the same, differentiating through the velocity too (one more backward through the
                 whole transformer per step, DPS-style).

The pixel reward is a small convolutional scorer (a stand-in: real scorers such as CLIP/PickScore cost
more, which only widens the gap). Prints ms per step and the ratio to ``none``.
"""

from __future__ import annotations

import argparse
import os
import sys
import tempfile
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")
sys.path.insert(0, str(Path(__file__).resolve().parent))

import torch  # noqa: E402
from harness import interleaved  # noqa: E402
from torch import Tensor, nn  # noqa: E402

from flowalign.models import load_flow_model  # noqa: E402
from flowalign.pipelines import FlowPipeline  # noqa: E402
from flowalign.rewards.base import RewardModel  # noqa: E402
from flowalign.rewards.latent import LatentRewardModel  # noqa: E402
from flowalign.sampling.nrg import latent_reward_guidance, pixel_reward_guidance  # noqa: E402

SIZES = {"toy": dict(height=32, width=32), "sd3": dict(height=64, width=64)}


class ConvReward(RewardModel):
    """A small differentiable pixel scorer (4 strided convs + linear heads) standing in for a real reward."""

    name = "conv"
    dimensions = ("vq", "ta")
    needs_prompts = False

    def __init__(self, width: int = 64) -> None:
        super().__init__()
        layers, c = [], 3
        for _ in range(4):
            layers += [nn.Conv2d(c, width, 3, stride=2, padding=1), nn.SiLU()]
            c = width
        self.net = nn.Sequential(*layers, nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(width, 2))

    def _score_images(self, images: Tensor, prompts: list[str] | None) -> dict[str, Tensor]:
        out = self.net(images.to(self.dtype))
        return {"vq": out[:, 0], "ta": out[:, 1]}


def build_model(family: str, folder: Path, device: str, dtype: torch.dtype):
    if family == "toy":
        from flowalign.models.toy import save_toy_model

        save_toy_model(folder)  # the toy world's real size: 2.3M parameters, 4 blocks
    else:
        from flowalign.models.tiny import save_tiny_model

        save_tiny_model(family, folder)
    model = load_flow_model(folder, torch_dtype=dtype, device=device)
    if hasattr(model, "max_sequence_length"):
        model.max_sequence_length = 32
    return model


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--family", default="toy", choices=sorted(SIZES))
    parser.add_argument("--steps", type=int, default=8)
    parser.add_argument("--batch", type=int, default=4)
    parser.add_argument("--blocks", type=int, default=2, help="latent reward trunk depth")
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--dtype", default=None, choices=["fp32", "bf16"], help="default: bf16 on cuda")
    args = parser.parse_args()
    torch.set_num_threads(max(1, min(2, os.cpu_count() or 1)))
    dtype = {"fp32": torch.float32, "bf16": torch.bfloat16}[
        args.dtype or ("bf16" if args.device != "cpu" else "fp32")
    ]
    sync = torch.cuda.synchronize if args.device.startswith("cuda") else None
    with tempfile.TemporaryDirectory() as tmp:
        model = build_model(args.family, Path(tmp) / "model", args.device, dtype)
        guide = LatentRewardModel.from_flow_model(
            model, dimensions=("vq", "ta"), num_blocks=args.blocks
        ).eval()
        guide.requires_grad_(False)
        reward = ConvReward().to(args.device, dtype).eval().requires_grad_(False)
        prompts = ["a small red circle in the center"] * args.batch
        weights = {"vq": 0.5, "ta": 1.0}
        transforms = {
            "none": [],
            "latent": [latent_reward_guidance(model, guide, prompts, weights, strength=1.0)],
            "pixel": [pixel_reward_guidance(model, reward, weights, prompts, strength=1.0)],
            "pixel+model": [
                pixel_reward_guidance(
                    model, reward, weights, prompts, strength=1.0, backprop_through_model=True
                )
            ],
        }
        pipe = FlowPipeline(model)
        kwargs = dict(
            num_inference_steps=args.steps, guidance_scale=3.0, output_type="latent", **SIZES[args.family]
        )

        def run(name: str):
            return lambda: pipe(
                prompts,
                generator=torch.Generator().manual_seed(0),
                velocity_transforms=transforms[name],
                **kwargs,
            )

        times = interleaved({name: run(name) for name in transforms}, repeats=args.repeats, sync=sync)
    base = times["none"].median
    print(
        f"\n## {args.family} on {args.device} ({dtype}): batch {args.batch}, {args.steps} Euler steps, CFG 3, "
        f"latent trunk {args.blocks} blocks, median of {args.repeats}"
    )
    print(f"{'guidance':<14} {'ms/step':>10} {'x none':>8}")
    for name, timing in times.items():
        print(f"{name:<14} {1000 * timing.median / args.steps:>10.2f} {timing.median / base:>8.2f}")
    print(
        f"time ratio pixel / latent: {times['pixel'].median / times['latent'].median:.2f}, "
        f"pixel+model / latent: {times['pixel+model'].median / times['latent'].median:.2f} (> 1: latent is faster)"
    )


if __name__ == "__main__":
    main()
