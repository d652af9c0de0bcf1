"""Row access to tabular data files: jsonl, csv/tsv, parquet (file or shards), HF datasets.

A :class:`Table` gives the column names, the number of rows, one row as a dict, and where a
row lives for error messages (``line N`` from 1 in text files, ``row N`` from 0 in parquet
and HF datasets, prefixed by the shard name for a folder of shards). Text files are parsed
whole when opened; parquet is read one row group at a time (a few are cached), so shards of
encoded images are not held in memory at once.
"""

from __future__ import annotations

import bisect
import csv
import os
from collections import OrderedDict
from collections.abc import Iterator
from pathlib import Path
from typing import Any, Protocol

from flowalign.data.errors import DataError
from flowalign.data.hub_stream import parse_stream_spec, stream_to_cache
from flowalign.files import parse_json_object

__all__ = ["HUB_PREFIX", "Table", "csv_rows", "open_table"]


class Table(Protocol):
    """Read-only row access. ``path`` names the source in errors; ``default_root`` is the
    folder that relative media paths start from."""

    path: Path
    default_root: Path
    columns: list[str]
    num_rows: int

    def row(self, i: int) -> dict[str, Any]: ...

    def where(self, i: int) -> str: ...


class _RowsTable:
    """Rows parsed in memory (jsonl, csv), each with its 1-based line number."""

    def __init__(self, path: Path, columns: list[str], rows: list[dict[str, Any]], lines: list[int]) -> None:
        self.path, self.default_root = path, path.parent
        self.columns, self._rows, self._lines = columns, rows, lines
        self.num_rows = len(rows)

    def row(self, i: int) -> dict[str, Any]:
        return self._rows[i]

    def where(self, i: int) -> str:
        return f"line {self._lines[i]}"


def _text_lines(path: Path) -> list[tuple[int, str]]:
    try:
        text = path.read_text(encoding="utf-8-sig")
    except UnicodeDecodeError as exc:
        raise DataError(path, f"not valid UTF-8 ({exc})") from exc
    lines = text.splitlines()
    while lines and not lines[-1].strip():
        lines.pop()  # blank lines at the very end are editor leftovers, not rows
    if not lines:
        raise DataError(path, "file is empty")
    return list(enumerate(lines, start=1))


def _open_jsonl(path: Path) -> _RowsTable:
    rows, nums, columns = [], [], {}
    for num, line in _text_lines(path):
        if not line.strip():
            raise DataError(path, "empty line", where=f"line {num}")
        obj = parse_json_object(line, path, num, error=DataError)
        columns.update(dict.fromkeys(obj))
        rows.append(obj)
        nums.append(num)
    return _RowsTable(path, list(columns), rows, nums)


def csv_rows(lines: list[str], path: Path, *, delimiter: str) -> Iterator[tuple[int, list[str]]]:
    """(line number, cells) of CSV lines; a ``csv.Error`` (a field over the csv module's 131072-character
    limit, a NUL byte, a bad quote) becomes a :class:`DataError` naming the file and the line."""
    reader = csv.reader(lines, delimiter=delimiter)
    while True:
        try:
            cells = next(reader)
        except StopIteration:
            return
        except csv.Error as exc:
            raise DataError(path, f"unreadable CSV ({exc})", where=f"line {reader.line_num}") from exc
        yield reader.line_num, cells


def _open_csv(path: Path) -> _RowsTable:
    delimiter = "\t" if path.suffix.lower() == ".tsv" else ","
    text = "\n".join(line for _, line in _text_lines(path)) + "\n"
    lines = csv_rows(text.splitlines(keepends=True), path, delimiter=delimiter)
    _, header = next(lines)
    if len(set(header)) != len(header):
        raise DataError(path, f"duplicate column names in header {header}", where="line 1")
    rows, nums = [], []
    for line_num, cells in lines:
        where = f"line {line_num}"
        if not any(c.strip() for c in cells):
            raise DataError(path, "empty line", where=where)
        if len(cells) != len(header):
            raise DataError(
                path, f"expected {len(header)} fields as in the header, got {len(cells)}", where=where
            )
        rows.append(dict(zip(header, cells, strict=True)))
        nums.append(line_num)
    return _RowsTable(path, header, rows, nums)


