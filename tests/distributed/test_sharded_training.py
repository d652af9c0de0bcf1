"""FSDP2 and DeepSpeed ZeRO-2 Flow-DPO on 2 CPU processes (gloo) equal one process with the same global batch.

Why the comparisons can be exact: the one-process reference takes the global batch of 4 pairs as two
accumulated micro-batches of 2, so each of its forwards and backwards has a rank's shapes and data.
Accumulation backpropagates ``L_k / 2`` and sums: ``g_1/2 + g_2/2``. FSDP2 (gloo) and DeepSpeed
pre-divide each rank's gradient by the world size 2 and sum the two halves in the reduce-scatter or
all-reduce. Halving is exact in binary floating point (no subnormals here) and a sum of two terms does
not depend on its order, so both give the same bits; Adam, the schedule and EMA then see identical
gradients. All-gathers and shard copies move values without arithmetic.

What is not exact:

- the logged gradient norm: the sharded norm adds the squares shard by shard, then across processes,
  in another order than the whole-tensor norm. For a sum of ``N`` non-negative fp32 terms any order
  lies within ``gamma_N = N u / (1 - N u)`` (``u = 2^-24``) of the exact value, so the two norms differ
  by at most ``(gamma_N + 2u)`` times the norm (the square root adds ``u`` to each);
- a full fine-tune with one FSDP unit per transformer block: the gradient of the timestep/text
  embedding is a sum over every block's contribution, and FSDP's per-block backward hooks change the
  order in which autograd adds them. The full fine-tune test therefore shards the transformer as one
  unit (``wrap=none``); the LoRA tests use the per-block units, since no LoRA gradient is such a sum.
  Clipping is off (``grad_clip=None``), because the clip factor would carry the norm's rounding.

Every 2-process run is judged by printed markers, not the exit code (gloo can abort at interpreter exit).
"""

from __future__ import annotations

import importlib.util
import json
import os
import shutil
import socket
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from flowalign.training.checkpoint import load_checkpoint
from flowalign.training.dcp_checkpoint import read_full

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))

from sharded_worker import run  # noqa: E402

pytestmark = pytest.mark.usefixtures("one_thread")

U = 2.0**-24  # fp32 unit roundoff
FSDP2_CPU = HERE / "fsdp2_cpu.yaml"
ZERO2_CPU = HERE / "deepspeed_zero2_cpu.yaml"


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def launch(config: Path, model_dir: Path, out: Path, mode: str, steps: int, *opts: str) -> str:
    """Run sharded_worker.py (onestep_worker.py for modes "distar" and "fdistill") on 2 processes with
    the accelerate ``config``; returns the log."""
    if mode in ("distar", "fdistill"):
        worker = [str(HERE / "onestep_worker.py"), str(model_dir), str(out), str(steps), f"method={mode}"]
    else:
        worker = [str(HERE / "sharded_worker.py"), str(model_dir), str(out), mode, "2", str(steps)]
    cmd = [
        sys.executable, "-m", "accelerate.commands.launch", "--config_file", str(config),
        "--num_processes", "2", "--main_process_port", str(_free_port()), *worker, *opts,
    ]  # fmt: skip
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "OMP_NUM_THREADS": "1", "CUDA_VISIBLE_DEVICES": ""}
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=600, env=env)
    log = proc.stdout + proc.stderr
    assert f"DIST-DONE STEP={steps}" in log, log[-4000:]
    assert "WORLD=2 RANK=0" in log and "WORLD=2 RANK=1" in log, log[-4000:]
    return log


def one_process(model_dir: Path, out: Path, mode: str, steps: int, **kw) -> None:
    """The reference: one process, the same global batch of 4 as 2 accumulated micro-batches of 2."""
    run(str(model_dir), out, mode, 2, grad_accum_steps=2, max_steps=steps, checkpoint_every=1, **kw)


def metrics(out: Path) -> dict[int, dict]:
    return {r["step"]: r for r in map(json.loads, (out / "metrics.jsonl").read_text().splitlines())}


def trainable_count(ckpt) -> int:
    """Gradient elements plus tensors: the number of squares a gradient norm of all of them adds."""
    weights = [w for module in ckpt.weights.values() for w in module.values()]
    return sum(t.numel() for t in weights) + len(weights)


