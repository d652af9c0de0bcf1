"""The package's file chores (``flowalign.files``): atomic writes, JSON lines, file digests, lazy exports."""

from __future__ import annotations

import hashlib
import json

import pytest

from flowalign.data.errors import DataError
from flowalign.files import (
    FileRowError,
    append_jsonl,
    atomic_write,
    atomic_write_json,
    atomic_write_text,
    canonical_safetensors,
    read_jsonl,
    save_safetensors,
    sha256_file,
    write_jsonl,
)


def test_atomic_write_leaves_the_old_file_on_error_and_no_temporary_behind(tmp_path):
    path = tmp_path / "sub" / "a.json"
    atomic_write_json(path, {"x": 1})
    assert path.read_text() == '{\n  "x": 1\n}\n'
    with pytest.raises(RuntimeError), atomic_write(path) as tmp:
        tmp.write_text("half")
        raise RuntimeError("interrupted")
    assert json.loads(path.read_text()) == {"x": 1}
    assert sorted(p.name for p in path.parent.iterdir()) == ["a.json"]
    atomic_write_text(path, "é\n")
    assert path.read_bytes() == "é\n".encode()


def test_jsonl_round_trip_append_and_line_numbers(tmp_path):
    path = tmp_path / "rows.jsonl"
    write_jsonl(path, [{"a": 1}, {"a": 2}])
    append_jsonl(path, [{"a": 3}])
    path.write_text(path.read_text() + "\n")  # a blank line is skipped, numbers still count it
    append_jsonl(path, [{"a": 4}])
    assert read_jsonl(path) == [(1, {"a": 1}), (2, {"a": 2}), (3, {"a": 3}), (5, {"a": 4})]


@pytest.mark.parametrize(
    ("line", "reason"),
    [("{oops", r"invalid JSON \(Expecting"), ("[1, 2]", "expected a JSON object, got list")],
)
def test_jsonl_errors_name_the_file_and_line_in_the_callers_error_type(tmp_path, line, reason):
    path = tmp_path / "bad.jsonl"
    path.write_text('{"a": 1}\n' + line + "\n")
    with pytest.raises(FileRowError, match=rf"bad\.jsonl: line 2: {reason}"):
        read_jsonl(path)
    with pytest.raises(DataError, match=rf"bad\.jsonl: line 2: {reason}") as info:
        read_jsonl(path, error=DataError)
    assert info.value.where == "line 2" and info.value.path == str(path)


def test_sha256_file_matches_hashlib_across_chunks(tmp_path):
    data = bytes(range(256)) * 1000
    (tmp_path / "b").write_bytes(data)
    assert sha256_file(tmp_path / "b", chunk=1000) == hashlib.sha256(data).hexdigest()


def test_lazy_exports_import_on_first_use_and_list_the_names():
    import flowalign.evals as evals
    import flowalign.training as training
    from flowalign.evals.types import EvalOptions
    from flowalign.training.ema import EMA

    assert evals.EvalOptions is EvalOptions and training.EMA is EMA
    assert {"run_eval", "EvalOptions"} <= set(dir(evals)) and "train" in training.__all__
    with pytest.raises(AttributeError, match="'flowalign.training' has no attribute 'nope'"):
        training.nope  # noqa: B018


def _with_metadata_order(data: bytes, keys: list[str]) -> bytes:
    """A safetensors file's bytes with its metadata keys written in the order ``keys`` (same content)."""
    n = int.from_bytes(data[:8], "little")
    header = json.loads(data[8 : 8 + n])
    meta = header.pop("__metadata__")
    text = json.dumps({"__metadata__": {k: meta[k] for k in keys}, **header}).encode()
    text += b" " * (-len(text) % 8)
    return len(text).to_bytes(8, "little") + text + data[8 + n :]


def test_safetensors_files_are_the_same_bytes_for_the_same_content(tmp_path):
    torch = pytest.importorskip("torch")
    safetensors_torch = pytest.importorskip("safetensors.torch")
    tensors = {"b.weight": torch.arange(6, dtype=torch.float32).reshape(2, 3), "a.bias": torch.ones(5)}
    meta = {"format": "pt", "lora_adapter_metadata": '{"r": 4}', "note": "\u00e9t\u00e9"}
    data = safetensors_torch.save(tensors, metadata=meta)
    orders = [list(meta), list(reversed(meta)), sorted(meta, key=len)]
    canonical = {canonical_safetensors(_with_metadata_order(data, keys)) for keys in orders}
    assert len(canonical) == 1
    (one,) = canonical
    assert int.from_bytes(one[:8], "little") % 8 == 0
    assert one.endswith(data[8 + int.from_bytes(data[:8], "little") :])  # tensor bytes untouched
    loaded = safetensors_torch.load(one)
    assert loaded.keys() == tensors.keys() and all(torch.equal(loaded[k], v) for k, v in tensors.items())
    # safetensors' own writer orders the metadata by a hash map: one content, several byte strings;
    # save_safetensors writes one (a hundred writes give one digest)
    digests = set()
    for i in range(100):
        path = save_safetensors(tensors, tmp_path / f"w{i}.safetensors", metadata=meta)
        digests.add(sha256_file(path))
    assert len(digests) == 1 and (tmp_path / "w0.safetensors").read_bytes() == one
    with safetensors_torch.safe_open(str(tmp_path / "w0.safetensors"), "pt") as f:
        assert f.metadata() == meta
