"""Fuzzed tabular inputs: preference rows (jsonl, csv, parquet), RWR candidates, manifests, prompt files.

Rows get missing fields, wrong types, huge strings, unicode, NaN/inf numbers, escaping or absolute
paths, missing or corrupt media. Every case must load, or end in one ``DataError`` (a ValueError)
whose message starts with the file and, for a bad row, names the row (``line N`` / ``row N``). Any
other exception (KeyError, TypeError, a pyarrow or PIL error) fails the test.
"""

from __future__ import annotations

import csv
import json
import math
import re
import tempfile
from pathlib import Path
from typing import Any

import pytest
import rel_summary
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from flowalign.data.errors import DataError
from flowalign.data.media import save_image
from flowalign.data.preference import load_preference_dataset
from flowalign.data.prompts import load_prompts

CI = settings.get_profile("flowalign-ci")
SLOW = settings.get_profile("flowalign-slow")

# --------------------------------------------------------------------------------------------- values

MISSING = object()  # the key is left out of the row


def _png_bytes() -> bytes:
    import io

    from PIL import Image

    buf = io.BytesIO()
    Image.new("RGB", (8, 8), (200, 10, 10)).save(buf, format="PNG")
    return buf.getvalue()


PNG = _png_bytes()  # an 8x8 red square

texts = st.one_of(
    st.text(max_size=40),
    st.sampled_from(
        ["", "   ", "a red circle", "ünïcødé ✓ 🚀 中文", "<script>alert(1)</script>", "\x00\n\t"]
    ),
    st.integers(1, 3).map(lambda k: "x" * (10**5 * k)),  # huge strings
)
numbers = st.one_of(
    st.integers(-(2**70), 2**70),
    st.sampled_from([float("nan"), float("inf"), -float("inf"), 0.5, 1, 0, 1.0, 0.0]),
    st.floats(allow_nan=True, allow_infinity=True),
)
junk = st.one_of(
    st.just(MISSING), st.none(), st.booleans(), numbers, st.lists(st.integers(), max_size=3),
    st.dictionaries(st.text(max_size=5), st.integers(), max_size=3),
)  # fmt: skip
present = junk.filter(lambda v: v is not MISSING)  # junk that can sit inside a nested object
# media references: files in the data root (good, corrupt, empty, wrong extension), escapes, absolute paths
paths = st.sampled_from(
    ["a.png", "b.png", "corrupt.png", "empty.png", "not_an_image.txt", "jpeg_named.png", "sub/c.png",
     "missing.png", "../outside.png", "sub/../../outside.png", "/etc/passwd", "OUTSIDE_ABS", "./a.png", "sub"]
)  # fmt: skip
labels = st.one_of(
    st.sampled_from(["A", "B", "tie", "same", "a", " b ", "TIE", "x", "", "A,B"]),
    st.dictionaries(st.sampled_from(["VQ", "MQ", "TA", "overall", "??"]),
                    st.sampled_from(["A", "B", "tie", None, "x", 1]), max_size=4),
    junk,
)  # fmt: skip


def _root(tmp: Path) -> Path:
    """A dataset folder with the media the rows may name, and a file outside it."""
    root = tmp / "data"
    (root / "sub").mkdir(parents=True)
    g = torch.Generator().manual_seed(0)
    save_image(torch.rand(3, 8, 8, generator=g), root / "a.png")
    save_image(torch.rand(3, 8, 8, generator=g), root / "b.png")
    save_image(torch.rand(3, 8, 8, generator=g), root / "sub" / "c.png")
    save_image(torch.rand(3, 8, 8, generator=g), root / "jpeg_named.jpg")
    (root / "jpeg_named.png").write_bytes((root / "jpeg_named.jpg").read_bytes().replace(b"PNG", b"PNX", 1))
    (root / "corrupt.png").write_bytes((root / "a.png").read_bytes()[:40])
    (root / "empty.png").write_bytes(b"")
    (root / "not_an_image.txt").write_text("hello")
    save_image(torch.rand(3, 8, 8, generator=g), tmp / "outside.png")
    return root


