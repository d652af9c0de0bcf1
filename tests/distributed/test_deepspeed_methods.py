"""SFT, RWR, GRPO, latent reward, reward model and CDT under DeepSpeed ZeRO-2 on 2 CPU processes (gloo):
2 steps equal one process with the same global batch.

Why the comparisons are exact, and the one tolerance: see tests/distributed/test_sharded_training.py.
Each process's micro-batch has the shapes and data of one accumulated micro-batch of the one-process
run; the ZeRO-2 engine divides each process's gradient by the world size 2 and adds the two halves in
its reduce-scatter (halving is exact in binary floating point, a sum of two terms has no order), keeps
the fp32 Adam state of its partition and all-gathers the updated weights (a copy, no arithmetic). So
weights, EMA, Adam state and the reward trainers' score normalisers (method state) are equal bit for
bit; only the logged gradient norm, which the engine sums partition by partition and then across
processes, is compared within ``(gamma_N + 2u) * norm``. Unlike FSDP2's per-block units, ZeRO-2 adds
no hook inside the backward that reorders autograd's sums, so the full fine-tunes need no ``wrap=none``.

DeepSpeed is an optional extra: without it the tests are skipped.
"""

from __future__ import annotations

import importlib.util
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from flowalign.training.dcp_checkpoint import read_full

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))

from methods_worker import run  # noqa: E402
from test_sharded_training import ZERO2_CPU, _free_port, assert_same_step  # noqa: E402

pytestmark = [
    pytest.mark.usefixtures("one_thread"),
    pytest.mark.skipif(importlib.util.find_spec("deepspeed") is None, reason="deepspeed is not installed"),
]

STEPS = 2


def launch_worker(config: Path, worker: list[str], steps: int) -> str:
    """``accelerate launch`` of a worker script and its arguments on 2 processes with ``config``;
    returns the log after checking the printed markers (gloo can abort at interpreter exit)."""
    cmd = [
        sys.executable, "-m", "accelerate.commands.launch", "--config_file", str(config),
        "--num_processes", "2", "--main_process_port", str(_free_port()), *worker,
    ]  # fmt: skip
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "OMP_NUM_THREADS": "1", "CUDA_VISIBLE_DEVICES": ""}
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=600, env=env)
    log = proc.stdout + proc.stderr
    assert f"DIST-DONE STEP={steps}" in log, log[-4000:]
    assert "WORLD=2 RANK=0" in log and "WORLD=2 RANK=1" in log, log[-4000:]
    return log


def check(model_dir: Path, tmp_path: Path, method: str) -> None:
    """``STEPS`` ZeRO-2 steps on 2 processes equal one process accumulating the same global batch."""
    one = tmp_path / "one"
    run(str(model_dir), one, 2, grad_accum_steps=2, max_steps=STEPS, method=method)
    two = tmp_path / "two"
    worker = [str(HERE / "methods_worker.py"), str(model_dir), str(two), str(STEPS), f"method={method}"]
    log = launch_worker(ZERO2_CPU, worker, STEPS)
    assert "TYPE=DistributedType.DEEPSPEED" in log, log[-4000:]
    for step in range(1, STEPS + 1):
        assert_same_step(one, two, step)
        sa, sb = (torch.load(d / f"checkpoint-{step:08d}" / "method_state.pt") for d in (one, two))
        assert sa.keys() == sb.keys()  # the reward trainers' score normalisers, folded over all ranks
        for key in sa:
            assert torch.equal(torch.as_tensor(sa[key]), torch.as_tensor(sb[key])), (step, key)
    first, last = (read_full(two / f"checkpoint-{s:08d}").weights for s in (1, STEPS))
    assert any(not torch.equal(first[m][k], last[m][k]) for m in first for k in first[m])  # it trained


def test_deepspeed_zero2_reward_model_equals_one_process(tmp_path):
    """The multi-head reward model (full fine-tune, CLIP's frozen 0-d logit_scale beside the trained
    weights): 2 ZeRO-2 steps equal one process, normaliser included."""
    check(tmp_path, tmp_path, "reward")  # builds its network from a seed: no model folder


@pytest.mark.slow
@pytest.mark.parametrize("method", ["sft", "rwr", "grpo", "latent", "cdt"])
def test_deepspeed_zero2_method_equals_one_process(toy_dist_dir, toy_teacher_dir, tmp_path, method):
    """Each method: 2 ZeRO-2 steps equal one process with the same global batch."""
    check(toy_teacher_dir if method == "latent" else toy_dist_dir, tmp_path, method)
