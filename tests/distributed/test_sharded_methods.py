"""SFT, RWR, GRPO, latent reward, reward model and CDT under FSDP2 on 2 CPU processes (gloo): 2 steps
equal one process with the same global batch.

Why the comparisons are exact, and the one tolerance: see tests/distributed/test_sharded_training.py.
Each process's micro-batch has the shapes and data of one accumulated micro-batch of the one-process
run (every method draws its noise, times and caption drops from the sample index and the step), the
reduce-scatter adds two halved gradients (halving is exact, a two-term sum has no order), so weights,
EMA and Adam state are equal bit for bit; only the logged gradient norm, summed shard by shard, is
compared within ``(gamma_N + 2u) * norm``. The reward trainers' score normalisers (method state) fold
every process's statistics in rank order, the order of the one-process micro-batches: equal too. Full fine-tunes (SFT, reward model, CDT) shard each network as
one FSDP unit (``wrap=none``): their shared embeddings' gradients are sums over blocks whose order
per-block units would change. LoRA methods (RWR, GRPO, latent reward) use the per-block units.
"""

from __future__ import annotations

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
from test_sharded_training import FSDP2_CPU, _free_port, assert_same_step  # noqa: E402

pytestmark = pytest.mark.usefixtures("one_thread")

STEPS = 2


def launch(model_dir: Path, out: Path, method: str, *opts: str) -> str:
    """methods_worker.py on 2 FSDP2 processes for ``STEPS`` steps; returns the log."""
    worker = [str(HERE / "methods_worker.py"), str(model_dir), str(out), str(STEPS), f"method={method}"]
    cmd = [
        sys.executable, "-m", "accelerate.commands.launch", "--config_file", str(FSDP2_CPU),
        "--num_processes", "2", "--main_process_port", str(_free_port()), *worker, *opts,
    ]  # fmt: skip
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "OMP_NUM_THREADS": "1", "CUDA_VISIBLE_DEVICES": ""}
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=600, env=env)
    log = proc.stdout + proc.stderr
    assert f"DIST-DONE STEP={STEPS}" in log, log[-4000:]
    assert "WORLD=2 RANK=0" in log and "WORLD=2 RANK=1" in log, log[-4000:]
    assert "TYPE=DistributedType.FSDP" in log and " SHARDED=0/" not in log, log[-4000:]
    return log


def check(model_dir: Path, tmp_path: Path, method: str, *opts: str) -> None:
    one = tmp_path / "one"
    run(str(model_dir), one, 2, grad_accum_steps=2, max_steps=STEPS, method=method)
    two = tmp_path / "two"
    launch(model_dir, two, method, *opts)
    for step in range(1, STEPS + 1):
        assert_same_step(one, two, step)
        sa, sb = (torch.load(d / f"checkpoint-{step:08d}" / "method_state.pt") for d in (one, two))
        assert sa.keys() == sb.keys()  # the reward trainers' score normalisers, folded over all ranks
        for key in sa:
            assert torch.equal(torch.as_tensor(sa[key]), torch.as_tensor(sb[key])), (step, key)
    first, last = (read_full(two / f"checkpoint-{s:08d}").weights for s in (1, STEPS))
    assert any(not torch.equal(first[m][k], last[m][k]) for m in first for k in first[m])  # it trained


def test_fsdp2_reward_model_equals_one_process(tmp_path):
    """The multi-head reward model (full fine-tune, one unit; CLIP's frozen 0-d logit_scale is left out of
    the sharding): 2 steps equal one process, normaliser included."""
    check(tmp_path, tmp_path, "reward", "wrap=none")  # builds its network from a seed: no model folder


@pytest.mark.slow
@pytest.mark.parametrize(
    ("method", "opts"),
    [("sft", ("wrap=none",)), ("rwr", ()), ("grpo", ()), ("latent", ()), ("cdt", ("wrap=none",))],
)
def test_fsdp2_method_equals_one_process(toy_dist_dir, toy_teacher_dir, tmp_path, method, opts):
    """Each method: 2 FSDP2 steps equal one process with the same global batch."""
    model_dir = toy_teacher_dir if method == "latent" else toy_dist_dir
    check(model_dir, tmp_path, method, *opts)


def test_fsdp2_preparation_leaves_frozen_scalars_out_and_refuses_trainable_ones():
    """A frozen 0-d parameter reaches accelerate as an ignored parameter while the module is prepared
    (the plugin is restored after); a trainable one is refused with its name."""
    from types import SimpleNamespace

    from torch import nn

    from flowalign.training.distributed import FSDP2, _wrap_classes_in

    net = nn.Linear(2, 2)
    net.scale = nn.Parameter(torch.tensor(1.0), requires_grad=False)
    plugin = SimpleNamespace(transformer_cls_names_to_wrap=["Linear", "Absent"], ignored_modules=None)
    acc = SimpleNamespace(state=SimpleNamespace(fsdp_plugin=plugin))
    with _wrap_classes_in(acc, net, FSDP2):
        assert plugin.transformer_cls_names_to_wrap == ["Linear"]
        assert [p for m in plugin.ignored_modules for p in m.parameters()] == [net.scale]
    assert plugin.ignored_modules is None and plugin.transformer_cls_names_to_wrap == ["Linear", "Absent"]
    net.scale.requires_grad_(True)
    with pytest.raises(ValueError, match=r"trainable 0-d parameters \['scale'\]"):
        with _wrap_classes_in(acc, net, FSDP2):
            pass
