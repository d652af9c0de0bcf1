"""``score`` and ``eval`` manifests are confined to their folder like training data: a row naming a file
through ``..`` or by an absolute path outside the folder is refused, naming the manifest and line, before
any file is read. Symlinks follow the training loaders' documented rule (a link inside the folder is read
wherever it points; the rule is about what the row says)."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import rel_summary
import torch

from flowalign.data.errors import DataError
from flowalign.data.media import save_image
from flowalign.evals.samples import _num_done
from flowalign.rewards.scoring import MediaItem, resolve_media, score_files
from flowalign.toy.render import render_images
from flowalign.toy.world import sample_scenes


def _manifest(folder: Path, files: list[str], prompt: str = "a large red circle in the center") -> Path:
    folder.mkdir(parents=True, exist_ok=True)
    rows = [{"id": f"{i:06d}", "prompt": prompt, "file": f} for i, f in enumerate(files)]
    path = folder / "manifest.jsonl"
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return path


@pytest.fixture
def outside(tmp_path) -> Path:
    secret = tmp_path / "secret.png"
    save_image(torch.rand(3, 32, 32), secret)
    return secret


def test_score_manifests_refuse_paths_leaving_their_folder(tmp_path, outside):
    folder = tmp_path / "samples"
    folder.mkdir()
    save_image(torch.rand(3, 32, 32), folder / "ok.png")
    bad_values = ["../secret.png", str(outside), "sub/../../secret.png", "/etc/passwd", ""]
    for bad in bad_values:
        manifest = _manifest(folder, ["ok.png", bad])
        with pytest.raises(DataError) as info:
            resolve_media(manifest)
        assert str(manifest) in str(info.value) and "line 2" in str(info.value), info.value
        with pytest.raises(ValueError, match="line 2"):
            score_files(["toy"], folder, out=tmp_path / "scores.jsonl", progress=False)
        assert not (tmp_path / "scores.jsonl").exists()  # refused before any scoring
        rel_summary.count("paths", "score manifests naming files outside their folder: refused")
    inside = _manifest(folder, ["ok.png", str(folder / "ok.png")])  # absolute but inside: allowed
    assert [item.file for item in resolve_media(inside)] == [folder / "ok.png"] * 2


def test_a_symlink_inside_the_folder_follows_the_training_rule(tmp_path, outside):
    folder = tmp_path / "samples"
    folder.mkdir()
    (folder / "link.png").symlink_to(outside)
    items = resolve_media(_manifest(folder, ["link.png"]))
    assert items[0].file == folder / "link.png"  # as resolve_data_path decides for training data


def test_eval_sample_folders_refuse_paths_leaving_them(tmp_path, outside):
    folder = tmp_path / "eval" / "samples" / "set" / "model"
    _manifest(folder, ["../../../../secret.png"])
    with pytest.raises(DataError, match="outside|'..'"):
        _num_done(folder, 1)
    _manifest(folder, [str(outside)])
    with pytest.raises(DataError, match="outside"):
        _num_done(folder, 1)
    rel_summary.count("paths", "eval sample manifests naming files outside their folder: refused", 2)


def test_items_built_in_process_are_scored_as_given(tmp_path):
    scenes = sample_scenes(2, seed=0, split="train")
    files = []
    for i, img in enumerate(render_images(scenes)):
        files.append(tmp_path / "elsewhere" / f"{i}.png")
        save_image(img, files[-1])
    items = [MediaItem(f"s{i}", f, s.caption) for i, (f, s) in enumerate(zip(files, scenes, strict=True))]
    result = score_files(["toy"], items, out=tmp_path / "scores" / "toy.jsonl", progress=False)
    assert [r["id"] for r in result.rows] == ["s0", "s1"] and all(r["ta"] == 1.0 for r in result.rows)