def _value(v: Any, tmp: Path) -> Any:
    return str(tmp / "outside.png") if v == "OUTSIDE_ABS" else v


def _check_outcome(path: Path, load) -> str:
    """Run ``load``; returns "ok" or "error", failing on anything but a ValueError (DataError or a
    plain one) whose message starts with the file and names a line/row/item where it has a location."""
    try:
        load()
    except ValueError as err:
        message = str(err)
        assert message.startswith(str(path)), f"the error does not start with the file: {message[:300]}"
        if isinstance(err, DataError) and err.where is not None:
            assert re.search(r"\b(line|row|item) \d+", err.where), err.where
        return "error"
    return "ok"


def _load_all(path: Path, **kw) -> None:
    ds = load_preference_dataset(path, **kw)
    ds.validate(decode=True)
    for i in range(len(ds)):
        pair = ds[i]
        assert torch.isfinite(pair.media_w).all() and pair.prompt.strip()


# --------------------------------------------------------------------------------------------- preference rows


def _mutate(draw, row: dict, bad: dict[str, Any]) -> dict:
    """Replace 0-2 fields of a valid row by fuzzed values (0 mutations a third of the time), or drop one."""
    for _ in range(draw(st.sampled_from([0, 0, 1, 1, 2]))):
        key = draw(st.sampled_from(sorted(row)))
        if draw(st.integers(0, 4)) == 0:
            row.pop(key)  # a missing field
        else:
            row[key] = draw(bad.get(key, junk))
    return row


@st.composite
def preference_rows(draw) -> list[dict]:
    layout = draw(st.sampled_from(["path_label", "chosen", "columns"]))
    media_bad = st.one_of(paths, junk)
    rows = []
    for _ in range(draw(st.integers(1, 3))):
        prompt = draw(st.sampled_from(["a red circle", "ünïcødé ✓ 🚀 中文", "<b>bold</b>", "x" * 5000]))
        a, b = draw(st.sampled_from([("a.png", "b.png"), ("b.png", "sub/c.png"), ("./a.png", "sub/c.png")]))
        if layout == "chosen":
            row = {"prompt": prompt, "chosen": a, "rejected": b}
            bad = {"prompt": st.one_of(texts, junk), "chosen": media_bad, "rejected": media_bad}
        elif layout == "path_label":
            label = draw(st.sampled_from(["A", "B", "tie", "same", " b ", {"VQ": "A", "TA": None}]))
            row = {"prompt": prompt, "path_A": a, "path_B": b, "label": label}
            bad = {
                "prompt": st.one_of(texts, junk),
                "path_A": media_bad,
                "path_B": media_bad,
                "label": labels,
            }
        else:
            row = {"prompt": prompt, "path_A": a, "path_B": b, "VQ": "A", "MQ": "same", "TA": ""}
            bad = {"prompt": st.one_of(texts, junk), "path_A": media_bad, "path_B": media_bad}
        rows.append(_mutate(draw, row, bad))
    return rows


def _write_jsonl(rows: list[dict], path: Path, tmp: Path) -> None:
    lines = [json.dumps({k: _value(v, tmp) for k, v in r.items() if v is not MISSING}) for r in rows]
    path.write_text("\n".join(lines) + "\n", encoding="utf-8")


def _write_csv(rows: list[dict], path: Path, tmp: Path) -> None:
    header = list(dict.fromkeys(k for r in rows for k in r))
    with open(path, "w", newline="", encoding="utf-8") as fh:
        writer = csv.writer(fh)
        writer.writerow(header)
        for r in rows:
            writer.writerow(
                ["" if r.get(k, MISSING) in (MISSING, None) else _value(r[k], tmp) for k in header]
            )


