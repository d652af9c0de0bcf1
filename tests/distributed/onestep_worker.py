"""Diff-Instruct* (a generator and a fake score, two optimizer groups) or f-distill (plus discriminator
heads in the critic group) for the sharded-training tests, in this process or under ``accelerate launch``
(CPU, gloo).

usage: onestep_worker.py TEACHER_DIR OUTPUT_DIR MAX_STEPS [method=distar|fdistill] [resume=PATH]
    [wrap=none] [layout=auto|full|sharded] [ema=off]
Prints ``WORLD=<n> RANK=<r> TYPE=<type> SHARDED=<DTensor parameters>/<trainable parameters>`` on every
rank and ``DIST-DONE STEP=<n>`` on the main one; ends with the gloo exit workaround.
"""

from __future__ import annotations

import os
import sys
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")
sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # tests/: gloo_worker

import torch  # noqa: E402

torch.set_num_threads(1)

from gloo_worker import end_run  # noqa: E402

SIZE = 24
PROMPTS = ["a red circle", "a blue square", "a green triangle", "a yellow star"]


class Prompts(torch.utils.data.Dataset):
    """Prompts, with fixed random "real" images for f-distill's discriminator when ``pixels``."""

    def __init__(self, pixels: bool = False) -> None:
        g = torch.Generator().manual_seed(1)
        self.pixels = torch.rand(8, 3, SIZE, SIZE, generator=g) if pixels else None

    def __len__(self) -> int:
        return 8

    def __getitem__(self, i: int) -> dict:
        item = {"prompt": PROMPTS[i % len(PROMPTS)], "index": i}
        if self.pixels is not None:
            item["pixels"] = self.pixels[i]
        return item


def make_method(teacher_dir: str, method: str):
    """DI* (no reward), or f-distill as DMD2: reverse KL with the GAN term and R1, so the critic group
    spans the fake score and the discriminator heads, and no batch statistic is all-reduced (a ratio
    normalisation over the global batch would differ from one process's per-micro-batch one)."""
    from flowalign.models import load_flow_model

    teacher = load_flow_model(teacher_dir)
    if method == "fdistill":
        from flowalign.training.methods.fdistill import FDistill, FDistillConfig

        cfg = FDistillConfig(
            divergence="rkl", gan_weight=0.1, r1_weight=1.0, height=SIZE, width=SIZE, generator_every=2,
            critic_warmup_steps=1, guidance_scale=2.0, discriminator_hidden=16,
        )  # fmt: skip
        return FDistill(teacher, cfg)
    from flowalign.training.methods.distar import DiffInstructStar, DistarConfig

    cfg = DistarConfig(reward_scale=0.0, height=SIZE, width=SIZE, generator_every=2, guidance_scale=2.0)
    return DiffInstructStar(teacher, cfg)


def run(
    teacher_dir: str,
    out: Path,
    batch_size: int,
    *,
    max_steps: int,
    grad_accum_steps: int = 1,
    resume=False,
    method: str = "distar",
    layout: str = "auto",
    ema: bool = True,
):
    """DI* or f-distill from a tiny toy teacher (see :func:`make_method` for the step order); EMA
    (decay 0.5) unless ``ema`` is False."""
    from flowalign.config import CheckpointConfig, EMAConfig, OptimConfig, TrainConfig
    from flowalign.training.distributed import wants_deepspeed
    from flowalign.training.loop import train

    torch.manual_seed(0)
    name, method = method, make_method(teacher_dir, method)
    config = TrainConfig(
        output_dir=out,
        max_steps=max_steps,
        batch_size=batch_size,
        grad_accum_steps=grad_accum_steps,
        grad_clip=None,
        log_every=1,
        trackers=[],
        cpu=not wants_deepspeed(),  # DeepSpeed starts only without cpu=True
        optim=OptimConfig(lr=1e-3),
        ema=EMAConfig(use=ema, decay=0.5),
        checkpoint=CheckpointConfig(every=1, layout=layout),
    )
    data = Prompts(pixels=name == "fdistill")
    return method, train(method, data, config, progress=False, resume=resume)


if __name__ == "__main__":
    a = sys.argv[1:]
    opts = dict(x.split("=", 1) for x in a[3:])
    if opts.get("wrap") == "none":
        os.environ["FSDP_AUTO_WRAP_POLICY"] = "NO_WRAP"
    method, result = run(
        a[0], Path(a[1]), 2, max_steps=int(a[2]), resume=opts.get("resume", False),
        method=opts.get("method", "distar"), layout=opts.get("layout", "auto"),
        ema=opts.get("ema", "on") != "off",
    )  # fmt: skip
    from accelerate.state import AcceleratorState
    from torch.distributed.tensor import DTensor

    acc = AcceleratorState()
    params = [p for m in method.trainable_modules().values() for p in m.parameters() if p.requires_grad]
    sharded = sum(isinstance(p, DTensor) for p in params)
    print(
        f"WORLD={acc.num_processes} RANK={acc.process_index} TYPE={acc.distributed_type} "
        f"SHARDED={sharded}/{len(params)}",
        flush=True,
    )
    end_run(f"DIST-DONE STEP={result.step}")
