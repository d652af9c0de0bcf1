"""Flow-DPO under ``accelerate launch --multi_gpu --num_processes 2`` (CPU, gloo) for test_dpo_distributed.

usage: dpo_dist_worker.py MODEL_DIR OUTPUT_DIR PER_PROCESS_BATCH
Prints ``WORLD=<n> RANK=<r>`` on every rank and ``DIST-DONE`` on the main one; ends with the gloo exit
workaround (the crash at interpreter exit after all work is done).
"""

from __future__ import annotations

import os
import sys
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")

import torch  # noqa: E402
import torch.distributed as dist  # noqa: E402

torch.set_num_threads(1)


def pairs(n: int = 8) -> list[dict]:
    g = torch.Generator().manual_seed(0)
    media = torch.rand(2 * n, 3, 32, 32, generator=g)
    prompts = ["a small red circle in the center", "a large blue square in the top left"]
    return [
        {"media_w": media[i], "media_l": media[n + i], "prompt": prompts[i % 2], "index": i} for i in range(n)
    ]


def run(model_dir: str, out: Path, batch_size: int, grad_accum_steps: int = 1):
    from flowalign.config import CheckpointConfig, LoraConfig, OptimConfig, TrainConfig
    from flowalign.models import load_flow_model
    from flowalign.training.loop import train
    from flowalign.training.methods.dpo import DPOConfig, FlowDPO

    torch.manual_seed(0)  # LoRA A init: identical on every process and in the 1-process reference
    method = FlowDPO(
        load_flow_model(model_dir), DPOConfig(beta=2000.0), lora=LoraConfig(rank=4, init="gaussian")
    )
    config = TrainConfig(
        output_dir=out,
        max_steps=3,
        batch_size=batch_size,
        grad_accum_steps=grad_accum_steps,
        log_every=1,
        trackers=[],
        cpu=True,
        optim=OptimConfig(lr=1e-2),
        checkpoint=CheckpointConfig(every=0),
    )
    return train(method, pairs(), config, progress=False)


if __name__ == "__main__":
    run(sys.argv[1], Path(sys.argv[2]), int(sys.argv[3]))
    from accelerate import PartialState

    state = PartialState()
    print(f"WORLD={state.num_processes} RANK={state.process_index}", flush=True)
    if state.is_main_process:
        print("DIST-DONE", flush=True)
    dist.barrier()
    dist.destroy_process_group()
    sys.stdout.flush()
    sys.stderr.flush()
    os._exit(0)
