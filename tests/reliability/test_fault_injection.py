"""Fault injection: SIGKILL at random points of training, SIGTERM, a full disk, interrupted score/eval runs.

Each kill trial runs the toy training run in a child process and kills it for real at a point drawn
from the trial's seed: inside a step (between two micro-steps), after a checkpoint file is written
(cut to a random fraction of its bytes), just before or after the rename that publishes a checkpoint,
during the rotation that deletes an old one, or at a random wall-clock time. Then, in this process:
the newest complete checkpoint verifies (sizes and sha256) and loads, and ``train(resume=True)``
finishes the run with weights, EMA and metrics.jsonl bit-identical to an uninterrupted run, leaving
no temporary folder behind. The default run does 3 trials; the ``slow`` test does 20.
"""

from __future__ import annotations

import errno
import json
import multiprocessing
import os
import random
import signal
import time
from pathlib import Path

import pytest
import rel_summary
import rel_worker
import torch
import training_toy
from rel_worker import CHECKPOINT_EVERY, FILES_PER_CHECKPOINT, RESULT, STARTED, STEPS, fault_config
from safetensors.torch import load_file
from training_toy import ToyFlowMatching, VectorDataset
from typer.testing import CliRunner

import flowalign.training.checkpoint as ckpt_mod
from flowalign.training.checkpoint import (
    CheckpointError,
    CheckpointWriteError,
    find_latest_checkpoint,
    list_checkpoints,
    load_checkpoint,
)
from flowalign.training.loop import METRICS_FILE, train

KINDS = ("file", "time", "rotate", "step", "replace")
CHILD_TIMEOUT = 120


def _context():
    """A forkserver that has imported rel_worker (torch, flowalign, warmed up) once for all children.

    Python 3.11's forkserver imports its preload modules before it applies the parent's sys.path, so
    the helper folders are put on PYTHONPATH while the server starts (and only then); the server alone
    warms rel_worker up (FLOWALIGN_REL_WARM_UP), not this process.
    """
    from multiprocessing import forkserver

    ctx = multiprocessing.get_context("forkserver")
    ctx.set_forkserver_preload(["rel_worker"])  # effective if the server is not running yet
    before = {k: os.environ.get(k) for k in ("PYTHONPATH", "FLOWALIGN_REL_WARM_UP")}
    helpers = [str(Path(rel_worker.__file__).parent), str(Path(training_toy.__file__).parent)]
    os.environ["PYTHONPATH"] = os.pathsep.join(
        helpers + ([before["PYTHONPATH"]] if before["PYTHONPATH"] else [])
    )
    os.environ["FLOWALIGN_REL_WARM_UP"] = "1"
    try:
        forkserver.ensure_running()
    finally:
        for key, value in before.items():
            if value is None:
                os.environ.pop(key, None)
            else:
                os.environ[key] = value
    return ctx


def run_child(target, *args) -> multiprocessing.Process:
    proc = _context().Process(target=target, args=args, daemon=True)
    proc.start()
    return proc


def wait(proc: multiprocessing.Process, timeout: float = CHILD_TIMEOUT) -> int:
    proc.join(timeout)
    if proc.is_alive():
        proc.kill()
        proc.join(10)
        pytest.fail(f"child process still running after {timeout} s (hang)")
    return proc.exitcode


@pytest.fixture(scope="module")
def reference(tmp_path_factory):
    """The uninterrupted run: final weights, EMA shadow and metrics.jsonl."""
    out = tmp_path_factory.mktemp("reference") / "run"
    train(ToyFlowMatching(), VectorDataset(), fault_config(out), progress=False)
    return {
        "weights": load_file(out / "final" / "net.safetensors"),
        "ema": load_file(out / "final-ema" / "net.safetensors"),
        "metrics": (out / METRICS_FILE).read_text(),
    }


def resume_and_compare(run: Path, reference: dict) -> None:
    result = train(ToyFlowMatching(), VectorDataset(), fault_config(run), resume=True, progress=False)
    assert result.step == STEPS and not result.interrupted
    leftovers = sorted(p.name for p in run.iterdir() if ".tmp-" in p.name or ".del-" in p.name)
    assert not leftovers, f"temporary folders left behind: {leftovers}"
    for part in ("weights", "ema"):
        got = load_file(run / ("final" if part == "weights" else "final-ema") / "net.safetensors")
        assert got.keys() == reference[part].keys()
        assert all(torch.equal(got[k], reference[part][k]) for k in got), (
            f"{part} differ from the straight run"
        )
    assert (run / METRICS_FILE).read_text() == reference["metrics"]


