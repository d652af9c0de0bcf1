"""Tests for flowalign.data.preference: every layout, labels, collate, writer, and every bad input."""

from __future__ import annotations

import json
import pickle
import shutil
from pathlib import Path

import pyarrow as pa
import pyarrow.parquet as pq
import pytest
import torch
from torch.utils.data import DataLoader

from flowalign.data.errors import DataError
from flowalign.data.preference import (
    LABEL_L_BETTER,
    LABEL_MISSING,
    LABEL_TIE,
    LABEL_W_BETTER,
    OVERALL,
    PreferencePair,
    canonicalise_pair,
    collate_preference,
    load_preference_dataset,
    write_preference_jsonl,
)

IMG = [f"media/img{k}.png" for k in range(4)]


def _jsonl(path: Path, rows: list[dict]) -> Path:
    path.write_text("".join(json.dumps(r) + "\n" for r in rows), encoding="utf-8")
    return path


def _csv(path: Path, header: list[str], rows: list[list[str]]) -> Path:
    path.write_text("\n".join(",".join(r) for r in [header, *rows]) + "\n", encoding="utf-8")
    return path


def _pickapic(tmp_path: Path, images: dict, name: str = "pairs.parquet", labels=None, **cols) -> Path:
    labels = labels or [(1.0, 0.0), (0.0, 1.0), (0.5, 0.5)]
    n = len(labels)
    table = {
        "caption": cols.get("caption", [f"prompt {i}" for i in range(n)]),
        "jpg_0": cols.get("jpg_0", [(tmp_path / IMG[i % 4]).read_bytes() for i in range(n)]),
        "jpg_1": cols.get("jpg_1", [(tmp_path / IMG[(i + 1) % 4]).read_bytes() for i in range(n)]),
        "label_0": [a for a, _ in labels],
        "label_1": [b for _, b in labels],
    }
    out = tmp_path / name
    pq.write_table(pa.table(table), out)
    return out


# ----------------------------------------------------------------------------- label helpers


def test_canonicalise_pair_orders_and_flips() -> None:
    labels = {"VQ": LABEL_L_BETTER, "MQ": LABEL_W_BETTER, "TA": LABEL_TIE, "X": LABEL_MISSING}
    first, second, out = canonicalise_pair("a", "b", labels, order_by="VQ")
    assert (first, second) == ("b", "a")
    assert out == {"VQ": 1, "MQ": -1, "TA": 0, "X": -2}
    # already ordered (or tie / missing on order_by): nothing moves, and it is idempotent
    assert canonicalise_pair("b", "a", out, order_by="VQ") == ("b", "a", out)
    assert canonicalise_pair("a", "b", labels, order_by="TA") == ("a", "b", labels)


def test_canonicalise_pair_twice_swapped_is_consistent() -> None:
    for code in (LABEL_W_BETTER, LABEL_L_BETTER, LABEL_TIE):
        labels = {OVERALL: code}
        swapped = {OVERALL: -code if code != LABEL_TIE else code}
        w1, l1, o1 = canonicalise_pair("a", "b", labels, order_by=OVERALL)
        w2, l2, o2 = canonicalise_pair("b", "a", swapped, order_by=OVERALL)
        assert o1 == o2 and o1[OVERALL] in (LABEL_W_BETTER, LABEL_TIE)
        if code != LABEL_TIE:
            assert (w1, l1) == (w2, l2)


# ----------------------------------------------------------------------------- layouts


def test_jsonl_chosen_rejected(tmp_path: Path, images: dict) -> None:
    p = _jsonl(tmp_path / "pairs.jsonl", [{"prompt": " a cat ", "chosen": IMG[0], "rejected": IMG[1]}])
    ds = load_preference_dataset(p)
    assert len(ds) == 1 and ds.dimensions == (OVERALL,)
    pair = ds[0]
    assert pair.prompt == "a cat"
    assert torch.equal(pair.media_w, images[IMG[0]]) and torch.equal(pair.media_l, images[IMG[1]])
    assert pair.labels == {OVERALL: LABEL_W_BETTER}
    assert pair.source.endswith("pairs.jsonl line 1")


