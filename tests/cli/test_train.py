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


TWO_PROMPTS = ["a small red circle in the center", "a large blue square in the top left"]


def tiny_pairs(model_dir, out_dir, score, *, num_candidates: int = 2):
    """`flowalign pairs` output (candidates.jsonl + pairs.jsonl) of a tiny model ranked by ``score``."""
    from flowalign.models import load_flow_model
    from flowalign.workflows.pairs import PairsConfig, build_pairs

    config = PairsConfig(num_candidates=num_candidates, num_inference_steps=2)
    build_pairs(load_flow_model(model_dir), TWO_PROMPTS, score, out_dir, config, progress=False)


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


def test_pairs_cli_rejects_an_unknown_video_format(tiny_toy, tmp_path):
    prompts = tmp_path / "prompts.txt"
    prompts.write_text("a small red circle in the center\n")
    args = ["pairs", "--model", str(tiny_toy), "--out", str(tmp_path / "p"), "--reward", "toy"]
    res = runner.invoke(app, [*args, "--prompts-file", str(prompts), "--video-format", "avi"])
    assert res.exit_code != 0 and "video_ext must be one of" in res.output


def test_rechoose_from_the_cli(tiny_toy, tmp_path):
    def bright_and_dark(media, prompts):
        b = media.flatten(1).mean(1)
        return {"bright": b, "dark": 1 - b, "overall": b}

    tiny_pairs(tiny_toy, tmp_path / "p", bright_and_dark)
    res = runner.invoke(
        app, ["rechoose", str(tmp_path / "p"), "--weights", "dark=1", "--out-file", "dark.jsonl"]
    )
    assert res.exit_code == 0, res.output
    assert "wrote 2 pairs" in res.output and (tmp_path / "p" / "dark.jsonl").is_file()
    res = runner.invoke(app, ["rechoose", str(tmp_path / "p"), "--weights", "ta=1", "--out-file", "ta.jsonl"])
    assert res.exit_code != 0 and "line 1: no score 'ta'" in res.output


def test_pairs_then_dpo_and_rwr_from_the_cli(tiny_toy, tmp_path):
    def brightness(media, prompts):
        b = media.flatten(1).mean(1)
        return {"bright": b, "overall": b}

    tiny_pairs(tiny_toy, tmp_path / "p", brightness)
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


def test_generate_with_nrg_guidance_strength_zero_equals_plain(tiny_toy, tmp_path):
    from flowalign.data.media import load_image
    from flowalign.models import load_flow_model
    from flowalign.rewards.latent import LatentRewardModel

    model = load_flow_model(tiny_toy)
    guide = tmp_path / "guide"
    reward_model = LatentRewardModel.from_flow_model(model, dimensions=("vq", "ta"), num_blocks=1)
    with torch.no_grad():  # heads start at zero (no guidance signal): give them random weights
        for name, param in reward_model.named_parameters():
            if "head" in name:
                param.normal_(0, 0.5, generator=torch.Generator().manual_seed(len(name)))
    reward_model.save_pretrained(guide)
    common = [
        "generate",
        "--model",
        str(tiny_toy),
        "--prompt",
        "a small red circle in the center",
        "--steps",
        "3",
    ]
    plain = runner.invoke(app, [*common, "--out", str(tmp_path / "plain")])
    zero = runner.invoke(
        app, [*common, "--guide", str(guide), "--guidance-strength", "0", "--out", str(tmp_path / "z")]
    )
    guided = runner.invoke(
        app,
        [
            *common,
            "--guide",
            str(guide),
            "--reward-weights",
            "ta=1",
            "--guidance-strength",
            "5",
            "--out",
            str(tmp_path / "g"),
        ],
    )
    assert plain.exit_code == zero.exit_code == guided.exit_code == 0, guided.output
    a, b, c = (load_image(tmp_path / d / "000000.png") for d in ("plain", "z", "g"))
    assert torch.equal(a, b)
    assert not torch.equal(a, c)
    bad = runner.invoke(
        app, [*common, "--guide", str(guide), "--reward-weights", "mq=1", "--out", str(tmp_path / "b")]
    )
    assert bad.exit_code != 0 and "mq" in bad.output
    neg = runner.invoke(
        app, [*common, "--guide", str(guide), "--guidance-strength", "-1", "--out", str(tmp_path / "n")]
    )
    assert neg.exit_code != 0 and "strength" in neg.output


def test_train_latent_reward_from_candidates_then_guide(tiny_toy, tmp_path):
    """`pairs` candidates -> `train latent-reward` -> `generate --guide`; resume and bad dimension."""

    def brightness(media, prompts):
        b = media.flatten(1).mean(1)
        return {"vq": b, "ta": media[:, 0].flatten(1).mean(1), "overall": b}

    tiny_pairs(tiny_toy, tmp_path / "p", brightness, num_candidates=3)
    common = [
        "--set",
        "train.batch_size=2",
        "--set",
        "train.trackers=[]",
        "--set",
        "train.cpu=true",
        "--set",
        "train.checkpoint.every=2",
        "--set",
        "reward.num_blocks=1",
        "--set",
        "reward.tie_margin=0",
    ]
    candidates = str(tmp_path / "p" / "candidates.jsonl")

    def latent(out, steps, *extra):
        return runner.invoke(
            app,
            [
                "train",
                "latent-reward",
                "--model",
                str(tiny_toy),
                "--data",
                candidates,
                "--out",
                str(out),
                "--steps",
                str(steps),
                *common,
                *extra,
            ],
        )

    res = latent(tmp_path / "straight", 4)
    assert res.exit_code == 0, res.output
    assert latent(tmp_path / "resumed", 2).exit_code == 0
    res = latent(tmp_path / "resumed", 4, "--resume")
    assert res.exit_code == 0, res.output
    a, b = (load_file(str(tmp_path / d / "final" / "model.safetensors")) for d in ("straight", "resumed"))
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
    guided = runner.invoke(
        app,
        [
            "generate",
            "--model",
            str(tiny_toy),
            "--prompt",
            "a small red circle in the center",
            "--steps",
            "2",
            "--guide",
            str(tmp_path / "straight" / "final"),
            "--reward-weights",
            "vq=1",
            "--out",
            str(tmp_path / "g"),
        ],
    )
    assert guided.exit_code == 0, guided.output
    bad = latent(tmp_path / "bad", 2, "--dimensions", "vq,mq")
    assert bad.exit_code != 0 and "mq" in bad.output


def test_train_latent_reward_with_a_teacher_reward(tiny_toy, tmp_path):
    """A clean teacher reward (the toy oracles) labels the batches of a labelled pairs file."""
    tiny_pairs(tiny_toy, tmp_path / "p", lambda media, prompts: {"overall": media.flatten(1).mean(1)})
    res = runner.invoke(
        app,
        [
            "train",
            "latent-reward",
            "--model",
            str(tiny_toy),
            "--data",
            str(tmp_path / "p" / "pairs.jsonl"),
            "--teacher",
            "toy",
            "--out",
            str(tmp_path / "t"),
            "--steps",
            "1",
            "--set",
            "train.batch_size=2",
            "--set",
            "train.trackers=[]",
            "--set",
            "train.cpu=true",
            "--set",
            "reward.num_blocks=1",
        ],
    )
    assert res.exit_code == 0, res.output
    spec = json.loads((tmp_path / "t" / "final" / "latent_reward.json").read_text())
    assert spec["dimensions"] == ["vq", "ta"]
