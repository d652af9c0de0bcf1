"""``generate`` / ``score`` / ``pairs`` / ``eval`` split over two processes (``accelerate launch``, CPU gloo).

Each process draws whole batches of the one-process run (batch ``b`` goes to rank ``b mod 2``), each
sample with its own seed, so every file, manifest and score equals a one-process run byte for byte --
no tolerance: the same arithmetic on the same shapes. A process killed in the middle leaves its part
file; the re-run merges it, draws only what is missing and writes each id once.
"""

from __future__ import annotations

import json
import os
import socket
import subprocess
import sys
from pathlib import Path

import pytest

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))

import sampling_worker  # noqa: E402

from flowalign.models.toy import save_toy_model  # noqa: E402
from flowalign.sharding import Shard  # noqa: E402


@pytest.fixture(scope="module")
def toy_dir(tmp_path_factory) -> Path:
    return save_toy_model(tmp_path_factory.mktemp("toy-shard"), "image", width=32, num_layers=1)


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _launch(toy_dir: Path, out: Path, stages: str, **env_extra: str) -> subprocess.CompletedProcess:
    cmd = [
        sys.executable, "-m", "accelerate.commands.launch", "--multi_gpu", "--num_processes", "2",
        "--num_machines", "1", "--mixed_precision", "no", "--dynamo_backend", "no",
        "--main_process_port", str(_free_port()), str(HERE / "sampling_worker.py"), str(toy_dir), str(out), stages,
    ]  # fmt: skip
    env = {
        **os.environ,
        "HF_HUB_OFFLINE": "1",
        "OMP_NUM_THREADS": "1",
        "CUDA_VISIBLE_DEVICES": "",
        **env_extra,
    }
    env["PYTHONPATH"] = os.pathsep.join(filter(None, [str(HERE.parents[1]), env.get("PYTHONPATH")]))
    return subprocess.run(cmd, capture_output=True, text=True, timeout=600, env=env)


def _files(folder: Path, pattern: str) -> dict[str, bytes]:
    return {p.relative_to(folder).as_posix(): p.read_bytes() for p in sorted(folder.rglob(pattern))}


def _rows(path: Path) -> list[dict]:
    """jsonl rows with absolute file paths reduced to their name (the two runs live in two folders)."""
    rows = [json.loads(line) for line in path.read_text().splitlines()]
    return [{**r, "file": Path(r["file"]).name} if "file" in r else r for r in rows]


@pytest.mark.slow
def test_two_processes_write_what_one_process_writes(toy_dir, tmp_path):
    """generate, score, pairs and eval under 2 processes: the same bytes as 1 process (no part left)."""
    sampling_worker.run(str(toy_dir), tmp_path / "one", ["gen", "score", "pairs", "eval"])
    proc = _launch(toy_dir, tmp_path / "two", "gen,score,pairs,eval")
    log = proc.stdout + proc.stderr
    assert "SHARD-DONE WORLD=2 RANK=0" in log and "SHARD-DONE WORLD=2 RANK=1" in log, log[-4000:]
    one, two = tmp_path / "one", tmp_path / "two"
    for pattern in ("*.png", "manifest.jsonl", "candidates.jsonl", "pairs.jsonl", "pairs_config.json"):
        a, b = _files(one, pattern), _files(two, pattern)
        a.pop("eval/scores/manifest.jsonl", None), b.pop("eval/scores/manifest.jsonl", None)  # absolute paths
        assert a and a == b, pattern
    assert _rows(one / "eval/scores/manifest.jsonl") == _rows(two / "eval/scores/manifest.jsonl")
    assert _rows(one / "gen" / "scores.jsonl") == _rows(two / "gen" / "scores.jsonl")
    assert _rows(one / "eval" / "scores" / "toy.jsonl") == _rows(two / "eval" / "scores" / "toy.jsonl")
    report_one, report_two = (json.loads((d / "eval" / "report.json").read_text()) for d in (one, two))
    assert report_one["failures"] == report_two["failures"] == []
    assert json.dumps(report_one["prompt_sets"]) == json.dumps(report_two["prompt_sets"])
    assert not list(two.rglob("*.rank*.jsonl"))
    pids = {line.split()[0] for line in (two / "saves.log").read_text().splitlines()}
    assert len(pids) == 2  # both processes drew samples


def test_two_processes_generate_and_score_like_one(toy_dir, tmp_path):
    """The fast variant: generate + score only."""
    sampling_worker.run(str(toy_dir), tmp_path / "one", ["gen", "score"])
    proc = _launch(toy_dir, tmp_path / "two", "gen,score")
    log = proc.stdout + proc.stderr
    assert "SHARD-DONE WORLD=2 RANK=1" in log, log[-4000:]
    gen_one, gen_two = tmp_path / "one" / "gen", tmp_path / "two" / "gen"
    assert _files(gen_one, "*.png") == _files(gen_two, "*.png")
    assert (gen_one / "manifest.jsonl").read_bytes() == (gen_two / "manifest.jsonl").read_bytes()
    assert _rows(gen_one / "scores.jsonl") == _rows(gen_two / "scores.jsonl")