def assert_same_step(
    a: Path, b: Path, step: int, *, layouts: tuple[str, str] | None = None, ema: bool = True
) -> None:
    """Metrics of ``step`` equal (the gradient norm within its rounding bound); weights, EMA and
    optimizer state of the two checkpoints equal, whatever their layouts (full, or DCP shards read
    whole); ``layouts`` checks which layout each run wrote."""
    ra, rb = metrics(a)[step], metrics(b)[step]
    path_a, path_b = a / f"checkpoint-{step:08d}", b / f"checkpoint-{step:08d}"
    if layouts is not None:
        assert (load_checkpoint(path_a).layout, load_checkpoint(path_b).layout) == layouts
    ckpt_a, ckpt_b = read_full(path_a), read_full(path_b)
    assert ra.keys() == rb.keys()
    for key in ra:
        if key.endswith("grad_norm"):
            n = trainable_count(ckpt_a)
            gamma = n * U / (1 - n * U)
            assert abs(rb[key] - ra[key]) <= (gamma + 2 * U) * ra[key], (step, ra[key], rb[key])
        else:
            assert rb[key] == ra[key], (step, key, ra[key], rb[key])
    assert (ckpt_a.ema is not None, ckpt_b.ema is not None) == (ema, ema)
    pairs = [(("ema",), ckpt_a.ema, ckpt_b.ema)] if ema else []
    assert ckpt_a.weights.keys() == ckpt_b.weights.keys()
    pairs += [(("model", m), ckpt_a.weights[m], ckpt_b.weights[m]) for m in ckpt_a.weights]
    for where, wa, wb in pairs:
        assert wa.keys() == wb.keys(), where
        for key in wa:
            assert torch.equal(wa[key], wb[key]), (where, key)
    assert ckpt_a.optimizers.keys() == ckpt_b.optimizers.keys()
    for group, oa in ckpt_a.optimizers.items():
        ob = ckpt_b.optimizers[group]
        assert oa["param_groups"] == ob["param_groups"]
        assert oa["state"].keys() == ob["state"].keys()
        for idx, entry in oa["state"].items():
            for key, value in entry.items():
                assert torch.equal(value, ob["state"][idx][key]), (group, idx, key)


def assert_same_export(a: Path, b: Path, files: list[str]) -> None:
    for sub in ("final", "final-ema"):
        for rel in files:
            wa, wb = load_file(a / sub / rel), load_file(b / sub / rel)
            assert wa.keys() == wb.keys(), (sub, rel)
            for key in wa:
                assert torch.equal(wa[key], wb[key]), (sub, rel, key)


LORA_FILES = ["lora/pytorch_lora_weights.safetensors", "transformer/diffusion_pytorch_model.safetensors"]
FULL_FILES = ["transformer/diffusion_pytorch_model.safetensors"]  # also the one-step generator's export


@pytest.fixture(scope="module")
def lora_reference(toy_dist_dir, tmp_path_factory) -> Path:
    """One process, LoRA Flow-DPO, 3 steps with a checkpoint after each."""
    out = tmp_path_factory.mktemp("lora-one") / "run"
    one_process(toy_dist_dir, out, "lora", 3)
    return out


def test_fsdp2_lora_dpo_step_equals_one_process(toy_dist_dir, lora_reference, tmp_path):
    """One FSDP2 step (per-block units, LoRA): weights, EMA, Adam state and exports are the reference's."""
    log = launch(FSDP2_CPU, toy_dist_dir, tmp_path / "two", "lora", 1)
    assert "TYPE=DistributedType.FSDP" in log and "SHARDED=16/16" in log, log[-3000:]
    assert_same_step(lora_reference, tmp_path / "two", 1)
    wa = load_file(lora_reference / "checkpoint-00000001" / "model-transformer.safetensors")
    wb = load_file(tmp_path / "two" / "final" / "lora" / "pytorch_lora_weights.safetensors")
    assert len(wb) == len(wa)  # the export gathered every adapter tensor


def staged_events(log: str, rank: int) -> list:
    line = next(x for x in log.splitlines() if x.startswith(f"RANK{rank}-EVENTS="))
    return json.loads(line.split("=", 1)[1])


def test_fsdp2_staged_load_shards_on_cpu_then_equals_one_process(toy_dist_dir, lora_reference, tmp_path):
    """The staged FSDP2 load: the text encoder goes to the device, the transformer stays on the CPU, whole,
    and is never moved there as a whole: ``fully_shard`` first sees its blocks as plain (unsharded)
    CPU tensors, and afterwards each rank keeps a dim-0 shard (the two ranks' local sizes add up to
    the total, each within ceil(rows / 2) of every parameter). The step equals the reference's."""
    log = launch(FSDP2_CPU, toy_dist_dir, tmp_path / "two", "lora", 1, "staged=on")
    assert "SHARDED=16/16" in log, log[-3000:]
    locals_, total = [], None
    for rank in (0, 1):
        events = staged_events(log, rank)
        shards = [i for i, e in enumerate(events) if e[0] == "fully_shard"]
        assert shards, events
        before = events[: shards[0]]
        assert ["cpu-for-sharding", "transformer"] in before, events
        assert ["device", "text_encoder"] in before, events  # the toy model has no VAE
        assert not any(e[:2] == ["device", "transformer"] for e in events), events
        assert events[shards[0]] == ["fully_shard", "JointTransformerBlock", True], events
        line = next(x for x in log.splitlines() if x.startswith(f"RANK{rank}-LOCAL="))
        sizes = dict(kv.split("=") for kv in line.replace(f"RANK{rank}-", "").split())
        local, total, bound = int(sizes["LOCAL"]), int(sizes["TOTAL"]), int(sizes["BOUND"])
        assert local <= bound < total, sizes
        locals_.append(local)
    assert sum(locals_) == total, (locals_, total)
    assert_same_step(lora_reference, tmp_path / "two", 1)