def test_jsonl_ab_labels_are_canonicalised(tmp_path: Path, images: dict) -> None:
    rows = [
        {"prompt": "p0", "path_A": IMG[0], "path_B": IMG[1], "label": "A"},
        {"prompt": "p1", "path_A": IMG[0], "path_B": IMG[1], "label": "b"},
        {"prompt": "p2", "path_A": IMG[2], "path_B": IMG[3], "label": "tie", "meta": {"seed": 3}},
    ]
    ds = load_preference_dataset(_jsonl(tmp_path / "pairs.jsonl", rows))
    assert torch.equal(ds[0].media_w, images[IMG[0]]) and ds[0].labels == {OVERALL: 1}
    assert torch.equal(ds[1].media_w, images[IMG[1]]) and ds[1].labels == {OVERALL: 1}  # B won -> swapped
    assert torch.equal(ds[2].media_w, images[IMG[2]]) and ds[2].labels == {OVERALL: 0}  # tie keeps order
    assert ds[2].meta == {"seed": 3}
    assert ds.validate() == 3


def test_jsonl_per_dimension_labels(tmp_path: Path, images: dict) -> None:
    rows = [
        {"prompt": "p", "path_A": IMG[0], "path_B": IMG[1], "label": {"VQ": "B", "MQ": "same", "TA": None}},
        {"prompt": "q", "path_A": IMG[2], "path_B": IMG[3], "label": {"VQ": "A", "MQ": "B", "TA": "tie"}},
    ]
    p = _jsonl(tmp_path / "pairs.jsonl", rows)
    ds = load_preference_dataset(p)
    assert ds.dimensions == ("VQ", "MQ", "TA") and ds.order_by is None
    assert torch.equal(ds[0].media_w, images[IMG[0]])  # multi-dim: A stays w
    assert ds[0].labels == {"VQ": -1, "MQ": 0, "TA": -2}
    by_vq = load_preference_dataset(p, order_by="VQ")
    assert torch.equal(by_vq[0].media_w, images[IMG[1]])
    assert by_vq[0].labels == {"VQ": 1, "MQ": 0, "TA": -2}


def test_videoalign_csv_with_videos(tmp_path: Path, videos: dict) -> None:
    vids = list(videos)
    header = ["path_A", "path_B", "prompt", "VQ", "MQ", "TA", "fps_A", "num_frames_A"]
    rows = [
        [f"./{vids[0]}", vids[1], "a dog runs", "A", "B", "same", "8", "3"],
        [vids[2], vids[3], "a cat jumps", "", "Tie", "B", "8", "3"],
    ]
    ds = load_preference_dataset(_csv(tmp_path / "data.csv", header, rows))
    assert ds.dimensions == ("VQ", "MQ", "TA")
    assert ds[0].labels == {"VQ": 1, "MQ": -1, "TA": 0}
    assert ds[1].labels == {"VQ": -2, "MQ": 0, "TA": -1}
    assert torch.equal(ds[0].media_w, videos[vids[0]]) and torch.equal(ds[1].media_l, videos[vids[3]])
    assert ds[0].media_w.shape == (3, 3, 8, 8)
    assert load_preference_dataset(tmp_path / "data.csv", max_frames=2)[0].media_w.shape == (2, 3, 8, 8)
    only = load_preference_dataset(tmp_path / "data.csv", dimensions=["TA"])
    assert only.dimensions == ("TA",) and only[1].labels == {"TA": 1}  # single dim -> canonicalised


def test_tsv_single_label_column(tmp_path: Path, images: dict) -> None:
    p = tmp_path / "d.tsv"
    p.write_text(f"prompt\tpath_A\tpath_B\tlabel\nx\t{IMG[0]}\t{IMG[1]}\tB\n", encoding="utf-8")
    ds = load_preference_dataset(p)
    assert ds.dimensions == (OVERALL,) and torch.equal(ds[0].media_w, images[IMG[1]])


def test_pickapic_parquet_bytes(tmp_path: Path, images: dict) -> None:
    ds = load_preference_dataset(_pickapic(tmp_path, images))
    assert len(ds) == 3 and ds.validate() == 3
    assert torch.equal(ds[0].media_w, images[IMG[0]]) and ds[0].labels == {OVERALL: 1}
    assert torch.equal(ds[1].media_w, images[IMG[2]]) and torch.equal(ds[1].media_l, images[IMG[1]])
    assert ds[2].labels == {OVERALL: LABEL_TIE}
    assert ds[1].source.endswith("pairs.parquet row 1")


