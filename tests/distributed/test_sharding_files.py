"""The part files, merge and ownership rules of ``flowalign.sharding`` (one process, no launcher)."""

from __future__ import annotations

import json

import pytest
import torch

from flowalign.files import exclusive_lock
from flowalign.sharding import Shard, local_device, lock_path, merge_parts, part_path, part_paths, read_rows


def _write(path, ids, tag="x", tail=""):
    path.write_text("".join(json.dumps({"id": i, "tag": tag}) + "\n" for i in ids) + tail)


@pytest.mark.parametrize(("world", "block"), [(1, 1), (2, 1), (2, 4), (3, 2), (8, 16)])
def test_every_item_has_exactly_one_owner_and_blocks_stay_together(world, block):
    n = 2 * world * block + 3  # every rank gets two blocks, one a partial third
    owners = [[r for r in range(world) if Shard(r, world).owns(i, block)] for i in range(n)]
    assert all(len(o) == 1 for o in owners)
    assert all(owners[i] == owners[(i // block) * block] for i in range(n))  # a batch is not split
    counts = [sum(o == [r] for o in owners) for r in range(world)]
    assert min(counts) >= 2 * block and sum(counts) == n


def test_part_names_and_their_order(tmp_path):
    out = tmp_path / "scores.jsonl"
    assert part_path(out, 3).name == "scores.rank3.jsonl"
    for rank in (10, 2, 0):
        part_path(out, rank).write_text("")
    (tmp_path / "scores.rankx.jsonl").write_text("")  # not a part
    assert [p.name for p in part_paths(out)] == [
        "scores.rank0.jsonl",
        "scores.rank2.jsonl",
        "scores.rank10.jsonl",
    ]


def test_merge_keeps_each_id_once_in_order_and_removes_the_parts(tmp_path):
    out = tmp_path / "manifest.jsonl"
    _write(out, ["000000", "000003"], "main")
    _write(part_path(out, 0), ["000001", "000003"], "p0")  # 000003 is already merged
    _write(part_path(out, 1), ["000004", "000002"], "p1", tail='{"id": "0000')  # a row cut by a kill
    assert merge_parts(out) == 3
    rows = read_rows(out)
    assert [r["id"] for r in rows] == ["000000", "000001", "000002", "000003", "000004"]
    assert [r["tag"] for r in rows if r["id"] == "000003"] == ["main"]
    assert not part_paths(out) and merge_parts(out) == 0


def test_merge_skips_a_part_that_is_being_written(tmp_path):
    out = tmp_path / "manifest.jsonl"
    _write(part_path(out, 0), [1])
    _write(part_path(out, 1), [2])
    with exclusive_lock(lock_path(part_path(out, 1))):  # its writer is still at work
        assert merge_parts(out, order=lambda r: r["id"]) == 1
    assert [r["id"] for r in read_rows(out)] == [1] and part_paths(out) == [part_path(out, 1)]
    assert merge_parts(out, order=lambda r: r["id"]) == 1
    assert [r["id"] for r in read_rows(out)] == [1, 2]


def test_a_bad_line_that_is_not_the_last_is_named(tmp_path):
    path = tmp_path / "m.jsonl"
    path.write_text('{"id": 1}\nnot json\n{"id": 2}\n')
    with pytest.raises(ValueError, match="line 2"):
        read_rows(path)


def test_cuda_means_this_process_gpu(monkeypatch):
    monkeypatch.setattr(torch.cuda, "device_count", lambda: 4)
    monkeypatch.delenv("WORLD_SIZE", raising=False)
    assert local_device("cuda") == "cuda"
    monkeypatch.setenv("WORLD_SIZE", "8")
    monkeypatch.setenv("LOCAL_RANK", "5")
    assert local_device("cuda") == "cuda:1"  # 8 processes on 4 GPUs: two per GPU
    assert local_device("cuda:0") == "cuda:0" and local_device("cpu") == "cpu"
    monkeypatch.setattr(torch.cuda, "device_count", lambda: 0)
    assert local_device("cuda") == "cuda"  # no GPU: left for torch to refuse