def make_plan(trial: int) -> dict:
    """The fault of trial ``trial``: kinds in turn, the point inside each drawn from the trial's seed."""
    rng = random.Random(f"kill-trial-{trial}")
    kind = KINDS[trial % len(KINDS)]
    num_ckpts = STEPS // CHECKPOINT_EVERY
    if kind == "file":
        return {"kind": kind, "file_index": rng.randint(1, num_ckpts * FILES_PER_CHECKPOINT),
                "fraction": rng.choice([0.0, rng.random(), 1.0])}  # fmt: skip
    if kind == "time":
        return {"kind": kind, "sleep": 0.05, "delay": rng.uniform(0.0, 0.6)}
    if kind == "rotate":  # keep_last=2: rotations happen when checkpoints 3 and 4 are written
        return {"kind": kind, "rotation": rng.randint(1, num_ckpts - 2), "deleted_files": rng.randint(0, 8)}
    if kind == "step":
        return {"kind": kind, "step": rng.randrange(STEPS)}
    return {
        "kind": kind,
        "step": CHECKPOINT_EVERY * rng.randint(1, num_ckpts),
        "when": rng.choice(["before", "after"]),
    }


def expected_latest(plan: dict) -> int | None:
    """The step of the newest complete checkpoint the fault must leave (None: none; -1: not known)."""
    kind = plan["kind"]
    if kind == "file":  # checkpoint c (1-based) was being written: c - 1 complete ones exist
        done = (plan["file_index"] - 1) // FILES_PER_CHECKPOINT
        return done * CHECKPOINT_EVERY or None
    if kind == "rotate":  # the rotation runs right after checkpoint (rotation + 2) is published
        return (plan["rotation"] + 2) * CHECKPOINT_EVERY
    if kind == "step":  # died inside step s (0-based): the checkpoints of steps <= s exist
        return plan["step"] // CHECKPOINT_EVERY * CHECKPOINT_EVERY or None
    if kind == "replace":
        return plan["step"] if plan["when"] == "after" else (plan["step"] - CHECKPOINT_EVERY or None)
    return -1


def kill_trial(trial: int, base: Path, reference: dict) -> None:
    plan = make_plan(trial)
    run = base / f"trial-{trial:02d}"
    proc = run_child(rel_worker.train_with_faults, str(run), plan)
    if plan["kind"] == "time":
        marker, deadline = base / f"{run.name}.{STARTED}", time.monotonic() + CHILD_TIMEOUT
        while not marker.exists() and proc.is_alive():
            assert time.monotonic() < deadline, "the child never started training"
            time.sleep(0.01)
        time.sleep(plan["delay"])
        if proc.is_alive():
            os.kill(proc.pid, signal.SIGKILL)
    code = wait(proc)
    finished = (base / f"{run.name}.{RESULT}").exists()
    assert code == -signal.SIGKILL or (plan["kind"] == "time" and finished), f"{plan}: exit code {code}"
    latest = find_latest_checkpoint(run)
    want = expected_latest(plan)
    if want != -1:
        assert (latest.name if latest else None) == (f"checkpoint-{want:08d}" if want else None), plan
    if latest is not None:
        assert load_checkpoint(latest).step == int(latest.name.split("-")[1])  # sizes and sha256 verified
    resume_and_compare(run, reference)
    if plan["kind"] == "time" and not finished:
        rel_summary.count("faults", "SIGKILL trials at a random time that landed during training")
    rel_summary.count("faults", "SIGKILL trials run")
    rel_summary.count("faults", "SIGKILL trials survived (newest checkpoint loads, exact resume)")
    if plan["kind"] in ("file", "replace", "rotate"):
        rel_summary.count("faults", "SIGKILL trials inside a checkpoint write/publish/rotation")


@pytest.mark.timeout(600)
def test_sigkill_trials_resume_exactly(tmp_path, reference):
    for trial in range(3):  # one write-cut file, one random-time kill, one rotation kill
        kill_trial(trial, tmp_path, reference)


@pytest.mark.slow
@pytest.mark.timeout(1800)
def test_twenty_sigkill_trials_resume_exactly(tmp_path, reference):
    for trial in range(20):
        kill_trial(trial, tmp_path, reference)


def sigterm_trial(seed: int, base: Path, reference: dict) -> bool:
    """SIGTERM a training process at a random time; returns whether it arrived during training."""
    run = base / f"sigterm-{seed}"
    proc = run_child(rel_worker.train_with_faults, str(run), {"kind": "none", "sleep": 0.05})
    marker, deadline = base / f"{run.name}.{STARTED}", time.monotonic() + CHILD_TIMEOUT
    while not marker.exists():
        assert proc.is_alive() and time.monotonic() < deadline, "the child never started training"
        time.sleep(0.01)
    time.sleep(random.Random(seed).uniform(0.0, 0.4))
    os.kill(proc.pid, signal.SIGTERM)
    assert wait(proc) == 0, "SIGTERM must end training cleanly, not kill the process"
    result = json.loads((base / f"{run.name}.{RESULT}").read_text())
    if result["interrupted"]:
        assert 1 <= result["step"] < STEPS
        ckpt = Path(result["checkpoint"])
        assert ckpt.name == f"checkpoint-{result['step']:08d}" and find_latest_checkpoint(run) == ckpt
        load_checkpoint(ckpt)  # complete and verified
        assert not (run / "final").exists()
    else:
        assert result["late_sigterm"] and result["step"] == STEPS
    resume_and_compare(run, reference)
    return result["interrupted"]


