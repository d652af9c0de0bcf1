"""`flowalign train dpo --online` on a tiny toy model: a run with two rounds, its resume, a bad option named."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
from typer.testing import CliRunner

from flowalign.cli import app
from flowalign.models.toy import save_toy_model

BASE = Path(__file__).resolve().parents[2] / "flowalign" / "assets" / "toy_base_image"

pytestmark = pytest.mark.usefixtures("one_thread")
runner = CliRunner()


@pytest.fixture(scope="module")
def tiny_toy(tmp_path_factory):
    return save_toy_model(tmp_path_factory.mktemp("toy"), "image", width=32, num_layers=1)


def _args(model, out, steps, *extra):
    sets = ["train.batch_size=2", "train.trackers=[]", "train.cpu=true", "train.checkpoint.every=1",
            "train.log_every=1", "online.regenerate_every=1", "online.num_candidates=2",
            "online.prompts_per_round=2", "online.num_inference_steps=6", "lora.rank=4", "weights=ta=1,vq=1"]  # fmt: skip
    return ["train", "dpo", "--online", "--model", str(model), "--data", "toy:train", "--out", str(out),
            "--steps", str(steps), *[a for s in sets for a in ("--set", s)], *extra]  # fmt: skip


def test_train_dpo_online_runs_and_resumes(tmp_path):
    res = runner.invoke(app, _args(BASE, tmp_path / "run", 1))
    assert res.exit_code == 0, res.output
    res = runner.invoke(app, _args(BASE, tmp_path / "run", 2, "--resume"))
    assert res.exit_code == 0, res.output
    assert (tmp_path / "run" / "final" / "lora" / "pytorch_lora_weights.safetensors").is_file()
    records = [json.loads(x) for x in (tmp_path / "run" / "metrics.jsonl").read_text().splitlines()]
    assert [r["round"] for r in records] == [0, 1]
    for r in (0, 1):
        assert (tmp_path / "run" / "online" / f"round_{r:04d}" / "pairs.jsonl").is_file()


def test_train_dpo_online_names_a_bad_option(tiny_toy, tmp_path):
    res = runner.invoke(app, _args(tiny_toy, tmp_path / "ties", 1))  # a random model: every reward is 0
    assert res.exit_code != 0
    assert "round 0" in res.output and "tied" in res.output and "Traceback" not in res.output
    res = runner.invoke(app, _args(tiny_toy, tmp_path / "bad", 1, "--set", "online.reference=moving"))
    assert res.exit_code != 0
    assert "online.reference" in res.output and "Traceback" not in res.output


def test_online_recipe_loads():
    from flowalign.config import load_config
    from flowalign.workflows.online_dpo_run import OnlineDPORun

    run = load_config(OnlineDPORun, BASE.parents[2] / "configs" / "toy_online_dpo.yaml", ["model=/tmp/model"])
    assert (
        run.online.regenerate_every == 10 and run.online.prompts_per_round * run.online.num_candidates == 320
    )
    assert run.train.max_steps // run.online.regenerate_every * 320 == 1280
