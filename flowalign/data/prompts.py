"""Read prompt lists from the formats benchmarks ship them in.

Formats, chosen by the extension:

- ``.txt``: one prompt per line (VBench prompt lists, DrawBench exports). Each line is
  stripped of surrounding whitespace. An empty line is an error naming the line number,
  except blank lines at the very end of the file (editor leftovers), which are ignored.
  There are no comments by default, because a prompt may start with ``#`` (a hashtag);
  pass ``comment="#"`` to skip lines that start with that prefix.
- ``.jsonl``: one JSON object per line with a ``"prompt"`` key (GenEval's
  ``evaluation_metadata.jsonl`` with its ``"tag"``, ``"include"``, ... fields). Blank lines
  follow the ``.txt`` rule.
- ``.json``: a list of strings (HPDv2 benchmark prompt files) or a list of objects with a
  prompt key (VBench's ``VBench_full_info.json`` uses ``"prompt_en"``).
- ``.csv`` / ``.tsv``: a header row and a prompt column (PartiPrompts' ``PartiPrompts.tsv``
  has ``Prompt``).

Image-conditioned families (image-to-video, edit) take a condition image per prompt: an
``image`` (or ``condition``, ``input_image``) key or column holding a path relative to the prompt
file's folder (:func:`load_conditioned_prompts`); either every entry has one or none does.

The prompt key or column is ``key`` when given, else the first of :data:`PROMPT_KEYS` that
is present. Every prompt must be a non-empty string after stripping. Files are read as UTF-8
(a byte-order mark is allowed). An empty file, a file with no prompts, and every bad line
raise :class:`~flowalign.data.errors.DataError` naming the file and the line (text formats
count lines from 1) or the item (``.json`` lists count items from 0).
"""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Any

from flowalign.data.errors import DataError
from flowalign.data.tables import csv_rows
from flowalign.files import parse_json_object

__all__ = [
    "IMAGE_KEYS",
    "PROMPT_EXTENSIONS",
    "PROMPT_KEYS",
    "load_conditioned_prompts",
    "load_prompt_records",
    "load_prompts",
]

PROMPT_KEYS: tuple[str, ...] = ("prompt", "Prompt", "caption", "prompt_en", "text")
"""Keys/columns tried in order when ``key`` is not given."""

IMAGE_KEYS: tuple[str, ...] = ("image", "condition", "input_image")
"""Keys/columns of a prompt's condition image, tried in order."""

PROMPT_EXTENSIONS: frozenset[str] = frozenset({".txt", ".jsonl", ".json", ".csv", ".tsv"})


def _read_text(path: Path) -> str:
    if path.suffix.lower() not in PROMPT_EXTENSIONS:
        raise DataError(
            path,
            f"unsupported prompt file extension {path.suffix!r}; expected one of {sorted(PROMPT_EXTENSIONS)}",
        )
    if not path.is_file():
        raise DataError(path, "file does not exist")
    try:
        text = path.read_text(encoding="utf-8-sig")
    except UnicodeDecodeError as exc:
        raise DataError(path, f"not valid UTF-8 ({exc})") from exc
    if not text.strip():
        raise DataError(path, "file is empty (no prompts)")
    return text


def _numbered_lines(text: str) -> list[tuple[int, str]]:
    """(1-based line number, line) pairs, without the trailing blank lines."""
    lines = text.splitlines()
    while lines and not lines[-1].strip():
        lines.pop()
    return list(enumerate(lines, start=1))


def _clean_prompt(value: Any, path: Path, where: str, key: str | None) -> str:
    field = f" {key!r}" if key else ""
    if not isinstance(value, str):
        raise DataError(path, f"prompt{field} must be a string, got {type(value).__name__}", where=where)
    prompt = value.strip()
    if not prompt:
        raise DataError(path, f"empty prompt{field}", where=where)
    return prompt


def _pick_key(available: list[str] | set[str], key: str | None, path: Path, where: str | None) -> str:
    if key is not None:
        if key not in available:
            raise DataError(path, f"missing prompt key {key!r}; found {sorted(available)}", where=where)
        return key
    for candidate in PROMPT_KEYS:
        if candidate in available:
            return candidate
    raise DataError(
        path, f"no prompt key: expected one of {list(PROMPT_KEYS)}, found {sorted(available)}", where=where
    )


def _from_txt(path: Path, text: str, comment: str | None) -> list[dict[str, Any]]:
    records = []
    for num, line in _numbered_lines(text):
        stripped = line.strip()
        if comment is not None and stripped.startswith(comment):
            continue
        if not stripped:
            raise DataError(
                path, "empty line (remove it, or keep blank lines only at the end)", where=f"line {num}"
            )
        records.append({"prompt": stripped})
    return records


def _from_jsonl(path: Path, text: str, key: str | None) -> list[dict[str, Any]]:
    records = []
    for num, line in _numbered_lines(text):
        where = f"line {num}"
        if not line.strip():
            raise DataError(path, "empty line (remove it, or keep blank lines only at the end)", where=where)
        obj = parse_json_object(line, path, num, error=DataError)
        k = _pick_key(set(obj), key, path, where)
        records.append({**obj, "prompt": _clean_prompt(obj[k], path, where, k)})
    return records


