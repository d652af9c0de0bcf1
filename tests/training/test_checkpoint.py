"""Checkpoints: atomic writes, manifest verification, rotation, crash safety, RNG state."""

from __future__ import annotations

import os
import random
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
import torch
from safetensors.torch import load_file
from training_toy import ToyFlowMatching, VectorDataset, make_net, toy_config

import flowalign.training.checkpoint as ckpt_mod
from flowalign.training.checkpoint import (
    CheckpointError,
    capture_rng_state,
    find_latest_checkpoint,
    list_checkpoints,
    load_checkpoint,
    load_trainable_state_dict,
    restore_rng_state,
    save_checkpoint,
    verify_checkpoint,
)
from flowalign.training.loop import METRICS_FILE, train

HERE = Path(__file__).resolve().parent


def _save(out: Path, step: int, net=None, **kw) -> Path:
    net = net or make_net()
    return save_checkpoint(
        out,
        step,
        modules={"net": net},
        optimizers={"main": {"state": {}, "param_groups": []}},
        schedulers={"main": {"last_epoch": step}},
        state={"epoch": 0, "position": 0},
        rng_states=[capture_rng_state()],
        config={"seed": 1},
        **kw,
    )


def test_round_trip_and_manifest(tmp_path):
    net = make_net(seed=4)
    path = _save(
        tmp_path, 7, net, ema={"net.0.weight": torch.ones(2)}, method_state={"count": torch.tensor(3)}
    )
    assert path.name == "checkpoint-00000007" and find_latest_checkpoint(tmp_path) == path
    manifest = verify_checkpoint(path)
    on_disk = {p.name for p in path.iterdir()} - {"manifest.json"}
    assert set(manifest["files"]) == on_disk
    assert all(manifest["files"][n]["size"] == (path / n).stat().st_size for n in on_disk)
    ckpt = load_checkpoint(path)
    assert ckpt.step == 7 and ckpt.state["epoch"] == 0 and ckpt.config == {"seed": 1}
    assert ckpt.method_state["count"].item() == 3 and torch.equal(ckpt.ema["net.0.weight"], torch.ones(2))
    other = make_net(seed=5)
    load_trainable_state_dict(other, ckpt.weights["net"])
    assert all(torch.equal(a, b) for a, b in zip(net.parameters(), other.parameters(), strict=True))


def test_only_trainable_parameters_are_saved(tmp_path):
    net = make_net()
    net[0].requires_grad_(False)
    ckpt = load_checkpoint(_save(tmp_path, 1, net))
    assert sorted(ckpt.weights["net"]) == ["2.bias", "2.weight"]


