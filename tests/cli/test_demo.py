"""The demo's stages and outputs on a tiny stand-in base model (the real one trains for minutes)."""

from __future__ import annotations

import json

import pytest

from flowalign.experiments import demo
from flowalign.models.toy import save_toy_model


def test_demo_writes_summary_grid_and_report(tmp_path, monkeypatch):
    base = save_toy_model(tmp_path / "toy", "image", width=32, num_layers=1)
    monkeypatch.setattr(demo, "toy_base_model", lambda kind, recipe=None, progress=True: base)
    config = demo.DemoConfig(out_dir=tmp_path / "out", num_samples=8, num_inference_steps=2)
    report = demo.run_demo(config, progress=False)
    summary = json.loads((tmp_path / "out" / "summary.json").read_text())
    ta = summary["models"]["base"]["summary"]["ta"]
    assert ta["n"] == 8
    assert f"{ta['mean']:.3f} ± {ta['se']:.3f}" in (tmp_path / "out" / "summary.md").read_text()
    assert (tmp_path / "out" / "grid_base.png").is_file()
    assert (tmp_path / "out" / "report" / "report.html").is_file()
    assert "base" in report.table_md()


def test_unknown_stage_is_named(tmp_path):
    with pytest.raises(ValueError, match="bogus"):
        demo.run_demo(demo.DemoConfig(out_dir=tmp_path, stages=("base", "bogus")))


def test_nrg_stage_writes_gains_plot_and_notes(tmp_path, monkeypatch):
    from functools import partial

    from flowalign.experiments import toy_nrg

    base = save_toy_model(tmp_path / "toy", "image", width=32, num_layers=1)
    small = partial(
        toy_nrg.run_toy_nrg_experiment,
        num_train_prompts=2, samples_per_prompt=2, train_steps=1, batch_size=2, num_blocks=1,
    )  # fmt: skip
    monkeypatch.setattr(toy_nrg, "run_toy_nrg_experiment", small)
    config = demo.DemoConfig(
        out_dir=tmp_path / "out", num_samples=4, num_inference_steps=2, nrg_counterfactual_pairs=2
    )
    report = demo.DemoReport(config.out_dir)
    results = demo.stage_nrg(config, report, base)
    svg = (tmp_path / "out" / "nrg" / "gains.svg").read_text()
    assert svg.count("<svg") == 3 and "noisy_rm:vq+ta" in svg and "clean_rm:vq" in svg
    note = report.notes[-1]
    gain, se = results["noisy_rm:ta"]["ta_gain"]
    assert (
        f"noisy_rm:ta: vq {results['noisy_rm:ta']['vq_gain'][0]:+.3f}" in note
        and f"ta {gain:+.3f} ± {se:.3f}" in note
    )
    assert (tmp_path / "out" / "nrg" / "summary.md").is_file()


def test_dpo_stage_adds_the_base_at_more_guidance(tmp_path, monkeypatch):
    """Flow-DPO's row comes with the base sampled at more guidance, the trade-off DPO has to beat."""
    from flowalign.experiments import toy_alignment as alignment
    from flowalign.models import load_flow_model
    from flowalign.toy.world import toy_prompts
    from flowalign.workflows.pairs import PairsConfig, build_pairs

    def brightness_pairs(base_dir, out_dir, **kwargs):  # an untrained base ties on the oracles
        def bright(media, prompts):
            b = media.flatten(1).mean(1)
            return {"bright": b, "overall": b}

        cfg = PairsConfig(num_candidates=2, num_inference_steps=2)
        cand, chosen = build_pairs(
            load_flow_model(base_dir), toy_prompts("train")[:16], bright, out_dir, cfg, progress=False
        )
        return alignment.ToyPairs(cand, chosen)

    monkeypatch.setattr(alignment, "toy_pairs_cached", brightness_pairs)
    base = save_toy_model(tmp_path / "toy", "image", width=32, num_layers=1)
    config = demo.DemoConfig(
        out_dir=tmp_path / "out", num_samples=4, num_inference_steps=2, dpo_steps=2, dpo_baseline_guidance=5.0
    )
    report = demo.DemoReport(config.out_dir)
    demo.stage_dpo(config, report, base, progress=False)
    assert list(report.rows) == ["flow-dpo", "base-guidance-5"]
    assert (tmp_path / "out" / "grid_base-guidance-5.png").is_file()
    assert "guidance 5 instead of 3" in (tmp_path / "out" / "summary.md").read_text()
