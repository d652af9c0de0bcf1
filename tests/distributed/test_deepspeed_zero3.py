"""DeepSpeed ZeRO-3 LoRA Flow-DPO on 2 CPU processes (gloo), against one process with the same global batch.

DeepSpeed is an optional extra: without it the test is skipped. The DeepSpeed config
(deepspeed_zero3_cpu.json) turns off ZeRO-3's ``memory_efficient_linear``, which swaps in its own linear
autograd function whose weight gradient is summed in another order than torch's; the final export
gathers each partitioned weight itself.

What is compared, and why:

- step 1, bit for bit (weights, Adam state, metrics; the gradient norm within the summation bound of
  tests/distributed/test_sharded_training.py): before the first step every LoRA B is zero, so each
  trained gradient element has one contribution per micro-batch, two in all, and a sum of two terms
  does not depend on the order (halving each is exact);
- step 2, the loss and every metric computed in the forward (they depend only on the step-1 weights),
  exactly. The step-2 gradients are not compared: once B and A are both non-zero a LoRA weight's
  gradient adds more than two contributions per step (the winner and loser halves, each micro-batch),
  and ZeRO-3 reduces them in another association than one process that accumulates, so the results
  differ by rounding (relative 1e-6 here) with a bound in terms of the unobserved summands only.
"""

from __future__ import annotations

import importlib.util
import json
import sys
from pathlib import Path

import pytest

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))

from sharded_worker import run  # noqa: E402
from test_sharded_training import assert_same_step, launch, metrics  # noqa: E402

pytestmark = [
    pytest.mark.usefixtures("one_thread"),
    pytest.mark.slow,
    pytest.mark.skipif(importlib.util.find_spec("deepspeed") is None, reason="deepspeed is not installed"),
]


def zero3_launch_config(tmp_path: Path) -> Path:
    """The accelerate config for 2 CPU processes with the DeepSpeed config file (by absolute path)."""
    path = tmp_path / "zero3.yaml"
    lines = [
        "compute_environment: LOCAL_MACHINE",
        "distributed_type: DEEPSPEED",
        "deepspeed_config:",
        f"  deepspeed_config_file: {json.dumps(str(HERE / 'deepspeed_zero3_cpu.json'))}",
        "  zero3_init_flag: false",
        "machine_rank: 0",
        "num_machines: 1",
        "num_processes: 2",
        "rdzv_backend: static",
        "same_network: true",
        "use_cpu: false",
    ]
    path.write_text("\n".join(lines) + "\n")
    return path


def test_deepspeed_zero3_lora_dpo_step_equals_one_process(toy_dist_dir, tmp_path):
    one = tmp_path / "one"
    run(str(toy_dist_dir), one, "lora", 2, grad_accum_steps=2, max_steps=2, checkpoint_every=1, ema=False)
    two = tmp_path / "two"
    log = launch(zero3_launch_config(tmp_path), toy_dist_dir, two, "lora", 2, "ema=off")
    assert "TYPE=DistributedType.DEEPSPEED" in log, log[-3000:]
    assert_same_step(one, two, 1, layouts=("full", "full"), ema=False)
    step2_one, step2_two = metrics(one)[2], metrics(two)[2]
    assert step2_one.keys() == step2_two.keys()
    assert {k: v for k, v in step2_one.items() if k != "grad_norm"} == {
        k: v for k, v in step2_two.items() if k != "grad_norm"
    }
    assert (two / "final" / "lora" / "pytorch_lora_weights.safetensors").is_file()  # gathered export
