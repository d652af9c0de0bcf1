"""``pairs`` survives a kill: candidates are on disk as they are made, a re-run draws only the rest.

A real process builds pairs and dies (``os._exit``) while writing its 5th candidate; the re-run finds the
4 finished ones, draws the other 8 and writes the same candidates and pairs, byte for byte, as a run
never interrupted. A re-run with other settings is refused naming the field; every option is checked
before anything is sampled; a run that ends with no pair keeps its candidates and says where they are.
"""

from __future__ import annotations

import json
import math
import os
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest
import rel_summary

import flowalign
import flowalign.workflows.candidates as candidates_module
from flowalign.data.errors import DataError
from flowalign.models import load_flow_model
from flowalign.workflows.pairs import PairsConfig, build_pairs, rechoose_pairs

REPO = Path(flowalign.__file__).resolve().parents[1]
PROMPTS = [
    "a small red circle in the center",
    "a large blue square in the top left",
    "a small green cross in the bottom right",
    "a large yellow diamond in the top right",
]
CONFIG = {"num_candidates": 3, "num_inference_steps": 2, "batch_size": 2}

# The child process: build pairs, logging every candidate file, and die writing the 5th.
CHILD = """
    import os, sys
    sys.path.insert(0, sys.argv[3])
    import test_interrupted_pairs as t
    import flowalign.workflows.candidates as c
    from flowalign.models import load_flow_model
    from flowalign.workflows.pairs import PairsConfig, build_pairs
    t.log_saves(c, sys.argv[2] + ".log", die_at=5)
    build_pairs(load_flow_model(sys.argv[1]), t.PROMPTS, t.brightness, sys.argv[2], PairsConfig(**t.CONFIG),
                progress=False)
"""


def brightness(media, prompts):
    """Brighter is better, and a second dimension ranking the other way (a deterministic stand-in)."""
    bright = media.flatten(1).mean(1)
    return {"bright": bright, "dark": 1 - bright, "overall": bright}


def log_saves(module, log: str | Path, die_at: int | None = None) -> None:
    """Wrap the candidate writer of ``module``: log each file; with ``die_at``, exit like a kill there."""
    original, count = module.save_media, [0]

    def save_media(media, path, **kwargs):
        count[0] += 1
        if die_at is not None and count[0] == die_at:
            original(media, path, **kwargs)
            os._exit(3)  # the file is written, its row is not: a kill between the two
        original(media, path, **kwargs)
        with open(log, "a") as handle:
            handle.write(Path(path).name + "\n")

    module.save_media = save_media


@pytest.fixture(scope="module")
def toy_dir(tmp_path_factory) -> Path:
    from flowalign.models.toy import save_toy_model

    return save_toy_model(tmp_path_factory.mktemp("toy-pairs"), "image", width=32, num_layers=1)


@pytest.fixture()
def logged(monkeypatch, tmp_path):
    """Log this process's candidate writes to ``tmp_path / "saves.log"``; returns the log's lines."""
    log = tmp_path / "saves.log"
    monkeypatch.setattr(candidates_module, "save_media", candidates_module.save_media)
    log_saves(candidates_module, log)
    return lambda: log.read_text().split() if log.exists() else []


def test_killed_pairs_run_resumes_and_draws_nothing_twice(toy_dir, tmp_path, logged):
    out = tmp_path / "pairs"
    env = {**os.environ, "PYTHONPATH": str(REPO), "OMP_NUM_THREADS": "1", "HF_HUB_OFFLINE": "1"}
    code = textwrap.dedent(CHILD)
    proc = subprocess.run(
        [sys.executable, "-c", code, str(toy_dir), str(out), str(Path(__file__).parent)],
        env=env, capture_output=True, text=True, timeout=300,
    )  # fmt: skip
    assert proc.returncode == 3, proc.stderr[-3000:]
    rows = [json.loads(line) for line in (out / "candidates.jsonl").read_text().splitlines()]
    assert [r["id"] for r in rows] == [0, 1, 2, 3]  # two batches finished; the 5th file has no row
    assert not (out / "pairs.jsonl").exists()
    finished = {r["file"]: (out / r["file"]).stat().st_mtime_ns for r in rows}

    model = load_flow_model(toy_dir)
    cand, chosen = build_pairs(model, PROMPTS, brightness, out, PairsConfig(**CONFIG), progress=False)
    redrawn = logged()
    assert redrawn == [f"{i:06d}.png" for i in range(4, 12)]  # only the unfinished ones
    assert all((out / f).stat().st_mtime_ns == t for f, t in finished.items())
    assert len(chosen) == 4 and len(cand.prompts) == 12

    fresh = tmp_path / "fresh"
    build_pairs(model, PROMPTS, brightness, fresh, PairsConfig(**CONFIG), progress=False)
    for name in ("candidates.jsonl", "pairs.jsonl", "pairs_config.json"):
        assert (out / name).read_bytes() == (fresh / name).read_bytes(), name
    for i in range(12):
        name = f"candidates/{i:06d}.png"
        assert (out / name).read_bytes() == (fresh / name).read_bytes(), name
    rel_summary.record("interrupted pairs", "killed at candidate 5 of 12: kept / drawn again", "4 / 8")
    rel_summary.record("interrupted pairs", "re-run equals an uninterrupted run (bytes)", "yes")