@pytest.mark.slow
def test_killed_process_loses_and_redoes_nothing(toy_dir, tmp_path):
    """Rank 1 dies (``os._exit``) writing its 2nd of 6 images; the launcher stops rank 0. The re-run under 2
    processes merges the parts and draws only the unfinished ids: 12 ids, one row each, finished ones kept."""
    out = tmp_path / "run"
    first = _launch(toy_dir, out, "gen", FAULT_RANK="1", FAULT_AFTER="2")
    assert "SHARD-DONE" not in first.stdout + first.stderr
    gen = out / "gen"
    before = _finished(gen)
    assert 1 <= len(before) < 12, before
    second = _launch(toy_dir, out, "gen")
    assert "SHARD-DONE WORLD=2 RANK=1" in second.stdout + second.stderr, (second.stdout + second.stderr)[
        -4000:
    ]
    _assert_complete(gen, before, out / "saves.log")


def _finished(gen: Path) -> dict[str, int]:
    """mtime of every image whose row reached the manifest or a part (an image written just before a kill,
    without its row, is not finished: the re-run draws it again)."""
    rows = [json.loads(line) for p in gen.glob("manifest*.jsonl") for line in p.read_text().splitlines()]
    return {r["file"]: (gen / r["file"]).stat().st_mtime_ns for r in rows}


def _assert_complete(gen: Path, finished: dict[str, int], log: Path) -> None:
    """One row per id 0..11, no part left, every id drawn; finished ones drawn once and left untouched."""
    rows = [json.loads(line) for line in (gen / "manifest.jsonl").read_text().splitlines()]
    assert [r["id"] for r in rows] == [f"{i:06d}" for i in range(12)]
    assert not list(gen.glob("manifest.rank*.jsonl"))
    saved = [line.split()[1] for line in log.read_text().splitlines()]
    assert set(saved) == {f"{i:06d}.png" for i in range(12)}
    assert all(saved.count(name) == 1 for name in finished)
    assert all(gen.joinpath(name).stat().st_mtime_ns == t for name, t in finished.items())


class _Alone(Shard):
    """Rank ``rank`` of 2 run on its own (no process group): what one process of a 2-process run does."""

    def barrier(self) -> None:
        pass

    def gather(self, value):
        return [value] * self.world_size


def test_a_dead_rank_part_is_merged_by_a_one_process_rerun(toy_dir, tmp_path):
    """Rank 1 of 2 dies while writing its 2nd image (its part holds the 1st); a later one-process run
    counts that one as done, draws the other 11 and merges: each id once, the finished file untouched."""
    code = (
        "import sys; sys.path.insert(0, sys.argv[3]); import sampling_worker as w, test_sharded_sampling as t\n"
        "from pathlib import Path; from flowalign.models import load_flow_model\n"
        "from flowalign.pipelines.generate_files import GenerationSettings, generate_files\n"
        "w._log_saves(Path(sys.argv[2]))\n"
        "s = GenerationSettings(num_inference_steps=w.STEPS, samples_per_prompt=3)\n"
        "generate_files(load_flow_model(sys.argv[1]), w.PROMPTS, Path(sys.argv[2]) / 'gen', s, batch_size=2,\n"
        "               model_name='toy', progress=False, shard=t._Alone(rank=1, world_size=2))\n"
    )
    out = tmp_path / "run"
    env = {
        **os.environ,
        "OMP_NUM_THREADS": "1",
        "HF_HUB_OFFLINE": "1",
        "RANK": "1",
        "FAULT_RANK": "1",
        "FAULT_AFTER": "2",
    }
    env["PYTHONPATH"] = os.pathsep.join(filter(None, [str(HERE.parents[1]), env.get("PYTHONPATH")]))
    proc = subprocess.run(
        [sys.executable, "-c", code, str(toy_dir), str(out), str(HERE)],
        env=env,
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert proc.returncode == 3, proc.stderr[-3000:]
    gen = out / "gen"
    part = [json.loads(line) for line in (gen / "manifest.rank1.jsonl").read_text().splitlines()]
    # rank 1 owns batches 1, 3, 5 (ids 2-3, 6-7, 10-11); it died writing its 2nd image, before that row
    assert [r["id"] for r in part] == ["000002"] and not (gen / "manifest.jsonl").exists()
    before = _finished(gen)
    sampling_worker.run(str(toy_dir), out, ["gen"])
    _assert_complete(gen, before, out / "saves.log")