def test_pickapic_parquet_paths_and_shards(tmp_path: Path, images: dict) -> None:
    folder = tmp_path / "shards"
    folder.mkdir()
    shutil.copytree(tmp_path / "media", folder / "media")
    for k in range(2):
        table = {
            "caption": [f"s{k} r{r}" for r in range(2)],
            "image_0_path": [IMG[r] for r in range(2)],
            "image_1_path": [IMG[r + 2] for r in range(2)],
            "label_0": [0.0, 1.0],
            "label_1": [1.0, 0.0],
        }
        pq.write_table(pa.table(table), folder / f"train-{k:05d}.parquet", row_group_size=1)
    ds = load_preference_dataset(folder)
    assert len(ds) == 4
    assert [ds[i].prompt for i in range(4)] == ["s0 r0", "s0 r1", "s1 r0", "s1 r1"]
    assert torch.equal(ds[2].media_w, images[IMG[2]])  # (0, 1): image 1 better
    assert ds[3].source.endswith("shards train-00001.parquet row 1")


def test_hf_save_to_disk(tmp_path: Path, images: dict) -> None:
    datasets = pytest.importorskip("datasets", reason="the HF datasets package is an optional extra")
    ds_hf = (
        datasets.Dataset.from_dict(
            {
                "caption": ["a", "b"],
                "jpg_0": [str(tmp_path / IMG[0]), str(tmp_path / IMG[2])],
                "jpg_1": [str(tmp_path / IMG[1]), str(tmp_path / IMG[3])],
                "label_0": [0.0, 0.5],
                "label_1": [1.0, 0.5],
            }
        )
        .cast_column("jpg_0", datasets.Image())
        .cast_column("jpg_1", datasets.Image())
    )
    ds_hf.save_to_disk(str(tmp_path / "hf"))
    ds = load_preference_dataset(tmp_path / "hf")
    assert len(ds) == 2
    assert torch.equal(ds[0].media_w, images[IMG[1]]) and ds[1].labels == {OVERALL: 0}
    assert ds.validate() == 2


# ----------------------------------------------------------------------------- options


def test_parquet_dataset_pickles_after_use(tmp_path: Path, images: dict) -> None:
    ds = load_preference_dataset(_pickapic(tmp_path, images))
    ds.validate()  # opens the file and fills the row-group cache
    clone = pickle.loads(pickle.dumps(ds))
    assert len(clone) == 3 and torch.equal(clone[1].media_w, ds[1].media_w)


def test_keep_ties_false_drops_ties(tmp_path: Path, images: dict) -> None:
    ds = load_preference_dataset(_pickapic(tmp_path, images), keep_ties=False)
    assert len(ds) == 2
    assert all(ds[i].labels[OVERALL] == LABEL_W_BETTER for i in range(len(ds)))


def test_transform_is_applied(tmp_path: Path, images: dict) -> None:
    ds = load_preference_dataset(_pickapic(tmp_path, images), transform=lambda x: x[:, :4, :4])
    assert ds[0].media_w.shape == (3, 4, 4) and ds[0].media_l.shape == (3, 4, 4)


def test_order_by_must_be_a_dimension(tmp_path: Path, images: dict) -> None:
    with pytest.raises(ValueError, match="order_by='VQ'"):
        load_preference_dataset(_pickapic(tmp_path, images), order_by="VQ")


# ----------------------------------------------------------------------------- collate


def test_collate_stacks_and_encodes_labels(tmp_path: Path, images: dict) -> None:
    ds = load_preference_dataset(_pickapic(tmp_path, images))
    batch = next(iter(DataLoader(ds, batch_size=3, collate_fn=collate_preference)))
    assert batch["prompt"] == ["prompt 0", "prompt 1", "prompt 2"]
    assert batch["media_w"].shape == (3, 3, 8, 8) and batch["media_l"].shape == (3, 3, 8, 8)
    assert batch["labels"][OVERALL].dtype == torch.long
    assert batch["labels"][OVERALL].tolist() == [1, 1, 0]
    assert torch.equal(batch["media_w"][1], ds[1].media_w)


def test_collate_videos_and_missing(make_video) -> None:
    pairs = [
        PreferencePair("a", make_video(0), make_video(1), {"VQ": 1, "TA": -2}),
        PreferencePair("b", make_video(2), make_video(3), {"VQ": -1, "TA": 0}),
    ]
    batch = collate_preference(pairs)
    assert batch["media_w"].shape == (2, 3, 3, 8, 8)
    assert batch["labels"]["TA"].tolist() == [-2, 0] and batch["labels"]["VQ"].tolist() == [1, -1]


