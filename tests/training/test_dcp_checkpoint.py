"""Sharded (torch.distributed.checkpoint) checkpoints in one process: same training as the full layout,
atomic, verified, and readable as whole tensors. The 2-process FSDP2 cases are in
tests/distributed/test_sharded_onestep.py."""

from __future__ import annotations

import os

import pytest
import torch
from safetensors.torch import load_file
from training_toy import TwoNetMethod, VectorDataset, toy_config

import flowalign.training.dcp_checkpoint as dcp_mod
from flowalign.config import CheckpointConfig, ConfigError, EMAConfig
from flowalign.training.checkpoint import CheckpointError, find_latest_checkpoint, load_checkpoint
from flowalign.training.dcp_checkpoint import SHARDED, read_full, resolve_layout
from flowalign.training.loop import METRICS_FILE, train


def _run(out, layout: str, *, max_steps: int = 4, resume=False):
    cfg = toy_config(out, max_steps=max_steps, grad_accum_steps=2, ema=EMAConfig(use=True, decay=0.5))
    cfg.checkpoint = CheckpointConfig(every=1, keep_last=None, layout=layout)
    return train(TwoNetMethod(), VectorDataset(), cfg, progress=False, resume=resume)


def _same(a, b) -> None:
    """Two checkpoints hold the same weights, EMA and optimizer state, bit for bit."""
    a, b = read_full(a), read_full(b)
    assert a.weights.keys() == b.weights.keys() and a.ema.keys() == b.ema.keys()
    for module in a.weights:
        assert all(torch.equal(v, b.weights[module][k]) for k, v in a.weights[module].items())
    assert all(torch.equal(v, b.ema[k]) for k, v in a.ema.items())
    for group, oa in a.optimizers.items():
        ob = b.optimizers[group]
        assert oa["param_groups"] == ob["param_groups"] and oa["state"].keys() == ob["state"].keys()
        for idx, entry in oa["state"].items():
            assert entry.keys() == ob["state"][idx].keys()
            assert all(torch.equal(v, ob["state"][idx][k]) for k, v in entry.items())


@pytest.fixture(scope="module")
def full_run(tmp_path_factory):
    out = tmp_path_factory.mktemp("full") / "run"
    _run(out, "full")
    return out


def test_sharded_layout_trains_and_resumes_like_the_full_one(full_run, tmp_path):
    """One process writes shards/ (DCP) instead of the safetensors: the same state at every step,
    and resuming from a sharded checkpoint ends on the same final weights and metrics."""
    out = tmp_path / "run"
    _run(out, "sharded", max_steps=3)
    ckpt = load_checkpoint(out / "checkpoint-00000003")
    assert ckpt.layout == "sharded" and not ckpt.weights and ckpt.ema is None
    assert {"shards/.metadata", "shards/__0_0.distcp", "optimizer.pt"} <= ckpt.files.keys()
    assert not any(name.endswith(".safetensors") for name in ckpt.files)
    states = [e for sk in ckpt.optimizers.values() for e in sk["state"].values()]
    assert states and all(e["exp_avg"] == SHARDED and isinstance(e["step"], torch.Tensor) for e in states)
    for step in (1, 2, 3):
        _same(full_run / f"checkpoint-{step:08d}", out / f"checkpoint-{step:08d}")
    _run(out, "sharded", max_steps=4, resume=True)
    _same(full_run / "checkpoint-00000004", out / "checkpoint-00000004")
    for name in ("gen.safetensors", "critic.safetensors"):
        wa, wb = load_file(full_run / "final" / name), load_file(out / "final" / name)
        assert all(torch.equal(v, wb[k]) for k, v in wa.items())
    assert (out / METRICS_FILE).read_text() == (full_run / METRICS_FILE).read_text()


def test_a_damaged_shard_is_named_and_an_interrupted_write_leaves_no_checkpoint(tmp_path, monkeypatch):
    out = tmp_path / "run"
    _run(out, "sharded", max_steps=1)
    shard = out / "checkpoint-00000001" / "shards" / "__0_0.distcp"
    data = bytearray(shard.read_bytes())
    data[len(data) // 2] ^= 0xFF
    shard.write_bytes(bytes(data))
    with pytest.raises(CheckpointError, match="__0_0.distcp"):
        load_checkpoint(out / "checkpoint-00000001")

    class Killed(BaseException):
        pass

    def dying(*args, **kwargs):
        raise Killed

    other = tmp_path / "other"
    _run(other, "sharded", max_steps=1)
    monkeypatch.setattr(dcp_mod, "_skeleton", dying)  # dies after the shards, before the manifest
    with pytest.raises(Killed):
        _run(other, "sharded", max_steps=2, resume=True)
    monkeypatch.undo()
    assert (other / f"checkpoint-00000002.tmp-{os.getpid()}" / "shards" / ".metadata").exists()
    assert find_latest_checkpoint(other).name == "checkpoint-00000001"


def test_shards_that_do_not_match_the_run_are_refused(tmp_path):
    out = tmp_path / "run"
    _run(out, "sharded", max_steps=1)
    ckpt = load_checkpoint(out / "checkpoint-00000001")
    with pytest.raises(CheckpointError, match="shards: does not match the run"):
        dcp_mod._read(ckpt.path, {"model/gen/0.weight": torch.empty(16, 7)}, distributed=False)


def test_layout_setting():
    assert resolve_layout("auto", "fsdp2") == "sharded" and resolve_layout("auto", "ddp") == "full"
    assert resolve_layout("sharded", "ddp") == "sharded"
    with pytest.raises(ValueError, match="DeepSpeed"):
        resolve_layout("sharded", "deepspeed")
    with pytest.raises(ConfigError, match="must be auto, full or sharded") as err:
        CheckpointConfig(layout="dcp")
    assert err.value.key == "layout"


def test_the_main_process_alone_verifies_the_files_of_a_multi_process_resume(tmp_path):
    """With several processes the main one hashes every file and shares its verdict; the others read
    without hashing (in one process, broadcast hands each side its own verdict back)."""
    from types import SimpleNamespace

    from flowalign.training.dcp_checkpoint import load_verified

    out = tmp_path / "run"
    _run(out, "sharded", max_steps=1)
    path = out / "checkpoint-00000001"
    assert load_verified(SimpleNamespace(num_processes=2, is_main_process=True), path).layout == "sharded"
    shard = path / "shards" / "__0_0.distcp"
    shard.write_bytes(shard.read_bytes()[:-1])
    with pytest.raises(CheckpointError, match="__0_0.distcp.*truncated"):
        load_verified(SimpleNamespace(num_processes=2, is_main_process=True), path)
    assert load_verified(SimpleNamespace(num_processes=2, is_main_process=False), path).step == 1
