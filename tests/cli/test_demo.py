"""The demo's stages and outputs on a tiny stand-in base model (the shipped one takes minutes)."""

from __future__ import annotations

import json

import pytest
import torch
from PIL import Image

from flowalign.experiments import demo, demo_stages
from flowalign.experiments.demo_report import GRID_COLUMNS, GRID_SCALE, labelled_grid, paired_difference
from flowalign.models.toy import save_toy_model

pytestmark = pytest.mark.usefixtures("one_thread")

TINY = dict(
    num_samples=6,
    num_inference_steps=2,
    eval_batch_size=6,
    pair_prompts=4,
    pair_candidates=2,
    pair_inference_steps=2,
    dpo_steps=2,
    dpo_batch_size=2,
    nrg_reward_steps=2,
    nrg_reward_batch_size=2,
    nrg_reward_blocks=1,
    nrg_counterfactual_pairs=2,
    onestep_steps=2,
    onestep_batch_size=2,
    threads=1,
)


def brightness_pairs(
    base_dir, out_dir, *, num_prompts, num_candidates, guidance_scale, num_inference_steps, **_
):
    """The demo's pairs ranked by brightness: an untrained model's samples tie on the oracles."""
    from flowalign.experiments.toy_alignment import ToyPairs
    from flowalign.models import load_flow_model
    from flowalign.toy.oracles import score_images
    from flowalign.toy.world import toy_prompts
    from flowalign.workflows.pairs import PairsConfig, build_pairs

    def score(media, prompts):
        return score_images(media, prompts) | {"overall": media.flatten(1).mean(1)}

    cfg = PairsConfig(
        num_candidates=num_candidates, guidance_scale=guidance_scale, num_inference_steps=num_inference_steps
    )
    prompts = toy_prompts("train")[:num_prompts]
    return ToyPairs(*build_pairs(load_flow_model(base_dir), prompts, score, out_dir, cfg, progress=False))


@pytest.fixture
def tiny_base(tmp_path, monkeypatch):
    from flowalign.experiments import toy_alignment

    base = save_toy_model(tmp_path / "toy", "image", width=32, num_layers=1)
    monkeypatch.setattr(
        demo_stages, "fetch_toy_base", lambda kind, recipe=None, progress=True: (base, "shipped")
    )
    monkeypatch.setattr(toy_alignment, "toy_pairs", brightness_pairs)
    return base


def test_default_demo_runs_every_stage_with_enough_samples():
    config = demo.DemoConfig()
    assert config.stages == ("base", "dpo", "nrg", "onestep")
    assert config.num_samples >= 256
    assert config.base_steps == 1500  # the shipped base: nothing to train


def test_demo_writes_one_table_one_grid_sources_and_timings(tmp_path, tiny_base, capsys):
    out = tmp_path / "out"
    report = demo.run_demo(demo.DemoConfig(out_dir=out, **TINY), progress=True)
    assert list(report.rows) == ["base", "flow-dpo", "flow-nrg", "one-step"]
    summary = json.loads((out / "summary.json").read_text())
    assert summary["samples_per_model"] == 6
    assert list(summary["stage_seconds"]) == ["base", "dpo", "nrg", "onestep", "report"]
    md, page = (out / "summary.md").read_text(), (out / "index.html").read_text()
    prompts = report.rows["base"].evaluation.prompts[:GRID_COLUMNS]
    assert summary["grid_prompts"] == prompts and len(prompts) == 6
    for prompt in prompts:
        assert prompt in md and prompt in page
    for name, row in report.rows.items():
        cells = summary["models"][name]["cells"]
        assert f"| {name} | {cells['from']} |" in md and f"<td>{name}</td>" in page
        mean = row.evaluation.scores["ta"].double().mean().item()
        assert cells["text alignment"].startswith(f"{mean:.3f} ± ")
    assert summary["models"]["base"]["source"].startswith("shipped")
    assert summary["models"]["flow-dpo"]["source"].startswith("trained now")
    assert summary["models"]["one-step"]["sampling"] == "1 step, no CFG"
    for stage in ("base", "dpo", "nrg", "onestep", "report"):
        assert f"{stage}: " in md.split("Stage times")[1]
    # paired difference to the base, as the table prints it
    diff, se = paired_difference(
        report.rows["flow-dpo"].evaluation.scores["vq"], report.rows["base"].evaluation.scores["vq"]
    )
    assert summary["models"]["flow-dpo"]["cells"]["Δ visual quality"] == f"{diff:+.3f} ± {se:.3f}"
    grid = Image.open(out / "grid.png")
    assert grid.height > 4 * 32 * GRID_SCALE and grid.width > 6 * 32 * GRID_SCALE  # 4 model rows, 6 prompts
    pair = Image.open(out / "onestep_vs_teacher.png")
    # two model rows (teacher, student) under the same 6 prompt columns
    assert 2 * 32 * GRID_SCALE < pair.height < 3 * 32 * GRID_SCALE + 200 and pair.width > 6 * 32 * GRID_SCALE
    assert "onestep_vs_teacher.png" in md and "onestep_vs_teacher.png" in page
    assert (out / "report" / "report.html").is_file()
    report_json = json.loads((out / "report" / "report.json").read_text())
    assert report_json["timings"]["num_samples"] == 4 * 6
    lines = capsys.readouterr().out.strip().splitlines()
    assert len(lines) == 1 + 5 + 1  # header, one line per stage, the files to open
    assert all("(about " in line and " done in " in line for line in lines[1:6])
    assert str(out / "summary.md") in lines[-1] and str(out / "index.html") in lines[-1]


def test_paired_difference_is_the_mean_of_per_sample_differences():
    a, b = torch.tensor([1.0, 0.5, 0.75, 0.0]), torch.tensor([0.5, 0.5, 0.25, 0.25])
    diff, se = paired_difference(a, b)
    d = (a - b).double()
    assert diff == pytest.approx(float(d.mean()), abs=1e-15)
    assert se == pytest.approx(float(d.std() / 2), abs=1e-15)
    with pytest.raises(ValueError, match="same samples"):
        paired_difference(a, b[:3])


def test_labelled_grid_puts_each_sample_under_its_prompt():
    red, blue = torch.zeros(2, 3, 4, 4), torch.zeros(2, 3, 4, 4)
    red[:, 0], blue[:, 2] = 1.0, 1.0
    image = labelled_grid(["a red one", "another"], {"first model": red, "second": blue}, scale=10)
    pixels = torch.tensor(list(image.getdata())).reshape(image.height, image.width, 3)
    # each row's cells are exact 40x40 blocks of the row's colour, rows stacked in order
    reds = ((pixels == torch.tensor([255, 0, 0])).all(-1)).nonzero()
    blues = ((pixels == torch.tensor([0, 0, 255])).all(-1)).nonzero()
    assert len(reds) == len(blues) == 2 * 40 * 40
    assert reds[:, 0].max() < blues[:, 0].min()
    # text above the columns: dark pixels above the first row of cells
    assert (pixels[: reds[:, 0].min()] < 128).all(-1).any()


def test_unknown_stage_is_named(tmp_path):
    with pytest.raises(ValueError, match="bogus"):
        demo.run_demo(demo.DemoConfig(out_dir=tmp_path, stages=("base", "bogus")))


def test_threads_default_to_the_physical_cores():
    import os

    cores = demo.physical_cores()
    assert 1 <= cores <= len(os.sched_getaffinity(0))
    assert 1 <= demo.demo_threads() <= cores
    assert demo.busy_cpus(samples=1) >= 0