def test_collate_refuses_mixed_shapes_and_dims(make_image) -> None:
    a = PreferencePair("a", make_image(0), make_image(1), {OVERALL: 1}, source="f row 0")
    b = PreferencePair("b", make_image(2, 4, 4), make_image(3, 4, 4), {OVERALL: 1}, source="f row 1")
    with pytest.raises(ValueError, match=r"f row 1: media_w has shape \(3, 4, 4\)"):
        collate_preference([a, b])
    c = PreferencePair("c", make_image(2), make_image(3), {"VQ": 1}, source="f row 2")
    with pytest.raises(ValueError, match="f row 2: label dimensions"):
        collate_preference([a, c])
    with pytest.raises(ValueError, match="no pairs"):
        collate_preference([])


# ----------------------------------------------------------------------------- writer


def test_write_preference_jsonl_round_trip(tmp_path: Path, make_image, make_video) -> None:
    pairs = [
        PreferencePair("img pair", make_image(0), make_image(1), {OVERALL: 1}, meta={"reward_w": 0.7}),
        {"prompt": "tie pair", "media_w": make_image(2), "media_l": make_image(3), "labels": {OVERALL: 0}},
    ]
    out = write_preference_jsonl(tmp_path / "out", pairs)
    ds = load_preference_dataset(out)
    assert len(ds) == 2 and ds.validate(decode=True) == 2
    assert torch.equal(ds[0].media_w, pairs[0].media_w) and torch.equal(ds[0].media_l, pairs[0].media_l)
    assert ds[0].meta == {"reward_w": 0.7} and ds[1].labels == {OVERALL: 0}
    assert json.loads(out.read_text().splitlines()[1])["label"] == "tie"

    vids = [PreferencePair("v", make_video(0), make_video(1), {"VQ": 1, "MQ": -1, "TA": -2})]
    out_v = write_preference_jsonl(tmp_path / "vid", vids, video_ext=".npy")
    ds_v = load_preference_dataset(out_v)
    assert ds_v.dimensions == ("VQ", "MQ", "TA")
    assert torch.equal(ds_v[0].media_w, vids[0].media_w) and ds_v[0].labels == vids[0].labels


def test_write_refuses_existing_and_bad_rows(tmp_path: Path, make_image) -> None:
    good = PreferencePair("p", make_image(0), make_image(1), {OVERALL: 1})
    out = write_preference_jsonl(tmp_path / "o", [good])
    with pytest.raises(FileExistsError):
        write_preference_jsonl(tmp_path / "o", [good])
    before = out.read_text()
    bad = {"prompt": " ", "media_w": make_image(0), "media_l": make_image(1)}
    with pytest.raises(DataError, match="row 1: prompt must be a non-empty string"):
        write_preference_jsonl(tmp_path / "o", [good, bad], overwrite=True)
    assert out.read_text() == before  # the old jsonl survives a failed write
    with pytest.raises(DataError, match="row 0: labels must map"):
        write_preference_jsonl(tmp_path / "n", [{**bad, "prompt": "x", "labels": {OVERALL: 5}}])
    assert not (tmp_path / "n" / "pairs.jsonl").exists()
    with pytest.raises(DataError, match="no rows"):
        write_preference_jsonl(tmp_path / "e", [])


# ----------------------------------------------------------------------------- bad input


def _bad_jsonl(tmp_path: Path, row: dict) -> Path:
    good = {"prompt": "ok", "path_A": IMG[0], "path_B": IMG[1], "label": "A"}
    return _jsonl(tmp_path / "pairs.jsonl", [good, {**good, **row}])


def _assert_row_error(path: Path, match: str, where: str = "line 2") -> None:
    ds = load_preference_dataset(path)
    assert ds[0].prompt  # lazy: other rows still load
    with pytest.raises(DataError, match=match) as exc:
        ds[1]
    assert str(exc.value).startswith(f"{path}: {where}: ")
    with pytest.raises(DataError, match=match) as exc:
        ds.validate()
    assert "1 of 2 rows are invalid" in str(exc.value) and f"{where}: " in str(exc.value)


def test_missing_prompt_column(tmp_path: Path, images: dict) -> None:
    p = _jsonl(tmp_path / "pairs.jsonl", [{"text": "x", "chosen": IMG[0], "rejected": IMG[1]}])
    with pytest.raises(DataError, match="missing prompt column") as exc:
        load_preference_dataset(p)
    assert str(p) in str(exc.value)
    c = _csv(tmp_path / "d.csv", ["path_A", "path_B", "VQ"], [[IMG[0], IMG[1], "A"]])
    with pytest.raises(DataError, match=r"d\.csv: missing prompt column"):
        load_preference_dataset(c)


