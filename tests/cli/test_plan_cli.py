"""`flowalign plan` from the command line: presets, a training YAML from configs/, and its errors."""

from __future__ import annotations

from pathlib import Path

import pytest
from typer.testing import CliRunner

from flowalign.cli import app
from flowalign.planning.command import PRESETS
from flowalign.planning.memory import GIB, plan

runner = CliRunner()
CONFIGS = Path(__file__).resolve().parents[2] / "configs"


def _row(output: str, name: str) -> list[str]:
    return next(line.split() for line in output.splitlines() if line.split()[:1] == [name])


@pytest.mark.parametrize("preset", ["sd35m-lora-dpo", "wan-1.3b-lora-dpo"])
def test_preset_row_is_the_planner_s_number(preset):
    res = runner.invoke(app, ["plan", preset, "--gpu-memory", "24", "--gpu-memory", "4"])
    assert res.exit_code == 0, res.output
    row = _row(res.output, preset)
    peak = plan(PRESETS[preset]).peak / GIB
    assert row[-3] == f"{peak:.1f}" and row[-2:] == ["yes" if peak <= 24 else "no", "no"]
    assert f"{preset} at 4 GB:" in res.output  # what does not fit gets its switches (or the advice to shard)


def test_overrides_reach_the_recipe():
    args = [
        "plan",
        "sd35m-lora-dpo",
        "--height",
        "512",
        "--width",
        "512",
        "--num-gpus",
        "2",
        "--strategy",
        "fsdp",
    ]
    res = runner.invoke(app, args)
    assert res.exit_code == 0, res.output
    expected = plan(PRESETS["sd35m-lora-dpo"].replace(height=512, width=512, num_gpus=2, strategy="fsdp"))
    assert _row(res.output, "sd35m-lora-dpo")[-4] == f"{expected.peak / GIB:.1f}"
    assert "2x fsdp" in res.output


@pytest.mark.parametrize("config", ["sd35m_dpo.yaml", "wan13b_dpo.yaml"])
def test_training_yaml_from_configs(config):
    res = runner.invoke(app, ["plan", str(CONFIGS / config), "--gpu-memory", "80", "--breakdown"])
    assert res.exit_code == 0, res.output
    assert _row(res.output, Path(config).stem)[-1] == "yes" and "peak phase:" in res.output


@pytest.mark.parametrize(
    ("args", "message"),
    [
        (["nope"], "'nope' is neither a preset"),
        (["sd35m-lora-dpo", "--gpu-memory", "nan"], "--gpu-memory must be a number, got nan"),
        (["sd35m-lora-dpo", "--gpu-memory", "0"], "--gpu-memory must be > 0.0"),
        (["sd35m-lora-dpo", "--num-gpus", "0"], "--num-gpus must be >= 1"),
        (["sd35m-lora-dpo", "--strategy", "mesh"], "--strategy must be one of ddp, fsdp"),
        (["sd35m-lora-dpo", "--height", "-8"], "--height must be >= 1"),
        (["sd35m-lora-dpo", "--batch", "100000"], "--batch must be <= 4096"),
        ([str(CONFIGS / "toy_dpo.yaml")], "no 'model' key"),  # the toy recipes have no real model to plan
        (["/nonexistent/run.yaml"], "cannot read the config"),
    ],
)
def test_errors_are_one_line_exit_2(args, message):
    res = runner.invoke(app, ["plan", *args])
    assert res.exit_code == 2 and "Traceback" not in res.output, res.output
    lines = res.output.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("error: ") and message in lines[0], res.output
