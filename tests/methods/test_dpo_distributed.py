"""A 2-process CPU Flow-DPO run equals 1 process with the same global batch."""

from __future__ import annotations

import json
import os
import socket
import subprocess
import sys
from pathlib import Path

HERE = Path(__file__).resolve().parent


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def test_two_process_dpo_matches_one_process(toy_image_dir, tmp_path):
    """The one-process run takes the same global batch of 4 as two micro-batches of 2 (gradient
    accumulation), so every forward and backward has the shapes of a DDP rank's and the same pairs.

    The arithmetic is then the same, bit for bit, on any CPU: accumulation backpropagates ``L_k / 2``
    and sums, DDP backpropagates ``L_r`` and averages over two ranks; halving is exact in binary floating
    point (no subnormals here), so both give ``round(g_1 + g_2) / 2``, and a sum of two terms does not
    depend on their order. Metrics are averaged the same way. Any difference would be a real divergence
    (another data split, another random draw, a missed all-reduce), so the comparison is exact. The
    earlier comparison of a batch of 4 against two batches of 2 differed by BLAS blocking, which varies
    between CPU models and cannot be bounded from the arithmetic.
    """
    sys.path.insert(0, str(HERE))
    from dpo_dist_worker import run

    run(str(toy_image_dir), tmp_path / "one", 2, grad_accum_steps=2)
    cmd = [
        sys.executable,
        "-m",
        "accelerate.commands.launch",
        "--multi_gpu",
        "--num_processes",
        "2",
        "--num_machines",
        "1",
        "--mixed_precision",
        "no",
        "--dynamo_backend",
        "no",
        "--main_process_port",
        str(_free_port()),
        str(HERE / "dpo_dist_worker.py"),
        str(toy_image_dir),
        str(tmp_path / "two"),
        "2",
    ]
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "OMP_NUM_THREADS": "1", "CUDA_VISIBLE_DEVICES": ""}
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=300, env=env)
    log = proc.stdout + proc.stderr
    assert "DIST-DONE" in log and "WORLD=2 RANK=1" in log, log[-3000:]  # markers, not the exit code
    one = [json.loads(x) for x in (tmp_path / "one" / "metrics.jsonl").read_text().splitlines()]
    two = [json.loads(x) for x in (tmp_path / "two" / "metrics.jsonl").read_text().splitlines()]
    assert len(one) == len(two) == 3
    for a, b in zip(one, two, strict=True):
        for key in ("loss", "inside", "grad_norm"):
            assert b[key] == a[key], (key, a, b)