def test_empty_prompt(tmp_path: Path, images: dict) -> None:
    _assert_row_error(_bad_jsonl(tmp_path, {"prompt": "   "}), "empty prompt")


def test_missing_file(tmp_path: Path, images: dict) -> None:
    _assert_row_error(
        _bad_jsonl(tmp_path, {"path_B": "media/gone.png"}), r"path_B: file .*gone\.png does not exist"
    )


def test_same_path_twice(tmp_path: Path, images: dict) -> None:
    _assert_row_error(_bad_jsonl(tmp_path, {"path_B": f"./{IMG[0]}"}), "path_A and path_B are the same file")


def test_identical_bytes(tmp_path: Path, images: dict) -> None:
    shutil.copy(tmp_path / IMG[0], tmp_path / "media/copy.png")
    _assert_row_error(_bad_jsonl(tmp_path, {"path_B": "media/copy.png"}), "identical bytes")


def test_label_outside_set_jsonl(tmp_path: Path, images: dict) -> None:
    _assert_row_error(
        _bad_jsonl(tmp_path, {"label": "C"}), r"label 'overall' = 'C', expected one of A, B, tie"
    )


def test_numeric_label_refused(tmp_path: Path, images: dict) -> None:
    _assert_row_error(_bad_jsonl(tmp_path, {"label": 1}), "label 'overall' = 1")


def test_missing_single_label(tmp_path: Path, images: dict) -> None:
    _assert_row_error(_bad_jsonl(tmp_path, {"label": None}), "missing label")


def test_label_outside_set_csv(tmp_path: Path, images: dict) -> None:
    header = ["prompt", "path_A", "path_B", "VQ", "MQ", "TA"]
    p = _csv(
        tmp_path / "d.csv",
        header,
        [["a", IMG[0], IMG[1], "A", "B", ""], ["b", IMG[2], IMG[3], "A", "maybe", "B"]],
    )
    _assert_row_error(p, r"label 'MQ' = 'maybe'", where="line 3")


def test_all_dimensions_missing_csv(tmp_path: Path, images: dict) -> None:
    header = ["prompt", "path_A", "path_B", "VQ", "MQ", "TA"]
    p = _csv(
        tmp_path / "d.csv", header, [["a", IMG[0], IMG[1], "A", "", ""], ["b", IMG[2], IMG[3], "", "", ""]]
    )
    _assert_row_error(p, "all empty", where="line 3")


def test_unknown_dimension_in_label_object(tmp_path: Path, images: dict) -> None:
    good = {"prompt": "ok", "path_A": IMG[0], "path_B": IMG[1], "label": {"VQ": "A"}}
    p = _jsonl(tmp_path / "pairs.jsonl", [good, {**good, "label": {"VQ": "A", "XX": "B"}}])
    _assert_row_error(p, r"unknown dimensions \['XX'\]")


def test_label_outside_set_parquet(tmp_path: Path, images: dict) -> None:
    p = _pickapic(tmp_path, images, labels=[(1.0, 0.0), (0.0, 0.0)])
    _assert_row_error(p, r"label_0/label_1 = \(0\.0, 0\.0\), expected", where="row 1")
    with pytest.raises(DataError, match="row 1: label_0/label_1"):
        load_preference_dataset(p, keep_ties=False)  # labels are parsed upfront then


def test_parquet_identical_and_empty_bytes(tmp_path: Path, images: dict) -> None:
    same = (tmp_path / IMG[0]).read_bytes()
    p = _pickapic(tmp_path, images, labels=[(1.0, 0.0), (1.0, 0.0)], jpg_0=[same, same], jpg_1=[b"x", same])
    ds = load_preference_dataset(p)
    with pytest.raises(DataError, match=r"row 1: jpg_0 and jpg_1 have identical bytes"):
        ds[1]
    q = _pickapic(tmp_path, images, name="q.parquet", labels=[(1.0, 0.0)], jpg_1=[b""])
    with pytest.raises(DataError, match=r"q\.parquet: row 0: jpg_1: image bytes are empty"):
        load_preference_dataset(q)[0]


