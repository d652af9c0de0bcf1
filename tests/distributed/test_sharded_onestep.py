"""f-distill under FSDP2 on 2 CPU processes (gloo): its critic group spans two sharded modules (the fake
score and the discriminator heads) with one optimizer; the run equals one process with the same global
batch, and its sharded (DCP) checkpoints resume under another world size.

Why the comparisons are exact, and the one tolerance: see tests/distributed/test_sharded_training.py.
In short, each process's micro-batch has the shapes and data of one accumulated micro-batch of the
one-process run, the reduce-scatter adds two halved gradients (halving is exact, a two-term sum has no
order), and DCP stores and reads the bytes of each shard; only the logged gradient norm, summed shard by
shard, is compared within ``(gamma_N + 2u) * norm``. The networks are single FSDP units (``wrap=none``),
as in the Diff-Instruct* test there. f-distill runs as DMD2 (reverse KL, GAN term, R1): a density-ratio
normalisation over the global batch (the other divergences) is by design not the per-micro-batch one of
a single accumulating process.

Step order (critic warm-up 1, generator every 2nd step): step 1 critic, step 2 generator, step 3 critic,
so a resume from checkpoint 1 runs both groups with restored Adam state.
"""

from __future__ import annotations

import sys
from pathlib import Path

import pytest

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))

from onestep_worker import run  # noqa: E402
from test_sharded_training import FSDP2_CPU, FULL_FILES, assert_same_export, assert_same_step, launch  # noqa: E402

pytestmark = pytest.mark.usefixtures("one_thread")


def one_process(teacher: Path, out: Path, steps: int, **kw) -> None:
    """The reference: one process, the global batch of 4 as 2 accumulated micro-batches of 2."""
    run(str(teacher), out, 2, grad_accum_steps=2, max_steps=steps, method="fdistill", **kw)


@pytest.fixture(scope="module")
def fdistill_reference(toy_teacher_dir, tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("fdistill-one") / "run"
    one_process(toy_teacher_dir, out, 3)
    return out


def test_fsdp2_fdistill_critic_step_equals_one_process(toy_teacher_dir, fdistill_reference, tmp_path):
    """The critic step (fake score + discriminator, one optimizer over both sharded modules) equals the
    one-process step; the FSDP2 run writes a sharded checkpoint with a shard file per process."""
    two = tmp_path / "two"
    log = launch(FSDP2_CPU, toy_teacher_dir, two, "fdistill", 1, "wrap=none")
    assert "TYPE=DistributedType.FSDP" in log and "SHARDED=138/138" in log, log[-3000:]
    assert_same_step(fdistill_reference, two, 1, layouts=("full", "sharded"))
    shards = sorted(p.name for p in (two / "checkpoint-00000001" / "shards").iterdir())
    assert shards == [".metadata", "__0_0.distcp", "__1_0.distcp"]


@pytest.mark.slow
def test_fsdp2_fdistill_two_steps_and_sharded_resume_across_world_sizes(
    toy_teacher_dir, fdistill_reference, tmp_path
):
    """2 FSDP2 steps equal the reference; the 2-process sharded checkpoint 1 resumes in 2 processes
    and in 1 process, and a 1-process sharded checkpoint 1 resumes in 2 FSDP2 processes, all ending on
    the reference's step 3 and its export."""
    two = tmp_path / "two"
    launch(FSDP2_CPU, toy_teacher_dir, two, "fdistill", 2, "wrap=none")
    for step in (1, 2):
        assert_same_step(fdistill_reference, two, step, layouts=("full", "sharded"))

    two_to_two = tmp_path / "two-to-two"
    launch(
        FSDP2_CPU,
        toy_teacher_dir,
        two_to_two,
        "fdistill",
        3,
        "wrap=none",
        f"resume={two / 'checkpoint-00000001'}",
    )
    assert_same_step(fdistill_reference, two_to_two, 3, layouts=("full", "sharded"))
    assert_same_export(fdistill_reference, two_to_two, FULL_FILES)

    two_to_one = tmp_path / "two-to-one"
    one_process(toy_teacher_dir, two_to_one, 3, resume=str(two / "checkpoint-00000001"))
    assert_same_step(fdistill_reference, two_to_one, 3, layouts=("full", "full"))
    assert_same_export(fdistill_reference, two_to_one, FULL_FILES)

    one_sharded = tmp_path / "one-sharded"
    one_process(toy_teacher_dir, one_sharded, 1, layout="sharded")
    one_to_two = tmp_path / "one-to-two"
    resume = f"resume={one_sharded / 'checkpoint-00000001'}"
    launch(FSDP2_CPU, toy_teacher_dir, one_to_two, "fdistill", 3, "wrap=none", resume)
    assert_same_step(fdistill_reference, one_to_two, 3, layouts=("full", "sharded"))
    assert_same_export(fdistill_reference, one_to_two, FULL_FILES)
