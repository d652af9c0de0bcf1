"""Flow-DPO for the sharded-training tests, in this process or under ``accelerate launch`` (CPU, gloo).

usage: sharded_worker.py MODEL_DIR OUTPUT_DIR MODE BATCH MAX_STEPS [resume=PATH] [wrap=none] [ema=off]
[staged=on]
MODE is "lora" or "full"; ``wrap=none`` shards the transformer as one FSDP unit instead of one unit
per transformer block (the launch config's wrap policy); ``staged=on`` loads through the staged
placement (the transformer on the CPU, sharded there) and prints each rank's placement and
``fully_shard`` events (``EVENTS=<json>``) and its local and total transformer sizes. Prints ``WORLD=<n> RANK=<r> STRATEGY=<s>`` on every rank and ``DIST-DONE``
on the main one; ends with the gloo exit workaround (the crash at interpreter exit after all work).
"""

from __future__ import annotations

import json
import os
import sys
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")
sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # tests/: gloo_worker

import torch  # noqa: E402

torch.set_num_threads(1)

from gloo_worker import end_run, toy_pairs  # noqa: E402


def record_events() -> list:
    """The placement events of :data:`flowalign.training.placement.PLACEMENT_HOOKS` and every
    ``fully_shard`` call, in order: for a call, the sharded module's class and whether all of its
    parameters were then plain (not yet sharded) CPU tensors. accelerate and the loop import
    ``fully_shard`` when they call it, so replacing the package attribute sees every call."""
    import torch.distributed.fsdp as fsdp
    from torch.distributed.tensor import DTensor

    from flowalign.training.placement import PLACEMENT_HOOKS

    events: list = []
    PLACEMENT_HOOKS.append(lambda event, name, device: events.append([event, name]))
    original = fsdp.fully_shard

    def recording(module, *args, **kwargs):
        modules = module if isinstance(module, list) else [module]
        params = [p for m in modules for p in m.parameters()]
        whole = all(not isinstance(p, DTensor) and p.device.type == "cpu" for p in params)
        events.append(["fully_shard", type(modules[0]).__name__, whole])
        return original(module, *args, **kwargs)

    fsdp.fully_shard = recording
    return events


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
    staged: bool = False,
):
    """Flow-DPO on 8 toy pairs (lr 1e-2, beta 2000, EMA on unless ``ema`` is False); LoRA rank 4 or a
    full fine-tune."""
    from flowalign.config import CheckpointConfig, EMAConfig, LoraConfig, OptimConfig, TrainConfig
    from flowalign.models import load_flow_model
    from flowalign.training.loop import train
    from flowalign.training.methods.dpo import DPOConfig, FlowDPO
    from flowalign.training.placement import finish_staging, stage_components

    torch.manual_seed(0)  # LoRA A init: identical on every process and in the 1-process reference
    lora = LoraConfig(rank=4, init="gaussian") if mode == "lora" else None
    if staged:  # phase 1 and 3 of the staged placement (no prompt cache: the same losses as unstaged)
        model = stage_components(load_flow_model(model_dir, device="cpu"), "cpu")
        method = FlowDPO(model, DPOConfig(beta=2000.0), lora=lora)
        finish_staging(method)
    else:
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
    staged = opts.get("staged") == "on"
    events = record_events() if staged else []
    method, result = run(
        a[0], Path(a[1]), a[2], int(a[3]), max_steps=int(a[4]), resume=resume, checkpoint_every=1,
        ema=opts.get("ema", "on") != "off", staged=staged,
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
    if staged:
        params = list(method.model.transformer.parameters())
        local = sum(p.to_local().numel() if isinstance(p, DTensor) else p.numel() for p in params)
        total = sum(p.numel() for p in params)  # a DTensor's numel is its global size
        bound = sum(-(-p.shape[0] // 2) * (p.numel() // p.shape[0]) for p in params)  # ceil(rows / 2)
        print(f"RANK{acc.process_index}-LOCAL={local} TOTAL={total} BOUND={bound}", flush=True)
        print(f"RANK{acc.process_index}-EVENTS={json.dumps(events)}", flush=True)
    end_run(f"DIST-DONE STEP={result.step}")