def test_corrupt_image_bytes_name_row(tmp_path: Path, images: dict) -> None:
    p = _pickapic(tmp_path, images, labels=[(1.0, 0.0)], jpg_1=[b"not an image"])
    ds = load_preference_dataset(p)
    assert ds.validate() == 1  # structure is fine; only decoding finds it
    with pytest.raises(DataError, match=r"pairs\.parquet: row 0: jpg_1: cannot decode image"):
        ds[0]
    with pytest.raises(
        DataError, match=r"pairs\.parquet: 1 of 1 rows are invalid:\n  row 0: jpg_1: cannot decode"
    ):
        ds.validate(decode=True)


def test_corrupt_media_file_names_row_and_file(tmp_path: Path, images: dict) -> None:
    (tmp_path / "media/bad.png").write_bytes(b"junk" * 10)
    p = _bad_jsonl(tmp_path, {"path_B": "media/bad.png"})
    ds = load_preference_dataset(p)
    with pytest.raises(DataError, match=r"line 2: path_B: .*bad\.png: cannot decode"):
        ds[1]


def test_path_with_dotdot_refused(tmp_path: Path, images: dict) -> None:
    sub = tmp_path / "sub"
    sub.mkdir()
    good = {"prompt": "ok", "path_A": f"../{IMG[0]}", "path_B": f"../{IMG[1]}", "label": "A"}
    p = _jsonl(sub / "pairs.jsonl", [good])
    with pytest.raises(DataError, match=r"line 1: path_A '\.\./media/img0\.png' contains '\.\.'"):
        load_preference_dataset(p)[0]
    with pytest.raises(DataError, match="contains '..'"):  # refused even when the target is under root
        load_preference_dataset(p, root=tmp_path)[0]


def test_absolute_path_outside_root_refused(tmp_path: Path, images: dict) -> None:
    outside = tmp_path / "outside.png"
    shutil.copy(tmp_path / IMG[0], outside)
    sub = tmp_path / "sub"
    sub.mkdir()
    shutil.copytree(tmp_path / "media", sub / "media")
    ok = {"prompt": "ok", "path_A": str(sub / IMG[0]), "path_B": IMG[1], "label": "A"}
    p = _jsonl(sub / "pairs.jsonl", [ok, {**ok, "path_A": str(outside)}])
    _assert_row_error(p, r"path_A .*outside\.png' is outside the dataset root")


def test_missing_media_and_label_columns(tmp_path: Path, images: dict) -> None:
    p = _jsonl(tmp_path / "a.jsonl", [{"prompt": "x", "path_A": IMG[0], "label": "A"}])
    with pytest.raises(DataError, match=r"a\.jsonl: missing media column 'path_B'"):
        load_preference_dataset(p)
    q = _csv(tmp_path / "b.csv", ["prompt", "path_A", "path_B"], [["x", IMG[0], IMG[1]]])
    with pytest.raises(DataError, match=r"b\.csv: missing label columns"):
        load_preference_dataset(q)


def test_unreadable_dataset_files(tmp_path: Path) -> None:
    (tmp_path / "e.jsonl").touch()
    with pytest.raises(DataError, match=r"e\.jsonl: file is empty"):
        load_preference_dataset(tmp_path / "e.jsonl")
    (tmp_path / "j.jsonl").write_text('{"prompt": "a"}\n{oops\n')
    with pytest.raises(DataError, match=r"j\.jsonl: line 2: invalid JSON"):
        load_preference_dataset(tmp_path / "j.jsonl")
    (tmp_path / "x.parquet").write_bytes(b"not parquet at all")
    with pytest.raises(DataError, match=r"x\.parquet: cannot read parquet"):
        load_preference_dataset(tmp_path / "x.parquet")
    (tmp_path / "d.yaml").write_text("a: 1")
    with pytest.raises(DataError, match="unsupported dataset format"):
        load_preference_dataset(tmp_path / "d.yaml")
    with pytest.raises(DataError, match="does not exist"):
        load_preference_dataset(tmp_path / "nope.jsonl")


def test_validate_lists_every_bad_row(tmp_path: Path, images: dict) -> None:
    good = {"prompt": "ok", "path_A": IMG[0], "path_B": IMG[1], "label": "A"}
    rows = [good, {**good, "prompt": ""}, good, {**good, "label": "Z"}, {**good, "path_A": "media/none.png"}]
    ds = load_preference_dataset(_jsonl(tmp_path / "pairs.jsonl", rows))
    with pytest.raises(DataError) as exc:
        ds.validate(max_errors=2)
    msg = str(exc.value)
    assert msg.startswith(f"{tmp_path / 'pairs.jsonl'}: 3 of 5 rows are invalid")
    assert "line 2: empty prompt" in msg and "line 4: label" in msg and "and 1 more" in msg