def _run_preference_case(rows: list[dict], fmt: str) -> str:
    with tempfile.TemporaryDirectory() as d:
        tmp = Path(d)
        root = _root(tmp)
        path = root / f"pairs.{fmt}"
        (_write_jsonl if fmt == "jsonl" else _write_csv)(rows, path, tmp)
        outcome = _check_outcome(path, lambda: _load_all(path))
    rel_summary.count("fuzz", f"preference rows ({fmt})")
    rel_summary.count("fuzz", f"preference rows ({fmt}): {outcome}")
    return outcome


@given(rows=preference_rows(), fmt=st.sampled_from(["jsonl", "csv"]))
@settings(CI, max_examples=40)
def test_preference_rows_load_or_name_the_file_and_row(rows, fmt):
    _run_preference_case(rows, fmt)


@pytest.mark.slow
@given(rows=preference_rows(), fmt=st.sampled_from(["jsonl", "csv"]))
@settings(SLOW)
def test_preference_rows_many(rows, fmt):
    _run_preference_case(rows, fmt)


def _png(colour: tuple[int, int, int], size: int = 8) -> bytes:
    import io

    from PIL import Image

    buf = io.BytesIO()
    Image.new("RGB", (size, size), colour).save(buf, format="PNG")
    return buf.getvalue()


@st.composite
def parquet_rows(draw) -> tuple[list[dict], bool]:
    """Pick-a-Pic rows: caption, jpg_0/jpg_1 bytes (valid, cut, empty, random), label_0/label_1."""
    image_bad = st.sampled_from([PNG[:30], b"", b"\x89PNG\r\n\x1a\n" + b"\x00" * 20, b"GIF89a"]) | st.binary(
        max_size=64
    )
    label_bad = st.sampled_from([float("nan"), 2.0, -1.0, 0.0, 1.0, 0.5])
    rows = []
    for i in range(draw(st.integers(1, 3))):
        pair = draw(st.sampled_from([(1.0, 0.0), (0.0, 1.0), (0.5, 0.5)]))
        row = {"caption": draw(st.sampled_from(["a red circle", "ünïcødé 🚀", "y" * 5000])),
               "jpg_0": _png((10 * i, 0, 0)), "jpg_1": _png((0, 10 * i, 200)), "label_0": pair[0], "label_1": pair[1]}  # fmt: skip
        bad = {"caption": st.one_of(st.text(max_size=30), st.just(""), st.just("x" * 200_000)),
               "jpg_0": image_bad, "jpg_1": image_bad, "label_0": label_bad, "label_1": label_bad}  # fmt: skip
        for _ in range(draw(st.sampled_from([0, 0, 1, 2]))):  # parquet columns keep one type: no drop/junk
            key = draw(st.sampled_from(sorted(row)))
            row[key] = draw(bad[key])
        rows.append(row)
    return rows, draw(st.booleans())  # as a folder of shards or one file


def _run_parquet_case(rows: list[dict], as_folder: bool) -> str:
    import pyarrow as pa
    import pyarrow.parquet as pq

    with tempfile.TemporaryDirectory() as d:
        tmp = Path(d)
        table = pa.Table.from_pylist(rows)
        if as_folder:
            path = tmp / "shards"
            path.mkdir()
            for k in range(2):
                pq.write_table(
                    table.slice(k, 1) if k < table.num_rows else table.slice(0, 1), path / f"{k}.parquet"
                )
        else:
            path = tmp / "pairs.parquet"
            pq.write_table(table, path)
        outcome = _check_outcome(path, lambda: _load_all(path))
    rel_summary.count("fuzz", "preference rows (parquet)")
    rel_summary.count("fuzz", f"preference rows (parquet): {outcome}")
    return outcome


@given(case=parquet_rows())
@settings(CI, max_examples=25)
def test_parquet_rows_load_or_name_the_file_and_row(case):
    _run_parquet_case(*case)


@pytest.mark.slow
@given(case=parquet_rows())
@settings(SLOW)
def test_parquet_rows_many(case):
    _run_parquet_case(*case)


