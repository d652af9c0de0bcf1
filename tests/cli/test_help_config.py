"""``flowalign train <method> --help-config``: every config key with its type, default and doc."""

from __future__ import annotations

import pytest
from typer.testing import CliRunner

from flowalign.cli import app
from flowalign.config import LoraConfig, config_help, describe_config
from flowalign.training.grpo_run import GRPORun
from flowalign.training.methods.cdt import CDTRunConfig
from flowalign.training.methods.distar import DistarRun
from flowalign.training.methods.fdistill import FDistillRun
from flowalign.training.methods.reward_run import RewardModelRun
from flowalign.training.runs import DPORun, LatentRewardRun, RWRRun, SFTRun

runner = CliRunner()
COMMANDS = {
    "sft": SFTRun,
    "dpo": DPORun,
    "rwr": RWRRun,
    "grpo": GRPORun,
    "latent-reward": LatentRewardRun,
    "fdistill": FDistillRun,
    "distar": DistarRun,
    "cdt": CDTRunConfig,
    "reward": RewardModelRun,
}


def test_every_train_command_is_covered():
    train = next(info.typer_instance for info in app.registered_groups if info.name == "train")
    assert sorted(info.name for info in train.registered_commands) == sorted(COMMANDS)


@pytest.mark.parametrize("command", sorted(COMMANDS))
def test_help_config_lists_every_key_with_type_default_and_doc(command):
    run_cls = COMMANDS[command]
    res = runner.invoke(app, ["train", command, "--help-config"])  # required keys need no value here
    assert res.exit_code == 0, res.output[-2000:]
    assert res.output.strip() == config_help(run_cls)
    lines = {line.split(":", 1)[0]: line for line in res.output.splitlines()}
    for key, doc in describe_config(run_cls).items():
        if key not in lines:  # only a required nested block, whose own keys are listed instead
            assert any(k.startswith(f"{key}.") for k in lines), f"{command}: {key} missing"
            continue
        assert ": " in lines[key] and ("=" in lines[key] or "(required)" in lines[key]), lines[key]
        if doc:
            assert lines[key].endswith(f" -- {' '.join(doc.split())}"), lines[key]


def test_the_dpo_listing_shows_types_and_defaults():
    res = runner.invoke(app, ["train", "dpo", "--help-config"])
    lines = {line.split(":", 1)[0]: line for line in res.output.splitlines()}
    assert lines["model"].startswith("model: str (required) -- Hub id or folder")
    assert lines["dpo.beta"].startswith(f"dpo.beta: float = {DPORun(model='m', data='d').dpo.beta!r} -- KL")
    assert lines["dpo.beta_schedule"].startswith("dpo.beta_schedule: Literal['constant', 't2'] = 'constant'")
    assert lines["lora"].startswith("lora: LoraConfig | None = {...}")
    assert lines["lora.rank"].startswith(f"lora.rank: int = {LoraConfig().rank} -- ")