def _from_json(path: Path, text: str, key: str | None) -> list[dict[str, Any]]:
    try:
        data = json.loads(text)
    except json.JSONDecodeError as exc:
        raise DataError(path, f"invalid JSON ({exc.msg} at line {exc.lineno}, column {exc.colno})") from exc
    if not isinstance(data, list):
        raise DataError(path, f"expected a JSON list of prompts, got {type(data).__name__}")
    records = []
    for i, item in enumerate(data):
        where = f"item {i}"
        if isinstance(item, dict):
            k = _pick_key(set(item), key, path, where)
            records.append({**item, "prompt": _clean_prompt(item[k], path, where, k)})
        else:
            records.append({"prompt": _clean_prompt(item, path, where, None)})
    return records


def _from_table(path: Path, text: str, key: str | None) -> list[dict[str, Any]]:
    delimiter = "\t" if path.suffix.lower() == ".tsv" else ","
    lines = csv_rows(text.rstrip("\r\n").splitlines(keepends=True), path, delimiter=delimiter)
    _, header = next(lines)
    k = _pick_key(header, key, path, "header (line 1)")
    records = []
    for line_num, row in lines:
        where = f"line {line_num}"
        if not any(cell.strip() for cell in row):
            raise DataError(path, "empty line (remove it, or keep blank lines only at the end)", where=where)
        if len(row) != len(header):
            raise DataError(
                path, f"expected {len(header)} fields as in the header, got {len(row)}", where=where
            )
        record: dict[str, Any] = dict(zip(header, row, strict=True))
        records.append({**record, "prompt": _clean_prompt(record[k], path, where, k)})
    return records


def load_prompt_records(
    path: str | os.PathLike[str], *, key: str | None = None, comment: str | None = None
) -> list[dict[str, Any]]:
    """Read a prompt file keeping each entry's other fields (e.g. GenEval's ``tag``).

    Args:
        path: a ``.txt``, ``.jsonl``, ``.json``, ``.csv`` or ``.tsv`` file (see module doc).
        key: the prompt key/column; by default the first of :data:`PROMPT_KEYS` present.
        comment: for ``.txt`` only, skip lines starting with this prefix (after stripping).

    Returns:
        One dict per prompt, in file order; ``"prompt"`` holds the stripped prompt and the
        other keys are the entry's other fields (none for ``.txt`` and string lists).

    Raises:
        DataError: unsupported extension, missing/empty file, no prompts, or a bad line
            (empty, invalid JSON, missing key, non-string or empty prompt), naming the line.
    """
    path = Path(path)
    text = _read_text(path)
    ext = path.suffix.lower()
    if comment is not None and ext != ".txt":
        raise ValueError(f"comment= applies to .txt files only, got {path}")
    if ext == ".txt":
        records = _from_txt(path, text, comment)
    elif ext == ".jsonl":
        records = _from_jsonl(path, text, key)
    elif ext == ".json":
        records = _from_json(path, text, key)
    else:
        records = _from_table(path, text, key)
    if not records:
        raise DataError(path, "no prompts in file")
    return records


def load_prompts(
    path: str | os.PathLike[str], *, key: str | None = None, comment: str | None = None
) -> list[str]:
    """Read a prompt file into a list of prompts.

    Args:
        path: a ``.txt``, ``.jsonl``, ``.json``, ``.csv`` or ``.tsv`` file (see module doc).
        key: the prompt key/column; by default the first of :data:`PROMPT_KEYS` present.
        comment: for ``.txt`` only, skip lines starting with this prefix (after stripping).

    Returns:
        The stripped, non-empty prompts in file order (duplicates kept).

    Raises:
        DataError: as :func:`load_prompt_records`.
    """
    return [r["prompt"] for r in load_prompt_records(path, key=key, comment=comment)]


def _entry(path: Path, index: int) -> str:
    """Where entry ``index`` (from 0) of a prompt file is: a line (text formats) or an item (.json)."""
    ext = path.suffix.lower()
    if ext == ".json":
        return f"item {index}"
    return f"line {index + (2 if ext in ('.csv', '.tsv') else 1)}"


def load_conditioned_prompts(
    path: str | os.PathLike[str], *, key: str | None = None
) -> tuple[list[str], list[Path] | None]:
    """Prompts and, when the file has an image key/column (:data:`IMAGE_KEYS`), each prompt's
    condition image path (relative paths from the file's folder; each must exist).

    Raises:
        DataError: as :func:`load_prompt_records`, or an entry without an image where others have
            one, or an image file that does not exist, naming the line.
    """
    path = Path(path)
    records = load_prompt_records(path, key=key)
    image_key = next((k for k in IMAGE_KEYS if any(k in r for r in records)), None)
    prompts = [r["prompt"] for r in records]
    if image_key is None:
        return prompts, None
    images = []
    for i, record in enumerate(records):
        value = record.get(image_key)
        if not isinstance(value, str) or not value.strip():
            raise DataError(
                path, f"no condition image {image_key!r} (other entries have one)", where=_entry(path, i)
            )
        image = Path(value.strip())
        image = image if image.is_absolute() else path.parent / image
        if not image.is_file():
            raise DataError(path, f"condition image {image} does not exist", where=_entry(path, i))
        images.append(image)
    return prompts, images
