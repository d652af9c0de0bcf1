"""One data-source registry (flowalign.data.sources): toy specs, paths, hub ids and the old spellings."""

from __future__ import annotations

import json

import pytest
import torch

import flowalign.toy  # noqa: F401  (registers the toy: data sources)
from flowalign.data.errors import DataError
from flowalign.data.items import ManifestDataset, PairDataset
from flowalign.data.media import save_image
from flowalign.data.sources import open_source, register_source, registered_sources
from flowalign.toy.data import ToyDataset


def test_toy_specs_open_the_toy_world():
    assert registered_sources()["toy"] == ("toy:image", "toy:video")
    media = open_source("toy:image", "media", num=4, seed=3)
    reference = ToyDataset("train", kind="image", num=4, seed=3)
    assert len(media) == 4 and media[2]["prompt"] == reference[2]["prompt"]
    assert torch.equal(media[2]["pixels"], reference[2]["pixels"])
    clips = open_source("toy:video", "clips", num=2, size=16, num_frames=5)
    assert clips[0]["pixels"].shape == (5, 3, 16, 16)
    heldout = open_source("toy:image", "media", num=2, split="heldout")
    assert heldout[0]["prompt"] == ToyDataset("heldout", kind="image", num=2)[0]["prompt"]
    pairs = open_source("toy:image", "pairs", num=3, seed=1)
    assert len(pairs) == 3


def test_old_toy_spellings_work_or_name_the_new_one():
    old = open_source("toy:train", "media", kind="video", num=2, num_frames=3)  # the SFT spelling
    assert (
        old[0]["pixels"].shape[0] == 3
        and old[0]["prompt"] == ToyDataset("train", kind="video", num=2)[0]["prompt"]
    )
    with pytest.raises(DataError, match="toy:image or toy:video"):
        open_source("toy", "clips", num_frames=5, size=16)  # CDT's old source="toy"
    with pytest.raises(DataError, match="say which kind: toy:image or toy:video"):
        open_source("toy:train", "media")
    with pytest.raises(DataError, match="the run needs video data"):
        open_source("toy:image", "media", kind="video")
    with pytest.raises(DataError, match="unknown toy data"):
        open_source("toy:cats", "media")
    with pytest.raises(DataError, match="clips are toy:video"):
        open_source("toy:image", "clips")


def test_paths_open_by_what_the_caller_wants(tmp_path):
    g = torch.Generator().manual_seed(0)
    for name in ("a.png", "b.png"):
        save_image(torch.rand(3, 8, 8, generator=g), tmp_path / name)
    (tmp_path / "manifest.jsonl").write_text(json.dumps({"file": "a.png", "prompt": "a cat"}) + "\n")
    row = {"prompt": "a cat", "path_A": "a.png", "path_B": "b.png", "label": "B"}
    (tmp_path / "pairs.jsonl").write_text(json.dumps(row) + "\n")
    for spec in (tmp_path / "manifest.jsonl", tmp_path):  # the file, or the folder holding it
        media = open_source(spec, "media")
        assert isinstance(media, ManifestDataset) and media[0]["prompt"] == "a cat"
    pairs = open_source(str(tmp_path / "pairs.jsonl"), "pairs")
    assert isinstance(pairs, PairDataset) and torch.equal(pairs[0]["media_w"], pairs.pairs[0].media_w)
    with pytest.raises(DataError, match="does not exist"):
        open_source(tmp_path / "nowhere.jsonl", "media")
    with pytest.raises(DataError, match="read from a manifest.jsonl"):
        open_source(tmp_path / "a.png", "media")
    with pytest.raises(DataError, match="clips are read from a folder"):
        open_source(tmp_path / "a.png", "clips", num_frames=2, size=8)
    with pytest.raises(DataError, match="unknown data source scheme 'gs'"):
        open_source("gs:bucket/x", "media")
    with pytest.raises(DataError, match="hub datasets give preference pairs"):
        open_source("hf:someone/pairs", "media")
    with pytest.raises(ValueError, match="want must be one of"):
        open_source("toy:image", "videos")


def test_a_registered_scheme_opens_its_specs(monkeypatch):
    from flowalign.data import sources

    monkeypatch.setattr(sources, "_SCHEMES", dict(sources._SCHEMES))
    seen = []
    register_source(
        "mine", lambda name, want, **o: seen.append((name, want, o)) or [1, 2], examples=("mine:x",)
    )
    assert open_source("mine:x", "pairs", num=2) == [1, 2] and seen == [("x", "pairs", {"num": 2})]
    with pytest.raises(DataError, match="needs a name after 'mine:', e.g. mine:x"):
        open_source("mine:", "media")
    with pytest.raises(ValueError, match="plain name"):
        register_source("a:b", lambda *a: None, examples=())
