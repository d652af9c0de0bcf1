"""On-the-fly dataset and file export of the toy world."""

from __future__ import annotations

import json

import pytest
import torch
from torch.utils.data import DataLoader

from flowalign.toy.data import ToyDataset, export_toy_dataset, load_toy_export
from flowalign.toy.render import render_image, render_video
from flowalign.toy.world import parse_caption, toy_prompts


def test_dataset_items_are_deterministic_renders_of_their_scene():
    a, b = ToyDataset("train", num=50, seed=4), ToyDataset("train", num=50, seed=4)
    assert len(a) == 50
    for i in (0, 17, 49):
        item = a[i]
        assert torch.equal(item["pixels"], b[i]["pixels"]) and item["prompt"] == b[i]["prompt"]
        assert torch.equal(item["pixels"], render_image(a.scene(i)))
        assert item["prompt"] == a.scene(i).caption
    other = ToyDataset("train", num=50, seed=5)
    assert sum(a[i]["prompt"] != other[i]["prompt"] for i in range(50)) > 40
    with pytest.raises(IndexError):
        a[50]


def test_video_items_have_frames_and_motion_captions():
    data = ToyDataset("heldout", kind="video", num=6, seed=1, num_frames=5, size=40)
    item = data[2]
    assert item["pixels"].shape == (5, 3, 40, 40)
    assert torch.equal(item["pixels"], render_video(data.scene(2), num_frames=5, size=40))
    assert parse_caption(item["prompt"]).motion is not None


@pytest.mark.parametrize(("split", "kind"), [("train", "image"), ("heldout", "image"), ("heldout", "video")])
def test_dataset_prompts_never_leave_their_split(split, kind):
    allowed = set(toy_prompts(split, kind))
    data = ToyDataset(split, kind=kind, num=300, seed=0)
    assert all(data.scene(i).caption in allowed for i in range(len(data)))


def test_default_collate_batches_pixels_and_prompts():
    batch = next(iter(DataLoader(ToyDataset("train", num=8), batch_size=4)))
    assert batch["pixels"].shape == (4, 3, 32, 32) and batch["pixels"].dtype == torch.float32
    assert isinstance(batch["prompt"], list) and len(batch["prompt"]) == 4


def test_dataset_rejects_bad_arguments():
    with pytest.raises(ValueError, match="'val'"):
        ToyDataset("val")
    with pytest.raises(ValueError, match="'gif'"):
        ToyDataset("train", kind="gif")


@pytest.mark.parametrize("kind", ["image", "video"])
def test_export_reads_back_to_the_same_pixels_and_attributes(tmp_path, kind):
    manifest = export_toy_dataset(tmp_path, kind=kind, split="heldout", num=6, seed=3)
    assert manifest == tmp_path / "manifest.jsonl"
    data = ToyDataset("heldout", kind=kind, num=6, seed=3)
    rows = load_toy_export(tmp_path)
    assert len(rows) == 6 and len({r["id"] for r in rows}) == 6
    suffix = ".png" if kind == "image" else ".npy"
    for i, row in enumerate(rows):
        assert row["file"].endswith(suffix) and (tmp_path / row["file"]).is_file()
        assert row["prompt"] == data[i]["prompt"]
        attrs = parse_caption(row["prompt"])
        for key, value in attrs.as_dict().items():
            assert row.get(key) == value
        assert row["pixels"].shape == data[i]["pixels"].shape
        assert float((row["pixels"] - data[i]["pixels"]).abs().max()) <= 1 / 255


def test_export_does_not_overwrite_without_permission(tmp_path):
    export_toy_dataset(tmp_path, num=2, seed=0)
    with pytest.raises(FileExistsError, match="manifest.jsonl"):
        export_toy_dataset(tmp_path, num=3, seed=1)
    export_toy_dataset(tmp_path, num=3, seed=1, overwrite=True)
    assert len(load_toy_export(tmp_path)) == 3


def test_load_errors_name_the_file_and_line(tmp_path):
    with pytest.raises(ValueError, match="does not exist"):
        load_toy_export(tmp_path)
    manifest = export_toy_dataset(tmp_path, num=3, seed=0)
    rows = manifest.read_text().splitlines()
    (tmp_path / json.loads(rows[1])["file"]).unlink()
    with pytest.raises(ValueError, match=r"manifest.jsonl: line 2: file .*00001.png"):
        load_toy_export(tmp_path)
    manifest.write_text(rows[0] + "\n{not json\n")
    with pytest.raises(ValueError, match=r"manifest.jsonl: line 2: invalid JSON"):
        load_toy_export(tmp_path)
