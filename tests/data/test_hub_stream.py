"""hf:<id>?streaming=1&rows=N: the first rows streamed (datasets' streaming mode, offline on a local
parquet dataset) into a local row cache that later opens give back in the same order."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
from conftest import colour_image

from flowalign.data import hub_stream
from flowalign.data.errors import DataError
from flowalign.data.items import PairDataset
from flowalign.data.media import save_image
from flowalign.data.preference import load_preference_dataset
from flowalign.data.sources import open_source

datasets = pytest.importorskip("datasets", reason="the HF datasets package is the data extra")

N = 5


@pytest.fixture
def repo(tmp_path: Path, monkeypatch) -> Path:
    """A local dataset repository of N Pick-a-Pic-style rows (one parquet shard), and a stream cache."""
    monkeypatch.setenv("FLOWALIGN_STREAM_CACHE", str(tmp_path / "cache"))
    folder = tmp_path / "repo"
    (folder / "data").mkdir(parents=True)
    png = []
    for k in range(N + 1):
        save_image(colour_image(k, 8, 8), tmp_path / f"i{k}.png")
        png.append((tmp_path / f"i{k}.png").read_bytes())
    ds = datasets.Dataset.from_dict(
        {
            "caption": [f"prompt {k}" for k in range(N)],
            "jpg_0": png[:N],
            "jpg_1": png[1:],
            "label_0": [1.0, 0.0, 1.0, 0.5, 0.0],
            "label_1": [0.0, 1.0, 0.0, 0.5, 1.0],
        }
    )
    ds.to_parquet(str(folder / "data" / "train-00000-of-00001.parquet"))
    return folder


def test_streamed_rows_equal_the_first_rows_of_the_full_load_and_are_cached(repo, monkeypatch):
    monkeypatch.setattr(hub_stream, "SHARD_ROWS", 2)  # three rows -> shards of 2 and 1
    calls = []
    load = datasets.load_dataset

    def recording_load(*args, **kwargs):
        calls.append(kwargs)
        return load(*args, **kwargs)

    monkeypatch.setattr(datasets, "load_dataset", recording_load)
    full = load_preference_dataset(f"hf:{repo}")
    streamed = load_preference_dataset(f"hf:{repo}?streaming=1&rows=3")
    assert [c.get("streaming", False) for c in calls] == [False, True]
    assert len(streamed) == 3
    for i in range(3):
        a, b = full[i], streamed[i]
        assert a.prompt == b.prompt and a.labels == b.labels
        assert torch.equal(a.media_w, b.media_w) and torch.equal(a.media_l, b.media_l)
    (folder,) = [p for p in (repo.parent / "cache").iterdir()]
    assert sorted(p.name for p in folder.glob("*.parquet")) == [
        "rows-000000000.parquet",
        "rows-000000002.parquet",
    ]

    def offline(*args, **kwargs):
        raise AssertionError("a complete cache is read without streaming again")

    monkeypatch.setattr(datasets, "load_dataset", offline)
    again = PairDataset(f"hf:{repo}?streaming=1&rows=3")  # ties dropped (none in the first 3 rows)
    assert [again[i]["prompt"] for i in range(len(again))] == [f"prompt {k}" for k in range(3)]
    assert torch.equal(again[1]["media_w"], streamed[1].media_w)


def test_all_rows_and_ties_dropped_by_the_pair_dataset(repo):
    pairs = open_source(f"hf:{repo}?streaming=true", "pairs")  # a run's ``data:`` spec
    assert len(pairs) == N - 1  # the one tie (row 3) is dropped as for the non-streamed reader
    assert pairs.prompts() == ["prompt 0", "prompt 1", "prompt 2", "prompt 4"]


@pytest.mark.parametrize(
    ("query", "message"),
    [
        ("rows=3", "need streaming=1"),
        ("streaming=1&rows=0", "rows must be a positive integer"),
        ("streaming=1&shuffle=1", "unknown option 'shuffle=1'"),
        ("streaming=1&split=test", "cannot stream"),
    ],
)
def test_bad_stream_options_name_the_spec(repo, query, message):
    with pytest.raises(DataError, match=message) as err:
        load_preference_dataset(f"hf:{repo}?{query}")
    assert str(err.value).startswith(f"hf:{repo}")
