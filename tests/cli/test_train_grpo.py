"""`flowalign train grpo` on a tiny toy model: a run, its resume, the recipe, and a bad weight named."""

from __future__ import annotations

from pathlib import Path

import pytest
from typer.testing import CliRunner

from flowalign.cli import app
from flowalign.config import load_config
from flowalign.models.toy import save_toy_model
from flowalign.training.grpo_run import GRPORun, load_run_prompts

pytestmark = pytest.mark.usefixtures("one_thread")
runner = CliRunner()
CONFIGS = Path(__file__).resolve().parents[2] / "configs"


@pytest.fixture(scope="module")
def tiny_toy(tmp_path_factory):
    return save_toy_model(tmp_path_factory.mktemp("toy"), "image", width=32, num_layers=1)


def _args(model, prompts, out, steps, *extra):
    sets = ["train.batch_size=2", "train.trackers=[]", "train.cpu=true", "train.checkpoint.every=1",
            "train.log_every=1", "grpo.num_samples=2", "grpo.num_inference_steps=2", "lora.rank=4"]  # fmt: skip
    return ["train", "grpo", "--model", str(model), "--prompts", str(prompts), "--reward", "toy",
            "--out", str(out), "--steps", str(steps), *[a for s in sets for a in ("--set", s)], *extra]  # fmt: skip


def test_train_grpo_runs_and_resumes(tiny_toy, tmp_path):
    prompts = tmp_path / "prompts.txt"
    prompts.write_text("a small red circle in the center\na large blue square in the top left\n")
    res = runner.invoke(app, _args(tiny_toy, prompts, tmp_path / "run", 1, "--weights", "ta=1,vq=0.5"))
    assert res.exit_code == 0, res.output
    res = runner.invoke(
        app, _args(tiny_toy, prompts, tmp_path / "run", 2, "--weights", "ta=1,vq=0.5", "--resume")
    )
    assert res.exit_code == 0, res.output
    assert (tmp_path / "run" / "final" / "lora" / "pytorch_lora_weights.safetensors").is_file()
    lines = (tmp_path / "run" / "metrics.jsonl").read_text().splitlines()
    assert len(lines) == 2 and '"reward_ta"' in lines[0]


def test_train_grpo_names_a_weight_no_reward_provides(tiny_toy, tmp_path):
    res = runner.invoke(app, _args(tiny_toy, "toy:train", tmp_path / "bad", 1, "--weights", "aesthetics=1"))
    assert res.exit_code != 0
    assert "aesthetics" in res.output and "Traceback" not in res.output


def test_grpo_recipe_and_prompt_specs():
    run = load_config(GRPORun, CONFIGS / "toy_grpo.yaml", ["model=/tmp/model"])
    assert run.grpo.window == "random" and run.rewards == ["toy"]
    assert load_run_prompts("toy:train") and load_run_prompts("toy:train:video")
    with pytest.raises(ValueError, match="toy:"):
        load_run_prompts("toy:train:audio")
