"""Flow-GRPO under ``accelerate launch --multi_gpu --num_processes 2`` (CPU, gloo) for test_grpo_distributed.

usage: grpo_dist_worker.py MODEL_DIR OUTPUT_DIR PER_PROCESS_BATCH
Prints ``WORLD=<n> RANK=<r>`` on every rank and ``DIST-DONE`` on the main one.
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

PROMPTS = [
    "a small red circle in the center",
    "a large blue square in the top left",
    "a small green triangle in the bottom right",
    "a large yellow circle in the top right",
]


def brightness(media, prompts):
    value = media.flatten(1).mean(1)
    return {"overall": value, "brightness": value}


def run(model_dir: str, out: Path, batch_size: int, grad_accum_steps: int = 1):
    from flowalign.config import CheckpointConfig, LoraConfig, OptimConfig, TrainConfig
    from flowalign.models import load_flow_model
    from flowalign.training.loop import train
    from flowalign.training.methods.grpo import FlowGRPO, GRPOConfig, PromptItems

    torch.manual_seed(0)  # LoRA A init: identical on every process and in the 1-process reference
    cfg = GRPOConfig(num_samples=2, num_inference_steps=2, guidance_scale=2.0, kl_beta=0.1)
    method = FlowGRPO(load_flow_model(model_dir), brightness, cfg, lora=LoraConfig(rank=4, init="gaussian"))
    config = TrainConfig(
        output_dir=out, max_steps=2, batch_size=batch_size, grad_accum_steps=grad_accum_steps, log_every=1,
        trackers=[], cpu=True, optim=OptimConfig(lr=1e-2), checkpoint=CheckpointConfig(every=0),
    )  # fmt: skip
    return train(method, PromptItems(PROMPTS), config, progress=False)


if __name__ == "__main__":
    run(sys.argv[1], Path(sys.argv[2]), int(sys.argv[3]))
    from accelerate import PartialState

    state = PartialState()
    print(f"WORLD={state.num_processes} RANK={state.process_index}", flush=True)
    end_run("DIST-DONE")
