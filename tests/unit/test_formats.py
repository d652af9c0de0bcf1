"""read_tagged_json: one error of the caller's type, naming the file, for each way a tag file is bad."""

from __future__ import annotations

import json

import pytest

from flowalign.formats import read_tagged_json


class FolderError(Exception):
    pass


def _write(tmp_path, payload) -> object:
    file = tmp_path / "index.json"
    file.write_text(payload if isinstance(payload, str) else json.dumps(payload))
    return file


def test_returns_the_object_when_format_and_version_match(tmp_path):
    file = _write(tmp_path, {"format": "x/1", "format_version": 2, "step": 3})
    assert read_tagged_json(file, "x/1", version=2) == {"format": "x/1", "format_version": 2, "step": 3}


@pytest.mark.parametrize(
    ("payload", "message"),
    [
        (None, r"index\.json: no index here"),
        ("{oops", r"index\.json: not valid JSON"),
        ("[1, 2]", r"index\.json: 'format' must be 'x/1', got 'list'"),
        ({"format": "y/1"}, r"index\.json: 'format' must be 'x/1', got 'y/1'"),
        ({"format": "x/1", "version": 9}, r"index\.json: version 9 is not supported \(expected 2\)"),
    ],
)
def test_each_bad_file_raises_the_callers_error_naming_it(tmp_path, payload, message):
    file = tmp_path / "index.json" if payload is None else _write(tmp_path, payload)
    with pytest.raises(FolderError, match=message):
        read_tagged_json(
            file, "x/1", error=FolderError, version=2, version_key="version", missing="no index here"
        )