@pytest.mark.parametrize("damage", ["flip", "truncate", "delete"])
def test_damaged_weight_file_raises_checkpoint_error_naming_it(tmp_path, damage):
    path = _save(tmp_path, 1)
    target = path / "model-net.safetensors"
    data = bytearray(target.read_bytes())
    if damage == "flip":
        data[len(data) // 2] ^= 0xFF
        target.write_bytes(bytes(data))
        match = r"model-net\.safetensors: sha256 .*corrupted"
    elif damage == "truncate":
        target.write_bytes(bytes(data[: len(data) // 2]))
        match = r"model-net\.safetensors: size .*truncated"
    else:
        target.unlink()
        match = r"model-net\.safetensors: listed in the manifest but missing"
    with pytest.raises(CheckpointError, match=match):
        load_checkpoint(path)


def test_unverified_load_still_names_unreadable_files(tmp_path):
    path = _save(tmp_path, 1)
    (path / "model-net.safetensors").write_bytes(b"\x00" * 7)
    with pytest.raises(CheckpointError, match=r"model-net\.safetensors: unreadable safetensors"):
        load_checkpoint(path, verify=False)
    path = _save(tmp_path, 2)
    (path / "optimizer.pt").write_bytes(b"not a zip")
    with pytest.raises(
        CheckpointError, match=r"optimizer\.pt: cannot be read with torch\.load\(weights_only=True\)"
    ):
        load_checkpoint(path, verify=False)


def test_shape_mismatch_names_the_parameter(tmp_path):
    ckpt = load_checkpoint(_save(tmp_path, 1, make_net(hidden=16)))
    with pytest.raises(CheckpointError, match=r"src\.safetensors: parameter '0\.weight' has shape \(16, 7\)"):
        load_trainable_state_dict(make_net(hidden=8), ckpt.weights["net"], source="src.safetensors")


def test_incomplete_and_temporary_folders_are_ignored_and_rotation_keeps_the_newest(tmp_path):
    for step in (1, 2, 3):
        _save(tmp_path, step)
    (tmp_path / "checkpoint-00000004.tmp-12345").mkdir()  # a writer that died
    (tmp_path / "checkpoint-00000003" / "manifest.json").unlink()  # never completed
    (tmp_path / "checkpoint-00000009").mkdir()
    (tmp_path / "checkpoint-00000009" / "manifest.json").write_text("{not json")
    assert [p.name for p in list_checkpoints(tmp_path)] == ["checkpoint-00000001", "checkpoint-00000002"]
    assert find_latest_checkpoint(tmp_path).name == "checkpoint-00000002"
    _save(tmp_path, 5, keep_last=2)
    assert [p.name for p in list_checkpoints(tmp_path)] == ["checkpoint-00000002", "checkpoint-00000005"]
    assert not (tmp_path / "checkpoint-00000001").exists()
    assert find_latest_checkpoint(tmp_path / "nothing-here") is None


def test_resume_from_a_corrupted_checkpoint_names_the_file(tmp_path):
    cfg = toy_config(tmp_path, max_steps=2)
    train(ToyFlowMatching(), VectorDataset(), cfg, progress=False)
    target = tmp_path / "checkpoint-00000002" / "model-net.safetensors"
    target.write_bytes(target.read_bytes()[:-10])
    cfg.max_steps = 4
    with pytest.raises(CheckpointError, match=r"checkpoint-00000002/model-net\.safetensors: size"):
        train(ToyFlowMatching(), VectorDataset(), cfg, resume=True, progress=False)


def test_rng_state_round_trip():
    state = capture_rng_state()
    expected = (torch.rand(3), random.random(), np.random.rand(2))
    restore_rng_state(state)
    assert torch.equal(torch.rand(3), expected[0])
    assert random.random() == expected[1] and np.array_equal(np.random.rand(2), expected[2])


def _straight_run(out: Path) -> dict[str, torch.Tensor]:
    cfg = toy_config(out, max_steps=6)
    cfg.checkpoint.every = 2
    cfg.checkpoint.keep_last = None
    train(ToyFlowMatching(), VectorDataset(), cfg, progress=False)
    return load_file(out / "final" / "net.safetensors")


def _resume_and_compare(out: Path, reference_dir: Path, reference: dict[str, torch.Tensor]) -> None:
    cfg = toy_config(out, max_steps=6)
    cfg.checkpoint.every = 2
    cfg.checkpoint.keep_last = None
    result = train(ToyFlowMatching(), VectorDataset(), cfg, resume=True, progress=False)
    assert result.step == 6
    assert not list(out.glob("*.tmp-*")), "stale temporary folder was not cleaned up"
    final = load_file(out / "final" / "net.safetensors")
    assert all(torch.equal(final[k], reference[k]) for k in reference)
    assert (out / METRICS_FILE).read_text() == (reference_dir / METRICS_FILE).read_text()


def test_crash_inside_a_checkpoint_write_keeps_the_previous_one(tmp_path, monkeypatch):
    """In-process stand-in for a kill: the write of checkpoint-4 dies and nothing cleans up after it."""
    reference = _straight_run(tmp_path / "ref")

    class Killed(BaseException):
        pass

    original = ckpt_mod._write_file

    def dying(path: Path, write) -> None:
        original(path, write)
        if path.parent.name.startswith("checkpoint-00000004.tmp-") and path.name.startswith("model-"):
            raise Killed

    monkeypatch.setattr(ckpt_mod, "_write_file", dying)
    monkeypatch.setattr(ckpt_mod.shutil, "rmtree", lambda *a, **k: None)  # a killed process cleans nothing
    cfg = toy_config(tmp_path / "run", max_steps=6)
    cfg.checkpoint.every = 2
    cfg.checkpoint.keep_last = None
    with pytest.raises(Killed):
        train(ToyFlowMatching(), VectorDataset(), cfg, progress=False)
    monkeypatch.undo()
    run = tmp_path / "run"
    assert (run / f"checkpoint-00000004.tmp-{os.getpid()}" / "model-net.safetensors").exists()
    assert find_latest_checkpoint(run).name == "checkpoint-00000002"
    _resume_and_compare(run, tmp_path / "ref", reference)


def test_sigkill_during_a_checkpoint_write_keeps_the_previous_one(tmp_path):
    """A real SIGKILL of a training process while it is inside the write of checkpoint-4."""
    reference = _straight_run(tmp_path / "ref")
    run = tmp_path / "run"
    run.mkdir()
    proc = subprocess.Popen(
        [sys.executable, str(HERE / "fault_worker.py"), str(run), "4"],
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        env={**os.environ, "HF_HUB_OFFLINE": "1", "OMP_NUM_THREADS": "1"},
    )
    try:
        deadline = time.monotonic() + 120
        while not (run / "WRITING").exists():
            assert proc.poll() is None, proc.stdout.read().decode()[-3000:]
            assert time.monotonic() < deadline, "worker never reached the checkpoint write"
            time.sleep(0.05)
        os.kill(proc.pid, signal.SIGKILL)
        proc.wait(timeout=30)
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
    assert proc.returncode == -signal.SIGKILL
    tmp_dirs = list(run.glob("checkpoint-00000004.tmp-*"))
    assert len(tmp_dirs) == 1 and not (tmp_dirs[0] / "manifest.json").exists()
    assert [p.name for p in list_checkpoints(run)] == ["checkpoint-00000002"]
    load_checkpoint(find_latest_checkpoint(run))  # verifies every hash
    _resume_and_compare(run, tmp_path / "ref", reference)
