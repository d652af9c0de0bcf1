"""`flowalign eval` from the command line on a tiny toy model."""

from __future__ import annotations

import json

from typer.testing import CliRunner

from flowalign.cli import app
from flowalign.models.toy import save_toy_model


def test_eval_writes_report_and_reruns(tmp_path):
    model = save_toy_model(tmp_path / "toy", "image", width=32, num_layers=1)
    out = tmp_path / "eval"
    args = [
        "eval",
        "--models",
        f"base={model}",
        "--models",
        f"other={tmp_path / 'missing'}",
        "--prompts",
        "toy-heldout@2",
        "--rewards",
        "toy",
        "--steps",
        "2",
        "--out",
        str(out),
    ]
    res = CliRunner().invoke(app, args)
    assert res.exit_code == 0, res.output
    report = json.loads((out / "report.json").read_text())
    assert "base" in json.dumps(report) and (out / "report.html").is_file()
    assert "failed:" in res.output and "other" in res.output  # the broken model is reported, the rest renders
    again = CliRunner().invoke(app, ["eval", "--rerun", "--out", str(out)])
    assert again.exit_code == 0, again.output


def test_eval_needs_models_and_prompts(tmp_path):
    res = CliRunner().invoke(app, ["eval", "--out", str(tmp_path / "e")])
    assert res.exit_code != 0 and "--models" in res.output


def test_eval_fails_when_every_model_fails(tmp_path):
    out = tmp_path / "eval"
    args = [
        "eval",
        "--models",
        f"gone={tmp_path / 'missing'}",
        "--prompts",
        "toy-heldout@2",
        "--rewards",
        "toy",
        "--steps",
        "2",
        "--out",
        str(out),
    ]
    res = CliRunner().invoke(app, args)
    assert res.exit_code == 1 and "no sample was generated" in res.output
    assert (out / "report.json").is_file()  # the failures are still written down


def test_guidance_sweep_evaluates_each_model_at_each_scale(tmp_path):
    model = save_toy_model(tmp_path / "toy", "image", width=32, num_layers=1)
    out = tmp_path / "eval"
    common = ["--prompts", "toy-heldout@2", "--rewards", "toy", "--steps", "2", "--out", str(out)]
    res = CliRunner().invoke(app, ["eval", "--models", f"base={model}", "--guidance-sweep", "1,2.5", *common])
    assert res.exit_code == 0, res.output
    models = json.loads((out / "report.json").read_text())["models"]
    assert [(m["name"], m["generation"]["guidance_scale"]) for m in models] == [
        ("base_cfg1", 1.0),
        ("base_cfg2.5", 2.5),
    ]
    bad = CliRunner().invoke(app, ["eval", "--models", f"base={model}", "--guidance-sweep", "1,x", *common])
    assert bad.exit_code != 0 and "--guidance-sweep: 'x' is not a number" in bad.output
    both = ["eval", "--models", f"base={model}", "--guidance-sweep", "1,2", "--guidance-scale", "3", *common]
    res = CliRunner().invoke(app, both)
    assert res.exit_code != 0 and "not both" in res.output