class _ParquetTable:
    """One parquet file or a folder of shards, read by row group on demand."""

    _CACHE_SIZE = 4

    def __init__(self, path: Path, files: list[Path]) -> None:
        import pyarrow.parquet as pq

        self.path = path
        self.default_root = path if path.is_dir() else path.parent
        self._files = files
        self._is_folder = path.is_dir()
        self._groups: list[tuple[int, int, int]] = []  # (global first row, file index, row group)
        self._cache: OrderedDict[tuple[int, int], list[dict[str, Any]]] = OrderedDict()
        self._handles: dict[int, Any] = {}
        self._file_offsets: dict[tuple[int, int], int] = {}  # first row of a row group within its file
        first, schema = 0, None
        for k, f in enumerate(files):
            try:
                meta = pq.ParquetFile(f).metadata
            except Exception as exc:  # pyarrow raises ArrowInvalid/OSError for non-parquet bytes
                raise DataError(f, f"cannot read parquet ({exc})") from exc
            names = meta.schema.to_arrow_schema().names
            if schema is None:
                schema = names
            elif names != schema:
                raise DataError(f, f"columns {names} differ from {schema} in {files[0].name}")
            in_file = 0
            for g in range(meta.num_row_groups):
                self._groups.append((first, k, g))
                self._file_offsets[(k, g)] = in_file
                first += meta.row_group(g).num_rows
                in_file += meta.row_group(g).num_rows
        self.columns = list(schema or [])
        self.num_rows = first
        self._starts = [g[0] for g in self._groups]

    def __getstate__(self) -> dict[str, Any]:
        # open files and cached row groups stay behind (DataLoader workers pickle datasets)
        return {**self.__dict__, "_handles": {}, "_cache": OrderedDict()}

    def _locate(self, i: int) -> tuple[int, int, int]:
        if not 0 <= i < self.num_rows:
            raise IndexError(f"row {i} out of range for {self.num_rows} rows in {self.path}")
        first, k, g = self._groups[bisect.bisect_right(self._starts, i) - 1]
        return k, g, i - first

    def row(self, i: int) -> dict[str, Any]:
        import pyarrow.parquet as pq

        k, g, offset = self._locate(i)
        rows = self._cache.get((k, g))
        if rows is None:
            if k not in self._handles:
                self._handles[k] = pq.ParquetFile(self._files[k])
            rows = self._handles[k].read_row_group(g).to_pylist()
            self._cache[(k, g)] = rows
            if len(self._cache) > self._CACHE_SIZE:
                self._cache.popitem(last=False)
        else:
            self._cache.move_to_end((k, g))
        return rows[offset]

    def where(self, i: int) -> str:
        k, g, offset = self._locate(i)
        local = self._file_offsets[(k, g)] + offset
        return f"{self._files[k].name} row {local}" if self._is_folder else f"row {local}"


HUB_PREFIX = "hf:"
"""``hf:<dataset id>`` (or ``hf:<folder>``) opens a dataset through ``datasets.load_dataset``."""


def _import_datasets(path: Path | str):
    try:
        import datasets
    except ImportError as exc:
        raise DataError(
            path, "reading Hugging Face datasets needs the 'datasets' package: pip install 'flowalign[data]'"
        ) from exc
    return datasets