def test_paths_that_escape_the_dataset_root_are_refused(tmp_path):
    root = _root(tmp_path)
    for bad in ("../outside.png", "sub/../../outside.png", str(tmp_path / "outside.png")):
        path = root / "pairs.jsonl"
        _write_jsonl([{"prompt": "p", "path_A": "a.png", "path_B": bad, "label": "A"}], path, tmp_path)
        with pytest.raises(
            DataError, match=r"pairs\.jsonl: line 1: path_B .*(contains '\.\.'|outside the dataset root)"
        ):
            load_preference_dataset(path)[0]
        rel_summary.count("loading", "dataset paths escaping the root refused (preference)")


# --------------------------------------------------------------------------------------------- RWR candidates, manifests


@st.composite
def candidate_rows(draw) -> list[Any]:
    rows = []
    for i in range(draw(st.integers(1, 3))):
        if draw(st.integers(0, 9)) == 0:
            rows.append(draw(st.sampled_from(["[1, 2]", '"text"', "{not json", "null"])))  # not an object
            continue
        row = {"file": draw(st.sampled_from(["a.png", "b.png", "sub/c.png"])), "prompt": f"prompt {i % 2}",
               "scores": {"overall": draw(st.floats(-5, 5)), "vq": 0.5}}  # fmt: skip
        bad = {
            "file": st.one_of(paths, junk),
            "prompt": st.one_of(texts, junk),
            "scores": st.one_of(
                st.dictionaries(st.sampled_from(["overall", "vq"]), st.one_of(numbers, present)), junk
            ),
        }
        rows.append(_mutate(draw, row, bad))
    return rows


def _run_candidates_case(rows: list[Any]) -> str:
    from flowalign.training.runs import load_candidates

    with tempfile.TemporaryDirectory() as d:
        tmp = Path(d)
        root = _root(tmp)
        path = root / "candidates.jsonl"
        lines = [
            r
            if isinstance(r, str)
            else json.dumps({k: _value(v, tmp) for k, v in r.items() if v is not MISSING})
            for r in rows
        ]
        path.write_text("\n".join(lines) + "\n")

        def load():
            media, prompts, rewards = load_candidates(path, "overall")
            assert len(media) == len(prompts) == len(rewards)
            assert all(math.isfinite(r) for r in rewards.tolist()), "a NaN/inf reward was accepted"
            assert all(isinstance(p, str) and p.strip() for p in prompts)

        outcome = _check_outcome(path, load)
    rel_summary.count("fuzz", "RWR candidate rows (jsonl)")
    rel_summary.count("fuzz", f"RWR candidate rows (jsonl): {outcome}")
    return outcome


@given(rows=candidate_rows())
@settings(CI, max_examples=40)
def test_rwr_candidates_load_or_name_the_line(rows):
    _run_candidates_case(rows)


@pytest.mark.slow
@given(rows=candidate_rows())
@settings(SLOW)
def test_rwr_candidates_many(rows):
    _run_candidates_case(rows)


@st.composite
def manifest_rows(draw) -> list[Any]:
    rows = []
    for i in range(draw(st.integers(1, 3))):
        row = {"file": draw(st.sampled_from(["a.png", "sub/c.png"])), "prompt": "a red circle", "id": i}
        rows.append(_mutate(draw, row, {"file": st.one_of(paths, junk), "prompt": st.one_of(texts, junk)}))
    return rows


def _run_manifest_case(rows: list[Any], reader: str) -> str:
    with tempfile.TemporaryDirectory() as d:
        tmp = Path(d)
        root = _root(tmp)
        path = root / "manifest.jsonl"
        path.write_text(
            "".join(
                json.dumps({k: _value(v, tmp) for k, v in r.items() if v is not MISSING}) + "\n" for r in rows
            )
        )

        def load():
            if reader == "sft":
                from flowalign.training.runs import ManifestDataset

                ds = ManifestDataset(path)
            else:
                from flowalign.training.methods.onestep_data import MediaTextDataset

                ds = MediaTextDataset(path)
            for i in range(len(ds)):
                assert ds[i]["pixels"].shape[0] == 3

        outcome = _check_outcome(path, load)
    rel_summary.count("fuzz", f"training manifests ({reader})")
    rel_summary.count("fuzz", f"training manifests ({reader}): {outcome}")
    return outcome


