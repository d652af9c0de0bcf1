"""Streamed hub datasets: ``hf:<id>?streaming=1&rows=N`` reads the first N rows without downloading the
dataset.

``hf:<id>`` alone goes through ``datasets.load_dataset``, which downloads every file of the split into
the ``datasets`` cache before the first row (Pick-a-Pic v2: about 1 TB of parquet shards).
With ``?streaming=1`` the split is opened with ``load_dataset(..., streaming=True)`` and read in its
stored order; the first ``rows`` rows (every row when ``rows`` is not given) are written, as they
arrive, into a local row cache: parquet shards of :data:`SHARD_ROWS` rows in a folder named by the
dataset id, split and row count. Only the files holding those rows are read from the hub.

Training then reads the cache like any parquet folder: random access by index, so the loop's
deterministic index-based batches and its exact resume hold (a resumed run, or a second run with the
same spec, opens the same cache and sees the same rows in the same order). The cache is written into a
temporary folder and renamed when complete, so an interrupted stream leaves nothing half-read behind;
the next run streams again. A dataset that changes on the hub after the cache is written is not seen
again: delete the folder to take the new rows. True streaming without a local copy would give up the
random access the loop's shuffling and resume need, so it is not offered.

Query keys: ``streaming`` (``1``/``true``, required), ``rows`` (a positive count), ``split`` (default
``train``; the ``split`` argument of the reader, when given, wins). The cache lives in
``$FLOWALIGN_STREAM_CACHE`` or else ``<datasets cache>/flowalign-streamed``.
"""

from __future__ import annotations

import hashlib
import json
import os
import re
import shutil
import tempfile
from pathlib import Path
from typing import Any

from flowalign.data.errors import DataError

__all__ = ["SHARD_ROWS", "StreamSpec", "parse_stream_spec", "stream_to_cache"]

SHARD_ROWS = 1000
"""Rows per parquet shard of the local row cache (one row group each)."""

_KEYS = ("streaming", "rows", "split")


class StreamSpec:
    """A parsed ``<id>?streaming=1&rows=N&split=S`` (the part after ``hf:``)."""

    def __init__(self, hub_id: str, rows: int | None, split: str | None) -> None:
        self.hub_id, self.rows, self.split = hub_id, rows, split


def parse_stream_spec(spec: str) -> StreamSpec:
    """Parse the part of a data spec after ``hf:`` that carries a ``?`` query.

    Raises:
        DataError: an unknown key, ``streaming`` not on, or ``rows`` not a positive integer.
    """
    hub_id, _, query = spec.partition("?")
    where = f"hf:{spec}"
    if not hub_id:
        raise DataError(where, "empty dataset id after 'hf:'")
    options: dict[str, str] = {}
    for part in filter(None, query.split("&")):
        key, eq, value = part.partition("=")
        if key not in _KEYS or not eq:
            raise DataError(
                where, f"unknown option {part!r} after '?'; options are {list(_KEYS)} as key=value"
            )
        options[key] = value
    if options.get("streaming", "").lower() not in ("1", "true"):
        raise DataError(where, "options after '?' need streaming=1 (e.g. hf:<id>?streaming=1&rows=10000)")
    rows = options.get("rows")
    if rows is not None and not (rows.isdigit() and int(rows) > 0):
        raise DataError(where, f"rows must be a positive integer, got {rows!r}")
    return StreamSpec(hub_id, int(rows) if rows is not None else None, options.get("split") or None)


def _cache_root() -> Path:
    env = os.environ.get("FLOWALIGN_STREAM_CACHE")
    if env:
        return Path(env)
    import datasets

    return Path(datasets.config.HF_DATASETS_CACHE) / "flowalign-streamed"


def _folder_name(spec: StreamSpec, split: str) -> str:
    key = json.dumps([spec.hub_id, split, spec.rows])
    slug = re.sub(r"[^A-Za-z0-9._-]+", "_", spec.hub_id.strip("/"))[-60:]
    return f"{slug}--{split}--{spec.rows or 'all'}--{hashlib.sha256(key.encode()).hexdigest()[:12]}"


def _open_stream(spec: StreamSpec, split: str, where: str) -> Any:
    try:
        import datasets
    except ImportError as exc:
        raise DataError(
            where, "reading Hugging Face datasets needs the 'datasets' package: pip install 'flowalign[data]'"
        ) from exc
    try:
        stream = datasets.load_dataset(spec.hub_id, split=split, streaming=True)
    except Exception as exc:  # hub, file-format and split errors of datasets
        raise DataError(
            where, f"cannot stream with datasets.load_dataset({spec.hub_id!r}, split={split!r}) ({exc})"
        ) from exc
    for name, feature in (stream.features or {}).items():
        if isinstance(feature, datasets.Image):  # keep the encoded bytes, as the non-streamed reader does
            stream = stream.cast_column(name, datasets.Image(decode=False))
    return stream


def _write_shards(stream: Any, limit: int | None, folder: Path) -> int:
    import pyarrow as pa
    import pyarrow.parquet as pq

    schema = stream.features.arrow_schema if stream.features is not None else None
    count, chunk = 0, []

    def flush() -> None:
        table = pa.Table.from_pylist(chunk, schema=schema)
        pq.write_table(table, folder / f"rows-{count - len(chunk):09d}.parquet", row_group_size=SHARD_ROWS)
        chunk.clear()

    for row in stream:
        if limit is not None and count >= limit:
            break
        chunk.append(row)
        count += 1
        if len(chunk) == SHARD_ROWS:
            flush()
    if chunk:
        flush()
    return count


def stream_to_cache(spec: StreamSpec, *, split: str | None = None) -> tuple[Path, Path]:
    """The local row cache of ``spec`` (streamed now unless complete already) and the folder that
    relative media paths start from (the dataset folder for a local id, else the working folder).

    Raises:
        DataError: the dataset cannot be streamed or gives no rows.
    """
    split = split or spec.split or "train"
    where = f"hf:{spec.hub_id}"
    root = Path(spec.hub_id) if Path(spec.hub_id).is_dir() else Path.cwd()
    folder = _cache_root() / _folder_name(spec, split)
    if (folder / "source.json").is_file():
        return folder, root
    stream = _open_stream(spec, split, where)
    folder.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=folder.name + ".", dir=folder.parent))
    try:
        try:
            count = _write_shards(stream, spec.rows, tmp)
        except Exception as exc:  # network, file-format or cast errors while reading the stream
            raise DataError(where, f"streaming split {split!r} failed ({exc})") from exc
        if count == 0:
            raise DataError(where, f"split {split!r} streamed no rows")
        source = {"id": spec.hub_id, "split": split, "rows_asked": spec.rows, "rows": count}
        (tmp / "source.json").write_text(json.dumps(source) + "\n", encoding="utf-8")
        try:
            tmp.rename(folder)  # complete: later runs (and resumes) read these rows
        except OSError:  # another process finished the same cache first: read that one
            if not (folder / "source.json").is_file():
                raise
            shutil.rmtree(tmp, ignore_errors=True)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    return folder, root
