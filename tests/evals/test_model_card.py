"""The upload folder and model card of a toy Flow-DPO run (offline), and the push through huggingface_hub."""

from __future__ import annotations

import yaml
from typer.testing import CliRunner

from flowalign.cli import app
from flowalign.sharing.card import eval_rows
from flowalign.sharing.push import build_upload_folder

runner = CliRunner()


def _front_matter(card: str) -> dict:
    assert card.startswith("---\n")
    return yaml.safe_load(card[4 : card.index("\n---\n", 4)])


def test_upload_folder_of_a_toy_dpo_run(toy_dpo_run, rich_run, tmp_path):
    eval_dir = rich_run.json_path.parent
    folder = build_upload_folder(toy_dpo_run, tmp_path / "up", repo_id="me/toy-dpo", eval_dir=eval_dir)
    files = sorted(p.relative_to(folder).as_posix() for p in folder.rglob("*") if p.is_file())
    assert "pytorch_lora_weights.safetensors" in files
    assert {"README.md", "flowalign_config.yaml", "eval/report.json", "samples.png"} <= set(files)
    lora = toy_dpo_run / "final" / "lora" / "pytorch_lora_weights.safetensors"
    assert (folder / "pytorch_lora_weights.safetensors").read_bytes() == lora.read_bytes()
    assert (folder / "flowalign_config.yaml").read_text() == (toy_dpo_run / "config.yaml").read_text()

    card = (folder / "README.md").read_text()
    meta = _front_matter(card)
    assert meta["library_name"] == "diffusers"
    assert {"flowalign", "dpo", "lora"} <= set(meta["tags"])
    assert "base_model" not in meta  # a local folder is not a Hub id
    assert "Flow-DPO fine-tune" in card and "`dpo.beta`" in card and "`lora.rank` | 4 |" in card
    # every (set, model) row of the eval report is in the card's table with its mean and s.e.
    dims, rows = eval_rows(rich_run.report)
    assert dims == rich_run.report["dimensions"] and rows
    stats = rich_run.report["results"]["toy-heldout"]["stats"]
    for row in rows:
        for dim, cell in zip(dims, row["cells"], strict=True):
            s = stats.get(row["model"], {}).get(dim)
            if s:
                assert cell == f"{s['mean']:.3f} ± {s['se']:.3f}"
                assert cell in card
    assert "fast &lt;b&gt;" in card and "fast <b>" not in card  # model names cannot inject markup


def test_upload_folder_refuses_what_is_not_a_finished_run(toy_dpo_run, tmp_path):
    import pytest

    with pytest.raises(FileNotFoundError, match="config.yaml"):
        build_upload_folder(tmp_path, tmp_path / "up", repo_id="me/x")
    with pytest.raises(FileNotFoundError, match="final-ema.*drop --ema"):
        build_upload_folder(toy_dpo_run, tmp_path / "up", repo_id="me/x", ema=True)
    (tmp_path / "busy").mkdir()
    (tmp_path / "busy" / "keep.txt").write_text("mine")
    with pytest.raises(ValueError, match="not empty"):
        build_upload_folder(toy_dpo_run, tmp_path / "busy", repo_id="me/x")
    assert (tmp_path / "busy" / "keep.txt").read_text() == "mine"  # nothing already there is lost
    res = runner.invoke(
        app, ["push", str(toy_dpo_run), "--repo-id", "no-owner", "--out", str(tmp_path / "o")]
    )
    assert res.exit_code == 2 and "owner/name" in res.output


def test_push_uploads_the_folder_in_one_commit(toy_dpo_run, tmp_path, monkeypatch):
    import huggingface_hub

    calls = []

    class FakeApi:
        def __init__(self, token=None):
            calls.append(("init", token))

        def create_repo(self, repo_id, **kwargs):
            calls.append(("create_repo", repo_id, kwargs))

        def upload_folder(self, *, repo_id, folder_path, **kwargs):
            from pathlib import Path

            names = sorted(p.name for p in Path(folder_path).iterdir())
            calls.append(("upload_folder", repo_id, names, kwargs["repo_type"]))
            return type("Info", (), {"commit_url": f"https://hub.example/{repo_id}/commit/1"})()

    monkeypatch.setattr(huggingface_hub, "HfApi", FakeApi)
    res = runner.invoke(app, ["push", str(toy_dpo_run), "--repo-id", "me/toy-dpo", "--private"])
    assert res.exit_code == 0, res.output
    assert "https://hub.example/me/toy-dpo/commit/1" in res.output
    assert calls[1] == (
        "create_repo",
        "me/toy-dpo",
        {"private": True, "exist_ok": True, "repo_type": "model"},
    )
    assert calls[2][0] == "upload_folder" and calls[2][1] == "me/toy-dpo"
    assert {"README.md", "flowalign_config.yaml", "pytorch_lora_weights.safetensors"} <= set(calls[2][2])


def test_push_out_writes_the_folder_without_uploading(toy_dpo_run, tmp_path, monkeypatch):
    import huggingface_hub

    monkeypatch.setattr(huggingface_hub, "HfApi", None)  # any upload attempt would fail
    res = runner.invoke(
        app, ["push", str(toy_dpo_run), "--repo-id", "me/toy-dpo", "--out", str(tmp_path / "o")]
    )
    assert res.exit_code == 0, res.output
    assert "nothing uploaded" in res.output and (tmp_path / "o" / "README.md").is_file()


def test_sample_grid_from_the_latest_training_previews(toy_dpo_run, tmp_path):
    import shutil

    import torch

    from flowalign.data.media import load_media, save_image

    run = tmp_path / "run"
    shutil.copytree(toy_dpo_run, run)
    for step, value in (("step-000001", 0.0), ("step-000002", 1.0)):
        folder = run / "samples" / step
        folder.mkdir(parents=True)
        for i in range(2):
            save_image(torch.full((3, 16, 16), value), folder / f"{i}.png")
        (folder / "samples.json").write_text("{}")
    folder = build_upload_folder(run, tmp_path / "up", repo_id="me/toy-dpo")
    grid = load_media(folder / "samples.png")
    assert grid.shape == (3, 16 + 4, 2 * 16 + 6)  # two previews side by side, 2-pixel padding
    assert grid[:, 2:18, 2:18].min() == 1.0  # the latest step's white previews, not the first step's black
    assert "![samples](samples.png)" in (folder / "README.md").read_text()