def test_pairs_resumed_with_other_settings_names_the_field(toy_dir, tmp_path, logged):
    model = load_flow_model(toy_dir)
    small = {"num_candidates": 2, "num_inference_steps": 1, "batch_size": 4}
    build_pairs(model, PROMPTS[:2], brightness, tmp_path, PairsConfig(**small), progress=False)
    drawn = len(logged())
    cases = [
        ({"config": {**small, "seed": 1}}, "seed="),
        ({"config": {**small, "num_candidates": 3}}, "num_candidates="),
        ({"config": {**small, "guidance_scale": 2.0}}, "guidance_scale="),
        ({"config": {**small, "num_inference_steps": 2}}, "num_inference_steps="),
        ({"config": {**small, "video_ext": ".npy"}}, "video_ext="),
        ({"prompts": PROMPTS[:3]}, "num_prompts="),
        ({"prompts": [PROMPTS[1], PROMPTS[0]]}, "prompt="),
        ({"score_fn": lambda m, p: brightness(m, p)}, "rewards.function="),
    ]
    for change, field in cases:
        kwargs = {"prompts": PROMPTS[:2], "score_fn": brightness, "config": small, **change}
        with pytest.raises(ValueError, match=field) as info:
            build_pairs(model, kwargs["prompts"], kwargs["score_fn"], tmp_path, PairsConfig(**kwargs["config"]),
                        progress=False)  # fmt: skip
        assert "new output folder" in str(info.value)
        rel_summary.add_to_list("settings-aware resume", "pairs: refused changes", field.rstrip("="))
    # How pairs are chosen is not a candidate setting: a new margin or mode re-chooses, draws nothing.
    _, chosen = build_pairs(
        model, PROMPTS[:2], brightness, tmp_path, PairsConfig(**small, mode="all"), progress=False
    )
    assert len(logged()) == drawn and len(chosen) == 2


BAD_OPTIONS = [
    ("margin", math.nan),
    ("margin", -0.1),
    ("margin", math.inf),
    ("fps", 0),
    ("fps", math.nan),
    ("num_candidates", 1),
    ("num_candidates", 2.5),
    ("batch_size", 0),
    ("num_inference_steps", 0),
    ("guidance_scale", math.nan),
    ("guidance_scale", -math.inf),
    ("seed", -1),
    ("mode", "random"),
    ("video_ext", ".avi"),
]


@pytest.mark.parametrize(("key", "value"), BAD_OPTIONS)
def test_every_option_is_checked_before_sampling(key, value):
    with pytest.raises(ValueError, match=key.split("_")[0]):
        PairsConfig(**{key: value})
    rel_summary.count("interrupted pairs", "bad options refused before sampling")


def test_no_pairs_keeps_the_candidates_and_says_where(toy_dir, tmp_path, logged):
    def flat(media, prompts):  # every candidate ties on 'overall'; 'bright' still ranks them
        bright = media.flatten(1).mean(1)
        return {"bright": bright, "overall": bright * 0}

    model = load_flow_model(toy_dir)
    config = PairsConfig(num_candidates=2, num_inference_steps=1, batch_size=4)
    with pytest.raises(DataError, match="no pairs") as info:
        build_pairs(model, PROMPTS[:2], flat, tmp_path, config, progress=False)
    assert str(tmp_path / "candidates.jsonl") in str(info.value) and "kept" in str(info.value)
    assert len((tmp_path / "candidates.jsonl").read_text().splitlines()) == 4
    assert len(list((tmp_path / "candidates").glob("*.png"))) == 4
    _, chosen = rechoose_pairs(tmp_path, {"bright": 1.0}, filename="by_brightness.jsonl")
    assert len(chosen) == 2  # the kept candidates are usable without sampling again
    drawn = len(logged())
    with pytest.raises(DataError, match="no pairs"):  # a re-run draws nothing and fails the same way
        build_pairs(model, PROMPTS[:2], flat, tmp_path, config, progress=False)
    assert len(logged()) == drawn == 4
    rel_summary.record("interrupted pairs", "'no pairs' end: candidates kept on disk", "4 / 4")
