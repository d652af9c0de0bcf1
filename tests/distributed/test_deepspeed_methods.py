"""SFT, RWR, GRPO, latent reward, reward model and CDT under DeepSpeed ZeRO-2 on 2 CPU processes (gloo):
2 steps equal one process with the same global batch; under ZeRO-3 each is compared as far as it is
exact (below; the reward model: its last test).

Why the comparisons are exact, and the one tolerance: see tests/distributed/test_sharded_training.py.
Each process's micro-batch has the shapes and data of one accumulated micro-batch of the one-process
run; the ZeRO-2 engine divides each process's gradient by the world size 2 and adds the two halves in
its reduce-scatter (halving is exact in binary floating point, a sum of two terms has no order), keeps
the fp32 Adam state of its partition and all-gathers the updated weights (a copy, no arithmetic). So
weights, EMA, Adam state and the reward trainers' score normalisers (method state) are equal bit for
bit; only the logged gradient norm, which the engine sums partition by partition and then across
processes, is compared within ``(gamma_N + 2u) * norm``. Unlike FSDP2's per-block units, ZeRO-2 adds
no hook inside the backward that reorders autograd's sums, so the full fine-tunes need no ``wrap=none``.

ZeRO-3 (the config of tests/distributed/test_deepspeed_zero3.py: ``memory_efficient_linear`` off, EMA
off, as ZeRO-3 refuses it) partitions the weights too and gathers them around each submodule's forward
and backward. SFT and latent reward equal one process bit for bit over both steps. RWR, GRPO and CDT
equal it bit for bit at step 1, and at step 2 in every metric the forward computes (the loss reads
the step-1 weights only), but their step-2 weights differ by rounding: relative 1.3e-6 (RWR, 7 of 16
LoRA tensors), 1.1e-6 (GRPO, 8 of 16), 3.0e-6 (CDT, 146 of 435 tensors), measured. In RWR only the
first transformer block's LoRA weights differ and the last block's are equal, which points at the
backward's activation gradients rather than at ZeRO-3's reduction (a sum of two halves, exact): the
last block's weight gradients read the loss's gradient directly, an earlier block's read the gradient
of an activation that autograd sums over several consumers (an attention block's input feeds the
query, key and value projections, their LoRA branches and the residual), and the hooks ZeRO-3 puts on
every submodule (a LoRA layer's base and adapter submodules included) can change the order in which
the backward reaches them, so a sum of three or more terms is associated differently. At step 1 every
LoRA B is zero, so the adapter branches add exact zeros. The step-2 weights are therefore not
compared. SFT (plain linear layers, no submodules inside them) is exact.

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
from test_deepspeed_zero3 import zero3_launch_config  # noqa: E402
from test_sharded_training import ZERO2_CPU, _free_port, assert_same_step, metrics  # noqa: E402

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


ZERO3_EXACT = ("sft", "latent")
"""Methods whose ZeRO-3 run equals one process bit for bit over all ``STEPS`` (see the module docstring)."""


def check_zero3_first_step(one: Path, two: Path) -> None:
    """ZeRO-3, RWR, GRPO and CDT: step 1 bit for bit (weights, Adam state, method state, metrics);
    step 2, every metric computed in the forward (they depend on the step-1 weights only) exactly.
    The step-2 weights are not compared: their gradients differ by rounding (module docstring)."""
    assert_same_step(one, two, 1, ema=False)
    sa, sb = (torch.load(d / "checkpoint-00000001" / "method_state.pt") for d in (one, two))
    assert sa.keys() == sb.keys() and all(
        torch.equal(torch.as_tensor(sa[k]), torch.as_tensor(sb[k])) for k in sa
    )
    m1, m2 = metrics(one)[STEPS], metrics(two)[STEPS]
    assert m1.keys() == m2.keys()
    forward = [k for k in m1 if not k.endswith("grad_norm")]
    assert [m1[k] for k in forward] == [m2[k] for k in forward], forward


def check(model_dir: Path, tmp_path: Path, method: str, stage: int = 2) -> None:
    """``STEPS`` ZeRO steps (``stage`` 2 or 3; 3 without EMA, which ZeRO-3 refuses) on 2 processes
    equal one process accumulating the same global batch."""
    ema = stage == 2
    one = tmp_path / "one"
    run(str(model_dir), one, 2, grad_accum_steps=2, max_steps=STEPS, method=method, ema=ema)
    two = tmp_path / "two"
    worker = [str(HERE / "methods_worker.py"), str(model_dir), str(two), str(STEPS), f"method={method}"]
    config = ZERO2_CPU if stage == 2 else zero3_launch_config(tmp_path)
    log = launch_worker(config, worker + ([] if ema else ["ema=off"]), STEPS)
    assert "TYPE=DistributedType.DEEPSPEED" in log, log[-4000:]
    if stage == 3 and method not in ZERO3_EXACT:
        check_zero3_first_step(one, two)
        return
    for step in range(1, STEPS + 1):
        assert_same_step(one, two, step, ema=ema)
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
@pytest.mark.parametrize("stage", [2, 3])
@pytest.mark.parametrize("method", ["sft", "rwr", "grpo", "latent", "cdt"])
def test_deepspeed_method_equals_one_process(toy_dist_dir, toy_teacher_dir, tmp_path, method, stage):
    """Each method: 2 ZeRO-2 or ZeRO-3 steps equal one process with the same global batch."""
    check(toy_teacher_dir if method == "latent" else toy_dist_dir, tmp_path, method, stage)


@pytest.mark.slow
def test_deepspeed_zero3_reward_model_first_forward_equals_one_process(tmp_path):
    """The reward model under ZeRO-3 (EMA off): the step-1 forward (loss, accuracies, the score
    normaliser it updates) equals one process bit for bit. Its step-1 gradients differ by rounding, as
    RWR's step 2 does (a full fine-tune from non-zero weights: every activation gradient with several
    consumers is summed from the start), and Adam's first step, ``lr * g / (|g| + eps)``, turns the
    rounding of the attention key biases, whose exact gradient is zero (softmax ignores a shift shared
    by all keys), into differences up to 4e-6 absolute on biases of size 1e-3, so weights are not
    compared."""
    one, two = tmp_path / "one", tmp_path / "two"
    run(str(tmp_path), one, 2, grad_accum_steps=2, max_steps=STEPS, method="reward", ema=False)
    worker = [
        str(HERE / "methods_worker.py"),
        str(tmp_path),
        str(two),
        str(STEPS),
        "method=reward",
        "ema=off",
    ]
    log = launch_worker(zero3_launch_config(tmp_path), worker, STEPS)
    assert "TYPE=DistributedType.DEEPSPEED" in log, log[-4000:]
    m1, m2 = metrics(one)[1], metrics(two)[1]
    forward = [k for k in m1 if not k.endswith("grad_norm")]
    assert m1.keys() == m2.keys() and [m1[k] for k in forward] == [m2[k] for k in forward], forward
    sa, sb = (torch.load(d / "checkpoint-00000001" / "method_state.pt") for d in (one, two))
    assert sa.keys() == sb.keys() and all(
        torch.equal(torch.as_tensor(sa[k]), torch.as_tensor(sb[k])) for k in sa
    )
