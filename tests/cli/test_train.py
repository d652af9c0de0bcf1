"""`flowalign train sft|dpo|rwr` and `flowalign pairs` on tiny toy models: exact resume and bad inputs."""

from __future__ import annotations

import json

import pytest
import torch
from safetensors.torch import load_file
from typer.testing import CliRunner

from flowalign.cli import app
from flowalign.models.toy import save_toy_model

runner = CliRunner()
TINY = [
    "--set",
    "num_items=64",
    "--set",
    "train.batch_size=8",
    "--set",
    "train.log_every=1",
    "--set",
    "train.trackers=[]",
    "--set",
    "train.cpu=true",
    "--set",
    "train.checkpoint.every=2",
    "--set",
    "sft.train_text_encoder=true",
]


@pytest.fixture(scope="module")
def tiny_toy(tmp_path_factory):
    return save_toy_model(tmp_path_factory.mktemp("toy"), "image", width=32, num_layers=1)


def sft(*args):
    return runner.invoke(app, ["train", "sft", *map(str, args)])


def test_sft_resume_is_exact(tiny_toy, tmp_path):
    straight = sft("--model", tiny_toy, "--out", tmp_path / "a", "--steps", 4, *TINY)
    assert straight.exit_code == 0, straight.output
    first = sft("--model", tiny_toy, "--out", tmp_path / "b", "--steps", 2, *TINY)
    assert first.exit_code == 0, first.output
    resumed = sft("--model", tiny_toy, "--out", tmp_path / "b", "--steps", 4, "--resume", *TINY)
    assert resumed.exit_code == 0, resumed.output
    for name in ("model-transformer.safetensors", "model-text_encoder.safetensors"):
        a = load_file(tmp_path / "a" / "checkpoint-00000004" / name)
        b = load_file(tmp_path / "b" / "checkpoint-00000004" / name)
        assert a.keys() == b.keys()
        assert all(torch.equal(a[k], b[k]) for k in a), name
    losses = [
        [json.loads(line)["loss"] for line in (tmp_path / d / "metrics.jsonl").read_text().splitlines()]
        for d in ("a", "b")
    ]
    assert losses[0] == losses[1] and len(losses[0]) == 4


def test_unknown_config_key_is_named(tiny_toy, tmp_path):
    res = sft("--model", tiny_toy, "--out", tmp_path / "x", "--set", "train.optim.learning_rate=1")
    assert res.exit_code != 0 and "train.optim.learning_rate" in res.output


def test_missing_dataset_is_named(tiny_toy, tmp_path):
    res = sft("--model", tiny_toy, "--out", tmp_path / "x", "--data", tmp_path / "nowhere" / "manifest.jsonl")
    assert res.exit_code != 0 and "nowhere" in res.output


def test_caption_file_with_empty_prompt_names_the_line(tiny_toy, tmp_path):
    from flowalign.data.media import save_image

    save_image(torch.rand(3, 32, 32), tmp_path / "a.png")
    (tmp_path / "manifest.jsonl").write_text(
        json.dumps({"file": "a.png", "prompt": "a red circle"})
        + "\n"
        + json.dumps({"file": "a.png", "prompt": ""})
    )
    res = sft("--model", tiny_toy, "--out", tmp_path / "x", "--data", tmp_path / "manifest.jsonl")
    assert res.exit_code != 0 and "line 2" in res.output


def test_pairs_cli_reports_when_every_group_ties(tiny_toy, tmp_path):
    # an untrained model draws noise: the oracle scores every candidate 0, so no pair can be formed
    prompts = tmp_path / "prompts.txt"
    prompts.write_text("a small red circle in the center\na large blue square in the top left\n")
    res = runner.invoke(
        app,
        [
            "pairs",
            "--model",
            str(tiny_toy),
            "--out",
            str(tmp_path / "p"),
            "--reward",
            "toy",
            "--prompts-file",
            str(prompts),
            "--num-candidates",
            "2",
            "--steps",
            "2",
            "--weights",
            "ta=1,vq=1",
        ],
    )
    assert res.exit_code != 0 and "all 2 candidate groups were ties" in res.output


def test_pairs_then_dpo_and_rwr_from_the_cli(tiny_toy, tmp_path):
    from flowalign.data.pairs import PairsConfig, build_pairs
    from flowalign.models import load_flow_model

    def brightness(media, prompts):
        b = media.flatten(1).mean(1)
        return {"bright": b, "overall": b}

    build_pairs(
        load_flow_model(tiny_toy),
        ["a small red circle in the center", "a large blue square in the top left"],
        brightness,
        tmp_path / "p",
        PairsConfig(num_candidates=2, num_inference_steps=2),
        progress=False,
    )
    common = [
        "--set",
        "train.batch_size=2",
        "--set",
        "train.trackers=[]",
        "--set",
        "train.cpu=true",
        "--set",
        "lora.rank=4",
    ]
    res = runner.invoke(
        app,
        [
            "train",
            "dpo",
            "--model",
            str(tiny_toy),
            "--data",
            str(tmp_path / "p" / "pairs.jsonl"),
            "--out",
            str(tmp_path / "dpo"),
            "--steps",
            "2",
            *common,
        ],
    )
    assert res.exit_code == 0, res.output
    assert (tmp_path / "dpo" / "final" / "lora" / "pytorch_lora_weights.safetensors").is_file()
    res = runner.invoke(
        app,
        [
            "train",
            "rwr",
            "--model",
            str(tiny_toy),
            "--data",
            str(tmp_path / "p" / "candidates.jsonl"),
            "--out",
            str(tmp_path / "rwr"),
            "--steps",
            "2",
            *common,
        ],
    )
    assert res.exit_code == 0, res.output
    assert (tmp_path / "rwr" / "final" / "model_index.json").is_file()
