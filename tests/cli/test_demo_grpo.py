"""The demo's optional ``grpo`` stage on a tiny stand-in base: a trained row, its source and timing."""

from __future__ import annotations

import json

import pytest

from flowalign.experiments import demo, demo_stages
from flowalign.models.toy import save_toy_model

pytestmark = pytest.mark.usefixtures("one_thread")

TINY = dict(
    num_samples=4, num_inference_steps=2, eval_batch_size=4, grpo_steps=1, grpo_prompts_per_step=2,
    grpo_samples=2, grpo_inference_steps=2, grpo_window=1, threads=1,
)  # fmt: skip


def test_grpo_stage_trains_and_reports(tmp_path, monkeypatch):
    base = save_toy_model(tmp_path / "toy", "image", width=32, num_layers=1)
    monkeypatch.setattr(
        demo_stages, "fetch_toy_base", lambda kind, recipe=None, progress=True: (base, "shipped")
    )
    out = tmp_path / "out"
    report = demo.run_demo(demo.DemoConfig(out_dir=out, stages=("base", "grpo"), **TINY), progress=False)
    assert list(report.rows) == ["base", "flow-grpo"]
    summary = json.loads((out / "summary.json").read_text())
    assert list(summary["stage_seconds"]) == ["base", "grpo", "report"]
    source = summary["models"]["flow-grpo"]["source"]
    assert source.startswith("trained now: Flow-GRPO") and "1 ta" in source
    assert (out / "grpo" / "final" / "lora" / "pytorch_lora_weights.safetensors").is_file()
    assert demo.stage_work("grpo", demo.DemoConfig()) > demo.stage_work("base", demo.DemoConfig())


def test_default_stages_leave_grpo_out_and_unknown_names_list_it(tmp_path):
    assert "grpo" not in demo.DemoConfig().stages
    with pytest.raises(ValueError, match="grpo"):
        demo.run_demo(demo.DemoConfig(out_dir=tmp_path, stages=("base", "bogus")))