def test_sigterm_writes_a_final_checkpoint_and_resume_is_exact(tmp_path, reference):
    assert sigterm_trial(0, tmp_path, reference)
    rel_summary.count("faults", "SIGTERM trials that stopped training with a clean checkpoint")


@pytest.mark.slow
def test_sigterm_at_random_times(tmp_path, reference):
    stopped = sum(sigterm_trial(seed, tmp_path, reference) for seed in range(1, 9))
    assert stopped >= 4
    rel_summary.count("faults", "SIGTERM trials that stopped training with a clean checkpoint", stopped)


@pytest.mark.parametrize("file_index", [1, 3, FILES_PER_CHECKPOINT])
def test_full_disk_during_a_checkpoint_write_keeps_the_previous_one(
    tmp_path, monkeypatch, reference, file_index
):
    """ENOSPC while writing checkpoint-4 (its first, third or last file): the error names the checkpoint,
    checkpoint-2 stays complete, nothing half-written remains, and a resume on a freed disk is exact."""
    original, calls = ckpt_mod._write_file, [0]

    def full_disk(path: Path, write) -> None:
        if path.parent.name.startswith("checkpoint-00000004.tmp-"):
            calls[0] += 1
            if calls[0] == file_index:
                raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC), str(path))
        original(path, write)

    monkeypatch.setattr(ckpt_mod, "_write_file", full_disk)
    run = tmp_path / "run"
    with pytest.raises(CheckpointWriteError, match=r"checkpoint-00000004.*No space left on device") as info:
        train(ToyFlowMatching(), VectorDataset(), fault_config(run), progress=False)
    assert info.value.errno == errno.ENOSPC and isinstance(info.value, OSError | CheckpointError)
    monkeypatch.undo()
    assert [p.name for p in list_checkpoints(run)] == ["checkpoint-00000002"]
    assert not [p for p in run.iterdir() if ".tmp-" in p.name]
    load_checkpoint(run / "checkpoint-00000002")
    resume_and_compare(run, reference)
    rel_summary.count(
        "faults", "full-disk (ENOSPC) checkpoint writes: previous checkpoint intact, error reported"
    )


def test_full_disk_is_one_error_line_in_the_cli(tmp_path, monkeypatch):
    from flowalign.cli import app

    def full_disk(path: Path, write) -> None:
        raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC), str(path))

    monkeypatch.setattr(ckpt_mod, "_write_file", full_disk)
    res = CliRunner().invoke(app, ["train", "sft", "--model", "toy:image", "--out", str(tmp_path / "run"),
                                   "--steps", "1", "--set", "num_items=2", "--set", "train.batch_size=2",
                                   "--set", "train.cpu=true", "--set", "train.trackers=[]"])  # fmt: skip
    assert res.exit_code != 0 and isinstance(res.exception, SystemExit), res.output
    assert (
        "error:" in res.output and "No space left on device" in res.output and "Traceback" not in res.output
    )


# ---------------------------------------------------------------------------------------- score and eval


