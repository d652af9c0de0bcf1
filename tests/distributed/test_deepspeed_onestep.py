"""The one-step methods under DeepSpeed ZeRO-2 and ZeRO-3 on 2 CPU processes (gloo): one engine per optimizer
group (the generator; the critic of the fake score, with f-distill's discriminator heads), each with
its own optimizer, equal to one process with the same global batch; checkpoints resume across world
sizes.

Why the comparisons are exact, and the one tolerance: see tests/distributed/test_sharded_training.py.
Each process's micro-batch has the shapes and data of one accumulated micro-batch of the one-process
run (noise, times and samples are drawn from the sample index and the step), each engine halves its
process's gradient and adds the two halves in its reduce-scatter (halving is exact, a two-term sum has
no order), and the networks of the other group run with frozen parameters or under ``no_grad``, so no
engine sees a gradient outside its own group's backward. Weights, EMA and Adam state are therefore
equal bit for bit; only the logged gradient norm, summed partition by partition, is compared within
``(gamma_N + 2u) * norm``. f-distill runs as DMD2 (reverse KL, GAN term, R1), as in
tests/distributed/test_sharded_onestep.py: its critic engine holds the fake score and the heads.

ZeRO-3 partitions the weights too and gathers them around each forward and backward; its engines are
exact here as well, because each trained network runs once per micro-batch in its group's loss (the
generator draws the sample once, the fake score and the heads see the critic's inputs in one call each),
so each gradient element still has one contribution per micro-batch and two per step (ZeRO-3 LoRA
Flow-DPO, whose policy runs on winners and losers, is not: tests/distributed/test_deepspeed_zero3.py).
As there, ZeRO-3's ``memory_efficient_linear`` is off and EMA, which ZeRO-3 refuses, too.

Step order: Diff-Instruct* (no critic warm-up, generator every 2nd step) runs generator, critic,
generator, critic; f-distill (critic warm-up 1) critic, generator, critic. A checkpoint written before a
group's first step holds no optimizer state for it, as a one-process run's does.

DeepSpeed is an optional extra: without it the tests are skipped.
"""

from __future__ import annotations

import importlib.util
import sys
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))

from onestep_worker import run  # noqa: E402
from test_deepspeed_zero3 import zero3_launch_config  # noqa: E402
from test_sharded_training import FULL_FILES, ZERO2_CPU, assert_same_export, assert_same_step, launch  # noqa: E402

pytestmark = [
    pytest.mark.usefixtures("one_thread"),
    pytest.mark.slow,  # each 2-process launch starts DeepSpeed on both processes: far over 10 s
    pytest.mark.skipif(importlib.util.find_spec("deepspeed") is None, reason="deepspeed is not installed"),
]


def one_process(teacher: Path, out: Path, method: str, steps: int, **kw) -> None:
    """The reference: one process, the global batch of 4 as 2 accumulated micro-batches of 2."""
    run(str(teacher), out, 2, grad_accum_steps=2, max_steps=steps, method=method, **kw)


def deepspeed(
    teacher: Path, out: Path, method: str, steps: int, *opts: str, config: Path = ZERO2_CPU
) -> None:
    log = launch(config, teacher, out, method, steps, *opts)
    assert "TYPE=DistributedType.DEEPSPEED" in log and "SHARDED=0/" in log, log[-3000:]


@pytest.mark.parametrize("method", ["distar", "fdistill"])
def test_deepspeed_zero2_two_network_method_equals_one_process(toy_teacher_dir, tmp_path, method):
    """3 steps with both engines stepping: weights, EMA, each group's Adam state, metrics and the
    final export equal one process."""
    one, two = tmp_path / "one", tmp_path / "two"
    one_process(toy_teacher_dir, one, method, 3)
    deepspeed(toy_teacher_dir, two, method, 3)
    for step in (1, 2, 3):
        assert_same_step(one, two, step)
    assert_same_export(one, two, FULL_FILES)


@pytest.mark.parametrize("method", ["distar", "fdistill"])
def test_deepspeed_zero3_two_network_method_equals_one_process(toy_teacher_dir, tmp_path, method):
    """ZeRO-3, EMA off: 3 steps and the final export (each network's weights gathered) equal one
    process bit for bit."""
    one, two = tmp_path / "one", tmp_path / "two"
    one_process(toy_teacher_dir, one, method, 3, ema=False)
    deepspeed(toy_teacher_dir, two, method, 3, "ema=off", config=zero3_launch_config(tmp_path))
    for step in (1, 2, 3):
        assert_same_step(one, two, step, ema=False)
    wa, wb = (load_file(d / "final" / FULL_FILES[0]) for d in (one, two))
    assert wa.keys() == wb.keys() and all(torch.equal(wa[k], wb[k]) for k in wa)


def test_deepspeed_zero2_distar_resumes_across_world_sizes(toy_teacher_dir, tmp_path):
    """Diff-Instruct*: the 2-process ZeRO-2 checkpoint of step 2 (each group stepped once) resumes in
    one process, and the one-process checkpoint of step 2 resumes under ZeRO-2 on 2 processes; both
    end on the reference's steps 3 and 4 (each engine steps again from its restored Adam state)."""
    ref, two = tmp_path / "ref", tmp_path / "two"
    one_process(toy_teacher_dir, ref, "distar", 4)
    deepspeed(toy_teacher_dir, two, "distar", 2)
    assert_same_step(ref, two, 2)  # the reference keeps its last 3 checkpoints (2, 3, 4)

    two_to_one = tmp_path / "two-to-one"
    one_process(toy_teacher_dir, two_to_one, "distar", 4, resume=str(two / "checkpoint-00000002"))
    one_to_two = tmp_path / "one-to-two"
    deepspeed(toy_teacher_dir, one_to_two, "distar", 4, f"resume={ref / 'checkpoint-00000002'}")
    for resumed in (two_to_one, one_to_two):
        for step in (3, 4):
            assert_same_step(ref, resumed, step)
        assert_same_export(ref, resumed, FULL_FILES)