class _HFTable:
    """A ``datasets`` Dataset (a ``save_to_disk`` folder or a hub id); images kept as encoded bytes."""

    def __init__(self, path: Path, split: str | None, *, hub_id: str | None = None) -> None:
        datasets = _import_datasets(path)
        try:
            if hub_id is not None:
                ds = datasets.load_dataset(hub_id, split=split or "train")
            else:
                ds = datasets.load_from_disk(str(path))
        except Exception as exc:  # datasets raises FileNotFoundError/ValueError/ArrowInvalid/hub errors
            how = (
                f"datasets.load_dataset({hub_id!r}, split={split or 'train'!r})"
                if hub_id
                else "load_from_disk"
            )
            raise DataError(path, f"cannot load with {how} ({exc})") from exc
        if isinstance(ds, datasets.DatasetDict):
            if split is None and len(ds) == 1:
                split = next(iter(ds))
            if split is None:
                raise DataError(
                    path, f"the folder holds several splits; choose one of {sorted(ds)} with split="
                )
            if split not in ds:
                raise DataError(path, f"split {split!r} not found; choose one of {sorted(ds)} with split=")
            ds = ds[split]
        elif split is not None and hub_id is None:
            raise DataError(path, f"split={split!r} given but the folder holds a single Dataset")
        for name, feature in ds.features.items():
            if isinstance(feature, datasets.Image):
                ds = ds.cast_column(name, datasets.Image(decode=False))  # rows give {"bytes", "path"}
        local = hub_id is not None and Path(hub_id).is_dir()
        self.path = path
        self.default_root = Path(hub_id) if local else (Path.cwd() if hub_id else path)
        self._ds = ds
        self.columns = list(ds.column_names)
        self.num_rows = len(ds)

    def row(self, i: int) -> dict[str, Any]:
        return self._ds[i]

    def where(self, i: int) -> str:
        return f"row {i}"


def open_table(path: str | os.PathLike[str], *, split: str | None = None) -> Table:
    """Open a jsonl, csv/tsv or parquet file, a folder of parquet shards, a HF datasets folder, or
    ``hf:<id>``: a dataset on the Hugging Face hub (or a local dataset folder) read with
    ``datasets.load_dataset`` (downloaded whole into the ``datasets`` cache; needs the ``data`` extra),
    or ``hf:<id>?streaming=1&rows=N``: its first N rows streamed into a local row cache
    (:mod:`flowalign.data.hub_stream`).

    Args:
        path: the file or folder, or ``hf:<id>``.
        split: for a HF ``DatasetDict`` folder or a hub id, which split to read (hub default: train).

    Returns:
        A :class:`Table`.

    Raises:
        DataError: missing path, unknown format, or an unreadable file (naming the line).
    """
    if str(path).startswith(HUB_PREFIX):
        hub_id = str(path)[len(HUB_PREFIX) :]
        if not hub_id:
            raise DataError(path, "empty dataset id after 'hf:'")
        if "?" in hub_id:  # hf:<id>?streaming=1&rows=N: the first rows, streamed into a local cache
            folder, root = stream_to_cache(parse_stream_spec(hub_id), split=split)
            table = _ParquetTable(folder, sorted(folder.glob("*.parquet")))
            table.path, table.default_root = Path(str(path)), root
            return table
        return _HFTable(Path(str(path)), split, hub_id=hub_id)
    path = Path(path)
    if not path.exists():
        raise DataError(path, "does not exist")
    if path.is_dir():
        if any((path / n).exists() for n in ("state.json", "dataset_dict.json", "dataset_info.json")):
            return _HFTable(path, split)
        shards = sorted(path.glob("*.parquet"))
        if shards:
            return _ParquetTable(path, shards)
        raise DataError(path, "folder holds neither parquet shards nor a datasets save_to_disk layout")
    if path.stat().st_size == 0:
        raise DataError(path, "file is empty")
    ext = path.suffix.lower()
    if ext == ".jsonl":
        return _open_jsonl(path)
    if ext in (".csv", ".tsv"):
        return _open_csv(path)
    if ext == ".parquet":
        return _ParquetTable(path, [path])
    raise DataError(
        path, f"unsupported dataset format {ext!r}; expected .parquet, .jsonl, .csv, .tsv or a folder"
    )