def _media_folder(folder: Path, n: int) -> Path:
    from flowalign.data.media import save_image

    rows = []
    for i in range(n):
        g = torch.Generator().manual_seed(i)
        save_image(torch.rand(3, 8, 8, generator=g), folder / f"{i:03d}.png")
        rows.append({"id": f"s{i:03d}", "prompt": f"prompt {i % 3}", "file": f"{i:03d}.png"})
    (folder / "manifest.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    return folder


@pytest.mark.parametrize("kill_at_batch, torn_tail", [(3, False), (2, True)])
def test_killed_score_run_resumes_without_duplicates_or_losses(tmp_path, kill_at_batch, torn_tail):
    media = _media_folder(tmp_path / "media", 10)
    out = tmp_path / "scores.jsonl"

    def score_args(target: Path) -> list[str]:
        return ["score", "--reward", "rel-colour", "--media", str(media), "--out", str(target),
                "--batch-size", "2", "--device", "cpu"]  # fmt: skip

    args = score_args(out)
    proc = run_child(rel_worker.score_cli, args, {"REL_KILL_AT_BATCH": str(kill_at_batch)})
    assert wait(proc) == -signal.SIGKILL
    first = out.read_text()
    assert len(first.splitlines()) == 2 * (kill_at_batch - 1)  # every finished batch was flushed
    if torn_tail:  # a kill in the middle of a write leaves part of a line
        out.write_text(first + first.splitlines()[0][:17])
    res = CliRunner().invoke(rel_worker_app(), args)
    assert res.exit_code == 0, res.output
    assert f"({2 * (kill_at_batch - 1)} already done)" in res.output
    text = out.read_text()
    assert text.startswith(first)  # rows written before the kill are kept as they were
    rows = [json.loads(line) for line in text.splitlines()]
    assert sorted(r["id"] for r in rows) == [f"s{i:03d}" for i in range(10)]  # none lost, none twice
    clean = tmp_path / "clean.jsonl"
    assert CliRunner().invoke(rel_worker_app(), score_args(clean)).exit_code == 0
    expected = {json.loads(x)["id"]: json.loads(x) for x in clean.read_text().splitlines()}
    assert all(r == expected[r["id"]] for r in rows)
    rel_summary.count("faults", "killed `flowalign score` runs resumed (no duplicate, no lost row)")


def rel_worker_app():
    from flowalign.cli import app

    return app


@pytest.fixture(scope="module")
def toy_model_dir(tmp_path_factory):
    from flowalign.models.toy import build_toy_pipeline

    folder = tmp_path_factory.mktemp("toy-eval-model")
    pipe = build_toy_pipeline("image", size=16, width=32, num_layers=1, text_width=16, seed=0)
    pipe.save_pretrained(str(folder), safe_serialization=True)
    return folder


@pytest.mark.parametrize(
    "env", [{"REL_KILL_AT_SAVE": "3"}, {"REL_KILL_AT_BATCH": "2"}], ids=["generating", "scoring"]
)
def test_killed_eval_run_reuses_what_was_written(tmp_path, toy_model_dir, env):
    prompts = tmp_path / "prompts.txt"
    prompts.write_text("a small red circle in the center\na large blue square in the top left\nthree dots\n")
    out = tmp_path / "eval"
    proc = run_child(rel_worker.eval_run, str(out), str(toy_model_dir), str(prompts), env)
    assert wait(proc) == -signal.SIGKILL
    recorded = [
        m.parent / json.loads(x)["file"]
        for m in out.rglob("manifest.jsonl")
        for x in m.read_text().splitlines()
    ]
    before = {p: p.stat().st_mtime_ns for p in recorded}
    assert before, "the killed run recorded no sample"
    result = rel_worker.eval_once(str(out), str(toy_model_dir), str(prompts))
    assert result.failures == []
    after = {p: p.stat().st_mtime_ns for p in out.rglob("*.png")}
    assert all(after[p] == t for p, t in before.items()), "samples written before the kill were redrawn"
    manifests = list((out / "samples").rglob("manifest.jsonl"))
    ids = [json.loads(x)["id"] for m in manifests for x in m.read_text().splitlines()]
    assert len(ids) == len(set(ids)) == 6
    scores = [json.loads(x)["id"] for x in (out / "scores" / "rel-colour.jsonl").read_text().splitlines()]
    assert len(scores) == len(set(scores)) == 6
    clean = rel_worker.eval_once(str(tmp_path / "clean"), str(toy_model_dir), str(prompts))
    stats = result.report["results"]
    assert stats == clean.report["results"]
    rel_summary.count("faults", "killed `flowalign eval` runs resumed (samples and scores reused)")


@pytest.mark.parametrize("tail", ["cut", "no-newline"])
def test_generation_after_a_cut_manifest_line_loses_no_row(tmp_path, toy_model_dir, tail):
    """A kill in the middle of a manifest write leaves a partial last line (or a whole one without its
    newline); the next run must not glue its first row to it (that row would be silently lost)."""
    from flowalign.models import load_flow_model
    from flowalign.pipelines.generate_files import GenerationSettings, generate_files, read_manifest

    model = load_flow_model(toy_model_dir)
    settings = GenerationSettings(num_inference_steps=1, height=16, width=16)
    prompts = ["a small red circle in the center", "a large blue square in the top left", "three dots"]
    generate_files(model, prompts[:2], tmp_path, settings, progress=False)
    manifest = tmp_path / "manifest.jsonl"
    lines = manifest.read_text().splitlines(keepends=True)
    manifest.write_text(lines[0] + (lines[1][:25] if tail == "cut" else lines[1].rstrip("\n")))
    generate_files(model, prompts, tmp_path, settings, progress=False)
    rows = read_manifest(manifest)
    assert [r["id"] for r in rows] == ["000000", "000001", "000002"]
    assert manifest.read_text().endswith("\n")
    rel_summary.count("faults", "cut manifest lines repaired before appending")