@pytest.mark.slow
def test_fsdp2_lora_dpo_three_steps_and_resume_across_world_sizes(toy_dist_dir, lora_reference, tmp_path):
    """3 FSDP2 steps equal the reference; its step-2 checkpoint resumes in 1 process, and the
    reference's step-2 checkpoint resumes in 2 FSDP2 processes, both ending on the reference's step 3."""
    two = tmp_path / "two"
    launch(FSDP2_CPU, toy_dist_dir, two, "lora", 3)
    for step in (1, 2, 3):
        assert_same_step(lora_reference, two, step)
    assert_same_export(lora_reference, two, LORA_FILES)

    two_to_one = tmp_path / "two-to-one"
    one_process(toy_dist_dir, two_to_one, "lora", 3, resume=str(two / "checkpoint-00000002"))
    assert_same_step(lora_reference, two_to_one, 3)
    assert_same_export(lora_reference, two_to_one, LORA_FILES)

    one_to_two = tmp_path / "one-to-two"
    launch(FSDP2_CPU, toy_dist_dir, one_to_two, "lora", 3, f"resume={lora_reference / 'checkpoint-00000002'}")
    assert_same_step(lora_reference, one_to_two, 3)
    assert_same_export(lora_reference, one_to_two, LORA_FILES)


@pytest.mark.slow
@pytest.mark.parametrize("staged", ["off", "on"])
def test_fsdp2_full_finetune_dpo_equals_one_process(toy_dist_dir, tmp_path, staged):
    """Full fine-tune: the policy and the frozen reference copy are both sharded; 3 steps equal one
    process (the transformer as one FSDP unit, see the module docstring). Staged, both networks are
    sharded while they are plain CPU tensors and never reach the device whole."""
    one = tmp_path / "one"
    one_process(toy_dist_dir, one, "full", 3)
    two = tmp_path / "two"
    log = launch(FSDP2_CPU, toy_dist_dir, two, "full", 3, "wrap=none", f"staged={staged}")
    assert "REF-SHARDED=True" in log and "SHARDED=0/" not in log, log[-3000:]
    if staged == "on":
        for rank in (0, 1):
            events = staged_events(log, rank)
            kept = {e[1] for e in events if e[0] == "cpu-for-sharding"}
            assert kept == {"transformer", "reference"}, events
            assert not any(e[0] == "device" and e[1] in kept for e in events), events
            shards = [e for e in events if e[0] == "fully_shard"]
            # the policy's first unit (its final norm, then the rest as one unit), and the reference
            assert shards[0][2] and shards[-1] == ["fully_shard", "SD3Transformer2DModel", True], events
    for step in (1, 2, 3):
        assert_same_step(one, two, step)
    assert_same_export(one, two, FULL_FILES)


@pytest.mark.slow
@pytest.mark.skipif(importlib.util.find_spec("deepspeed") is None, reason="deepspeed is not installed")
def test_deepspeed_zero2_lora_dpo_equals_one_process_and_resumes(toy_dist_dir, lora_reference, tmp_path):
    """2 ZeRO-2 steps equal the reference (the engine clips, steps and keeps the fp32 Adam state);
    the reference's step-2 checkpoint resumes under ZeRO-2 and ends on the reference's step 3."""
    two = tmp_path / "two"
    log = launch(ZERO2_CPU, toy_dist_dir, two, "lora", 2)
    assert "TYPE=DistributedType.DEEPSPEED" in log, log[-3000:]
    for step in (1, 2):
        assert_same_step(lora_reference, two, step)
    resumed = tmp_path / "resumed"
    launch(ZERO2_CPU, toy_dist_dir, resumed, "lora", 3, f"resume={lora_reference / 'checkpoint-00000002'}")
    assert_same_step(lora_reference, resumed, 3)
    assert_same_export(lora_reference, resumed, LORA_FILES)
    shutil.rmtree(two)


@pytest.mark.slow
def test_fsdp2_two_network_method_equals_one_process_and_resumes(toy_teacher_dir, tmp_path):
    """Diff-Instruct*: a generator and a fake score, each sharded with the optimizer of its own group,
    updated in turn (critic, generator, critic); 3 steps equal one process, and the one-process step-2
    checkpoint resumes in 2 processes onto the same step 3 (each network as one FSDP unit, both full
    fine-tunes: see the module docstring)."""
    from onestep_worker import run as run_distar

    one = tmp_path / "one"
    run_distar(str(toy_teacher_dir), one, 2, grad_accum_steps=2, max_steps=3)
    two = tmp_path / "two"
    log = launch(FSDP2_CPU, toy_teacher_dir, two, "distar", 3, "wrap=none")
    assert "SHARDED=132/132" in log, log[-3000:]
    for step in (1, 2, 3):
        assert_same_step(one, two, step)
    assert_same_export(one, two, FULL_FILES)
    resumed = tmp_path / "resumed"
    launch(
        FSDP2_CPU, toy_teacher_dir, resumed, "distar", 3, "wrap=none", f"resume={one / 'checkpoint-00000002'}"
    )
    assert_same_step(one, resumed, 3)
    assert_same_export(one, resumed, FULL_FILES)