@given(rows=manifest_rows(), reader=st.sampled_from(["sft", "onestep"]))
@settings(CI, max_examples=30)
def test_training_manifests_load_or_name_the_line(rows, reader):
    _run_manifest_case(rows, reader)


@pytest.mark.slow
@given(rows=manifest_rows(), reader=st.sampled_from(["sft", "onestep"]))
@settings(SLOW)
def test_training_manifests_many(rows, reader):
    _run_manifest_case(rows, reader)


@pytest.mark.parametrize("reader", ["sft", "onestep", "rwr"])
@pytest.mark.parametrize("bad", ["../outside.png", "OUTSIDE_ABS"])
def test_training_manifest_paths_stay_in_their_folder(tmp_path, reader, bad):
    from flowalign.training.methods.onestep_data import MediaTextDataset
    from flowalign.training.runs import ManifestDataset, load_candidates

    root = _root(tmp_path)
    path = root / "rows.jsonl"
    path.write_text(
        json.dumps({"file": _value(bad, tmp_path), "prompt": "p", "scores": {"overall": 1.0}}) + "\n"
    )
    with pytest.raises(DataError, match=r"rows\.jsonl: line 1: .*(\.\.|outside)"):
        if reader == "sft":
            ManifestDataset(path)[0]
        elif reader == "onestep":
            MediaTextDataset(path)[0]
        else:
            load_candidates(path, "overall")
    rel_summary.count("loading", f"dataset paths escaping the root refused ({reader} manifest)")


# --------------------------------------------------------------------------------------------- prompt files


prompt_bodies = st.one_of(
    st.text(max_size=200),
    st.lists(st.one_of(texts, junk.filter(lambda v: v is not MISSING)), max_size=4).map(
        lambda xs: json.dumps(xs, default=str)
    ),
    st.lists(
        st.dictionaries(st.sampled_from(["prompt", "caption", "x"]), st.one_of(texts, st.integers())),
        max_size=3,
    ).map(lambda xs: "\n".join(json.dumps(x) for x in xs)),
    st.lists(
        st.sampled_from(["a red circle", "#tag", "", "  x  ", '"quoted, comma"', "tab\there"]), max_size=5
    ).map(lambda xs: "\n".join(["prompt", *xs])),
    st.binary(max_size=64).map(lambda b: b.decode("latin-1")),
)


def _run_prompt_case(body: str, ext: str) -> str:
    with tempfile.TemporaryDirectory() as d:
        path = Path(d) / f"prompts{ext}"
        path.write_text(body, encoding="utf-8", errors="surrogatepass")

        def load():
            prompts = load_prompts(path)
            assert prompts and all(isinstance(p, str) and p == p.strip() and p for p in prompts)

        outcome = _check_outcome(path, load)
    rel_summary.count("fuzz", "prompt files (txt/jsonl/json/csv/tsv)")
    rel_summary.count("fuzz", f"prompt files (txt/jsonl/json/csv/tsv): {outcome}")
    return outcome


EXTENSIONS = st.sampled_from([".txt", ".jsonl", ".json", ".csv", ".tsv"])


@given(body=prompt_bodies, ext=EXTENSIONS)
@settings(CI, max_examples=40)
def test_prompt_files_load_or_name_the_line(body, ext):
    _run_prompt_case(body, ext)


@pytest.mark.slow
@given(body=prompt_bodies, ext=EXTENSIONS)
@settings(SLOW)
def test_prompt_files_many(body, ext):
    _run_prompt_case(body, ext)
