"""Flow-DPO for the sharded-training tests, in this process or under ``accelerate launch`` (CPU, gloo).

usage: sharded_worker.py MODEL_DIR OUTPUT_DIR MODE BATCH MAX_STEPS [resume=PATH] [wrap=none] [ema=off]
MODE is "lora" or "full"; ``wrap=none`` shards the transformer as one FSDP unit instead of one unit
per transformer block (the launch config's wrap policy). Prints ``WORLD=<n> RANK=<r> STRATEGY=<s>`` on every rank and ``DIST-DONE``
on the main one; ends with the gloo exit workaround (the crash at interpreter exit after all work).
"""

from __future__ import annotations

import os
import sys
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")
sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # tests/: gloo_worker

import torch  # noqa: E402

torch.set_num_threads(1)

from gloo_worker import end_run, toy_pairs  # noqa: E402


def run(
    model_dir: str,
    out: Path,
    mode: str,
    batch_size: int,
    *,
    max_steps: int = 3,
    grad_accum_steps: int = 1,
    resume: bool | str = False,
    grad_clip: float | None = None,
    checkpoint_every: int = 0,
    ema: bool = True,
):
    """Flow-DPO on 8 toy pairs (lr 1e-2, beta 2000, EMA on unless ``ema`` is False); LoRA rank 4 or a
    full fine-tune."""
    from flowalign.config import CheckpointConfig, EMAConfig, LoraConfig, OptimConfig, TrainConfig
    from flowalign.models import load_flow_model
    from flowalign.training.loop import train
    from flowalign.training.methods.dpo import DPOConfig, FlowDPO

    torch.manual_seed(0)  # LoRA A init: identical on every process and in the 1-process reference
    lora = LoraConfig(rank=4, init="gaussian") if mode == "lora" else None
    method = FlowDPO(load_flow_model(model_dir), DPOConfig(beta=2000.0), lora=lora)
    config = TrainConfig(
        output_dir=out,
        max_steps=max_steps,
        batch_size=batch_size,
        grad_accum_steps=grad_accum_steps,
        grad_clip=grad_clip,
        log_every=1,
        trackers=[],
        cpu=os.environ.get("ACCELERATE_USE_DEEPSPEED", "false") != "true",  # DeepSpeed needs cpu=False
        optim=OptimConfig(lr=1e-2 if mode == "lora" else 1e-3),
        ema=EMAConfig(use=ema, decay=0.5),
        checkpoint=CheckpointConfig(every=checkpoint_every),
    )
    return method, train(method, toy_pairs(), config, progress=False, resume=resume)


if __name__ == "__main__":
    a = sys.argv[1:]
    opts = dict(x.split("=", 1) for x in a[5:])
    if opts.get("wrap") == "none":
        os.environ["FSDP_AUTO_WRAP_POLICY"] = "NO_WRAP"
    resume = opts.get("resume", False)
    method, result = run(
        a[0], Path(a[1]), a[2], int(a[3]), max_steps=int(a[4]), resume=resume, checkpoint_every=1,
        ema=opts.get("ema", "on") != "off",
    )  # fmt: skip
    from accelerate.state import AcceleratorState
    from torch.distributed.fsdp import FSDPModule
    from torch.distributed.tensor import DTensor

    acc = AcceleratorState()
    print(f"WORLD={acc.num_processes} RANK={acc.process_index} TYPE={acc.distributed_type}", flush=True)
    trainable = [p for p in method.model.transformer.parameters() if p.requires_grad]
    sharded = sum(isinstance(p, DTensor) for p in trainable)
    ref = method.reference.copy
    print(f"SHARDED={sharded}/{len(trainable)} REF-SHARDED={isinstance(ref, FSDPModule)}", flush=True)
    end_run(f"DIST-DONE STEP={result.step}")
