"""`flowalign train reward` on tiny data: a preference jsonl, the toy shortcut, and bad inputs."""

from __future__ import annotations

import json

import pytest
import torch
from typer.testing import CliRunner

from flowalign.cli import app
from flowalign.data.preference import write_preference_jsonl
from flowalign.rewards import load_reward
from flowalign.toy.reward_pairs import build_toy_reward_pairs

pytestmark = pytest.mark.usefixtures("one_thread")

runner = CliRunner()
TINY_YAML = """
model:
  embed_dim: 16
  vision: {image_size: 32, patch_size: 8, width: 16, layers: 1, head_width: 8, pool_type: avg}
  text: {context_length: 16, width: 16, heads: 2, layers: 1}
  hidden: 16
data: {toy_train_pairs: 16, toy_eval_pairs: 8, eval_fraction: 0.25}
train: {batch_size: 4, max_steps: 2, trackers: [], cpu: true, log_every: 1}
"""


@pytest.fixture(scope="module")
def tiny_config(tmp_path_factory):
    path = tmp_path_factory.mktemp("cfg") / "tiny_reward.yaml"
    path.write_text(TINY_YAML)
    return path


@pytest.fixture(scope="module")
def pairs_jsonl(tmp_path_factory):
    """12 toy pairs written as a preference jsonl with labels {"VQ", "TA"} (A, B or tie)."""
    pairs = build_toy_reward_pairs(12, kind="image", seed=5)
    rows = [
        {
            "prompt": pairs.prompts[i],
            "media_w": pairs.media_a[i].float() / 255,
            "media_l": pairs.media_b[i].float() / 255,
            "labels": {"VQ": int(pairs.labels["vq"][i]), "TA": int(pairs.labels["ta"][i])},
        }
        for i in range(12)
    ]
    return write_preference_jsonl(tmp_path_factory.mktemp("pairs"), rows)


def reward(*args):
    return runner.invoke(app, ["train", "reward", *map(str, args)])


def test_trains_on_a_preference_file_and_reports_held_out_accuracy(tiny_config, pairs_jsonl, tmp_path):
    res = reward("--data", pairs_jsonl, "--out", tmp_path / "run", "--config", tiny_config)
    assert res.exit_code == 0, res.output
    assert "held-out vq: accuracy" in res.output and "held-out ta: accuracy" in res.output
    metrics = json.loads((tmp_path / "run" / "eval_metrics.json").read_text())
    assert metrics["num_eval_pairs"] == 3 and metrics["num_train_pairs"] == 9
    assert set(metrics["dimensions"]) == {"vq", "ta"}
    model = load_reward("multihead", path=tmp_path / "run" / "final")
    scores = model.score(torch.rand(2, 3, 32, 32), ["a small red circle in the center"] * 2)
    assert set(scores) == {"vq", "ta"}


def test_toy_shortcut_and_resume(tiny_config, tmp_path):
    out = tmp_path / "toy"
    res = reward("--toy", "video", "--out", out, "--config", tiny_config, "--steps", 1)
    assert res.exit_code == 0, res.output
    assert "held-out mq" in res.output
    again = reward("--toy", "video", "--out", out, "--config", tiny_config, "--steps", 2, "--resume")
    assert again.exit_code == 0, again.output
    assert "trained 2 steps" in again.output
    assert len((out / "metrics.jsonl").read_text().splitlines()) == 2


def test_bad_inputs_are_named(tiny_config, pairs_jsonl, tmp_path):
    res = reward("--data", tmp_path / "nowhere.jsonl", "--out", tmp_path / "x", "--config", tiny_config)
    assert res.exit_code != 0 and "nowhere.jsonl" in res.output
    bad = tmp_path / "bad.jsonl"
    lines = pairs_jsonl.read_text().splitlines()
    row = json.loads(lines[1])
    row["label"]["VQ"] = "C"
    bad.write_text("\n".join([lines[0], json.dumps(row), *lines[2:]]) + "\n")
    (tmp_path / "media").symlink_to(pairs_jsonl.parent / "media")
    res = reward("--data", bad, "--out", tmp_path / "y", "--config", tiny_config)
    assert res.exit_code != 0 and "line 2" in res.output and "'C'" in res.output
    res = reward("--data", pairs_jsonl, "--toy", "image", "--out", tmp_path / "z")
    assert res.exit_code != 0 and "not both" in res.output
    res = reward("--toy", "audio", "--out", tmp_path / "z")
    assert res.exit_code != 0 and "image or video" in res.output
    res = reward("--toy", "image", "--out", tmp_path / "z", "--set", "method.thetta=3")
    assert res.exit_code != 0 and "method.thetta" in res.output
