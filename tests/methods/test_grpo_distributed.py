"""A 2-process CPU Flow-GRPO run equals 1 process with the same global batch."""

from __future__ import annotations

import json
import os
import socket
import subprocess
import sys
from pathlib import Path

import pytest

HERE = Path(__file__).resolve().parent


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.mark.slow
def test_two_process_grpo_matches_one_process(toy_image_dir, tmp_path):
    """Two ranks of 2 prompts against one process taking the same 4 prompts as two micro-batches of 2.

    Every draw is keyed by (seed, step, prompt index * K + k), so each rank samples the trajectories the
    single process samples for those prompts, with the shapes of its micro-batch; groups never straddle
    ranks. Accumulation backpropagates L_k / 2 and sums, DDP averages two ranks' gradients; halving is
    exact in binary floating point and a sum of two terms is order-free, so the logged loss, rewards and
    gradient norm are compared exactly (as in test_dpo_distributed).
    """
    sys.path.insert(0, str(HERE))
    from grpo_dist_worker import run

    run(str(toy_image_dir), tmp_path / "one", 2, grad_accum_steps=2)
    cmd = [
        sys.executable, "-m", "accelerate.commands.launch", "--multi_gpu", "--num_processes", "2",
        "--num_machines", "1", "--mixed_precision", "no", "--dynamo_backend", "no",
        "--main_process_port", str(_free_port()),
        str(HERE / "grpo_dist_worker.py"), str(toy_image_dir), str(tmp_path / "two"), "2",
    ]  # fmt: skip
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "OMP_NUM_THREADS": "1", "CUDA_VISIBLE_DEVICES": ""}
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=600, env=env)
    log = proc.stdout + proc.stderr
    assert "DIST-DONE" in log and "WORLD=2 RANK=1" in log, log[-3000:]
    one = [json.loads(x) for x in (tmp_path / "one" / "metrics.jsonl").read_text().splitlines()]
    two = [json.loads(x) for x in (tmp_path / "two" / "metrics.jsonl").read_text().splitlines()]
    assert len(one) == len(two) == 2
    for a, b in zip(one, two, strict=True):
        for key in ("loss", "reward_brightness", "kl", "grad_norm"):
            assert b[key] == a[key], (key, a, b)
