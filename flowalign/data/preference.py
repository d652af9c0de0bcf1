"""Preference-pair datasets: (prompt, media A, media B, per-dimension labels).

One dataset class reads every supported layout through a small table interface:

- **Pick-a-Pic parquet** (a ``.parquet`` file or a folder of shards): ``caption``, the images
  as encoded bytes ``jpg_0``/``jpg_1`` or as files ``image_0_path``/``image_1_path``, and
  ``label_0``/``label_1`` with (1, 0) = image 0 better, (0, 1) = image 1 better and
  (0.5, 0.5) = tie. Anything else (e.g. the (0, 0) of unlabeled rows) is refused.
- **jsonl + files**: one object per line, either ``{"prompt", "chosen", "rejected"}`` or
  ``{"prompt", "path_A", "path_B", "label"}`` where ``label`` is ``"A" | "B" | "tie"`` or a
  per-dimension object ``{"VQ": "A", "MQ": "tie", "TA": null}``. An optional ``"meta"``
  object is kept in :attr:`PreferencePair.meta`. One schema per file.
- **VideoAlign csv/tsv**: ``prompt``, ``path_A``, ``path_B`` and one column per dimension
  (``VQ``, ``MQ``, ``TA``, ``Overall``) holding ``A``, ``B``, ``same``/``tie`` or an empty cell
  (missing). A single ``label`` column is read as the dimension ``"overall"``.
- **HF datasets folder** written by ``Dataset.save_to_disk``, with any of the column layouts
  above (``Image`` features are read as their encoded bytes). Needs the optional
  ``datasets`` package.

Image-conditioned families (image-to-video, edit) read a condition image per row: a shared column
(``condition``, ``image`` or ``input_image``: a path or image bytes), or one column per member
(``condition_A``/``condition_B`` or ``image_A``/``image_B``). The two members of a pair are
compared under one condition, so a row whose members name different condition images (different
bytes) is refused, naming the row.

The prompt column is the first of ``prompt``, ``caption``, ``Prompt`` that exists. Text
labels are case-insensitive. Media paths are relative to ``root`` (default: the folder that
holds the dataset file); a path with a ``..`` component, or an absolute path outside
``root``, is refused. Symlinks inside ``root`` are followed (hub snapshots are symlinks).

Label encoding (in :class:`PreferencePair` and :func:`collate_preference`), per dimension:

    1 = media_w better,  0 = tie,  -1 = media_l better,  -2 = missing (not annotated)

Single-label datasets are canonicalised (:func:`canonicalise_pair`) so that ``media_w`` is
the preferred item: their labels are then 1, or 0 for ties (order of a tie = file order).
Multi-dimensional datasets keep ``media_w = A``, ``media_l = B`` unless ``order_by`` names a
dimension to order by, since no single order fits every dimension. (VideoAlign's own code
writes missing as 22; here it is -2 so that ``label != 0`` keeps meaning "not a tie".)

The label layouts are read by :mod:`flowalign.data.preference_labels` (one reader per layout), and
:mod:`flowalign.data.preference_jsonl` writes pairs back as a jsonl (names re-exported here).

Rows are checked lazily, when loaded, and all at once by :meth:`PreferenceDataset.validate`.
Every problem raises :class:`~flowalign.data.errors.DataError` naming the file and the row:
``line N`` (from 1) in text files, ``row N`` (from 0) in parquet and HF datasets.
"""

from __future__ import annotations

import filecmp
import logging
import os
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from torch import Tensor
from torch.utils.data import Dataset

from flowalign.data.errors import DataError
from flowalign.data.media import MediaError, decode_image_bytes, load_media
from flowalign.data.preference_jsonl import collate_preference, write_preference_jsonl
from flowalign.data.preference_labels import (
    LABEL_L_BETTER,
    LABEL_MISSING,
    LABEL_TIE,
    LABEL_W_BETTER,
    OVERALL,
    canonicalise_pair,
    is_missing,
    label_reader,
)
from flowalign.data.preference_pair import PreferencePair
from flowalign.data.tables import Table, open_table

__all__ = [
    "LABEL_L_BETTER",
    "LABEL_MISSING",
    "LABEL_TIE",
    "LABEL_W_BETTER",
    "OVERALL",
    "PreferenceDataset",
    "PreferencePair",
    "canonicalise_pair",
    "collate_preference",
    "load_preference_dataset",
    "write_preference_jsonl",
]

_PROMPT_COLUMNS = ("prompt", "caption", "Prompt")
_MEDIA_COLUMNS = (
    ("path_A", "path_B"),
    ("chosen", "rejected"),
    ("jpg_0", "jpg_1"),
    ("image_0_path", "image_1_path"),
)
_CONDITION_COLUMNS = ("condition", "image", "input_image")
_CONDITION_PAIRS = (("condition_A", "condition_B"), ("image_A", "image_B"))
_AUTO = "auto"

logger = logging.getLogger(__name__)


@dataclass(frozen=True)
class _Ref:
    """A media item: a file or encoded bytes, with the column it came from."""

    column: str
    path: Path | None = None
    data: bytes | None = None


@dataclass(frozen=True)
class _Row:
    where: str
    prompt: str
    ref_a: _Ref
    ref_b: _Ref
    labels: dict[str, int]  # A/B terms
    meta: dict[str, Any]
    condition: _Ref | None = None


class PreferenceDataset(Dataset[PreferencePair]):
    """Preference pairs read lazily from a table (see the module doc for layouts).

    Use :func:`load_preference_dataset` to open a file or folder. Indexing returns a
    :class:`PreferencePair`; each access re-checks its row, so a bad row fails with a
    :class:`DataError` naming the file and row. :meth:`validate` checks every row upfront.

    Attributes:
        path: the dataset file or folder.
        root: the folder media paths are relative to.
        dimensions: label dimensions, in order.
        order_by: the dimension pairs are ordered by, or None (A = w, B = l).
    """

    def __init__(
        self,
        table: Table,
        *,
        root: str | os.PathLike[str] | None = None,
        dimensions: Sequence[str] | None = None,
        order_by: str | None = _AUTO,
        keep_ties: bool = True,
        max_frames: int | None = None,
        transform: Callable[[Tensor], Tensor] | None = None,
    ) -> None:
        self._table = table
        self.path = table.path
        self.root = Path(os.path.abspath(root if root is not None else table.default_root))
        self._max_frames = max_frames
        self._transform = transform
        cols = table.columns
        self._prompt_col = next((c for c in _PROMPT_COLUMNS if c in cols), None)
        if self._prompt_col is None:
            raise DataError(
                self.path, f"missing prompt column: expected one of {list(_PROMPT_COLUMNS)}, found {cols}"
            )
        media = next((pair for pair in _MEDIA_COLUMNS if pair[0] in cols or pair[1] in cols), None)
        if media is None:
            raise DataError(
                self.path, f"missing media columns: expected one of {list(_MEDIA_COLUMNS)}, found {cols}"
            )
        for c in media:
            if c not in cols:
                raise DataError(self.path, f"missing media column {c!r}; found {cols}")
        self._media_cols = media
        self._condition_cols = self._condition_layout(cols)
        self.dimensions, self._labels = label_reader(table, media, dimensions)
        if order_by == _AUTO:
            order_by = self.dimensions[0] if len(self.dimensions) == 1 else None
        if order_by is not None and order_by not in self.dimensions:
            raise ValueError(
                f"order_by={order_by!r} is not a dimension of {self.path}: {list(self.dimensions)}"
            )
        self.order_by = order_by
        self._index = list(range(table.num_rows))
        self.ties_dropped = 0
        """Rows dropped as ties on ``order_by`` (``keep_ties=False``), also logged."""
        if not keep_ties:
            if order_by is None:
                raise ValueError("keep_ties=False needs order_by (which dimension decides a tie)")
            self._index = [i for i in self._index if self._check_row(i).labels[order_by] != LABEL_TIE]
            self.ties_dropped = table.num_rows - len(self._index)
            logger.warning("%s: dropped %d tie rows of %d", self.path, self.ties_dropped, table.num_rows)
        if not self._index:
            raise DataError(
                self.path, "dataset has no rows" + ("" if keep_ties else " once ties are dropped")
            )

    def _condition_layout(self, cols: list[str]) -> tuple[str, ...]:
        """The condition-image column (one name) or per-member columns (two names), or ()."""
        shared = next((c for c in _CONDITION_COLUMNS if c in cols), None)
        pair = next((p for p in _CONDITION_PAIRS if p[0] in cols or p[1] in cols), None)
        if shared and pair:
            raise DataError(self.path, f"condition image given twice: column {shared!r} and {list(pair)}")
        if pair:
            for c in pair:
                if c not in cols:
                    raise DataError(self.path, f"missing condition column {c!r}; found {cols}")
            return pair
        return (shared,) if shared else ()

    def _condition(self, row: Mapping[str, Any], where: str) -> _Ref | None:
        """The row's condition image; per-member columns must name the same image."""
        if not self._condition_cols:
            return None
        refs = [self._ref(row.get(c), c, where) for c in self._condition_cols]
        same_file = refs[0].path is not None and refs[0].path == refs[-1].path
        if len(refs) == 2 and not same_file and not self._same_bytes(refs[0], refs[1]):
            a, b = self._condition_cols
            raise DataError(
                self.path,
                f"the pair has different condition images ({a} {_describe(refs[0])}, {b} "
                f"{_describe(refs[1])}); both members of a pair must share one condition",
                where=where,
            )
        return refs[0]

    # ------------------------------------------------------------------ row checks

    def _ref(self, value: Any, column: str, where: str) -> _Ref:
        if isinstance(value, Mapping):  # HF Image feature: {"bytes": ..., "path": ...}
            value = value.get("bytes") or value.get("path")
        if isinstance(value, bytes | bytearray | memoryview):
            if not value:
                raise DataError(self.path, f"{column}: image bytes are empty", where=where)
            return _Ref(column, data=bytes(value))
        if is_missing(value) or not isinstance(value, str):
            raise DataError(
                self.path, f"{column}: expected a file path or image bytes, got {value!r}", where=where
            )
        rel = Path(value)
        if ".." in rel.parts:
            raise DataError(
                self.path,
                f"{column} {value!r} contains '..' (paths must stay under {self.root})",
                where=where,
            )
        full = Path(os.path.normpath(rel if rel.is_absolute() else self.root / rel))
        if not full.is_relative_to(self.root):
            raise DataError(
                self.path, f"{column} {value!r} is outside the dataset root {self.root}", where=where
            )
        if not full.is_file():
            raise DataError(self.path, f"{column}: file {full} does not exist", where=where)
        return _Ref(column, path=full)

    def _check_row(self, i: int) -> _Row:
        row = self._table.row(i)
        where = self._table.where(i)
        prompt = row.get(self._prompt_col)
        if not isinstance(prompt, str):
            raise DataError(self.path, f"prompt must be a string, got {prompt!r}", where=where)
        if not prompt.strip():
            raise DataError(self.path, f"empty prompt ({self._prompt_col!r})", where=where)
        labels = self._labels(row, where)
        col_a, col_b = self._media_cols
        ref_a, ref_b = self._ref(row.get(col_a), col_a, where), self._ref(row.get(col_b), col_b, where)
        if ref_a.path is not None and ref_a.path == ref_b.path:
            raise DataError(self.path, f"{col_a} and {col_b} are the same file {ref_a.path}", where=where)
        if self._same_bytes(ref_a, ref_b):
            raise DataError(self.path, f"{col_a} and {col_b} have identical bytes", where=where)
        meta = row.get("meta") if isinstance(row.get("meta"), Mapping) else {}
        condition = self._condition(row, where)
        return _Row(where, prompt.strip(), ref_a, ref_b, labels, dict(meta), condition)

    @staticmethod
    def _same_bytes(a: _Ref, b: _Ref) -> bool:
        if a.path is not None and b.path is not None:
            return filecmp.cmp(a.path, b.path, shallow=False)  # sizes first, then content
        bytes_a = a.data if a.data is not None else a.path.read_bytes()  # type: ignore[union-attr]
        bytes_b = b.data if b.data is not None else b.path.read_bytes()  # type: ignore[union-attr]
        return bytes_a == bytes_b

    def _load(self, ref: _Ref, where: str, *, transform: bool = True) -> Tensor:
        try:
            if ref.data is not None:
                media = decode_image_bytes(ref.data, source=f"{self.path} {where} {ref.column}")
            else:
                media = load_media(ref.path, max_frames=self._max_frames)  # type: ignore[arg-type]
        except MediaError as exc:
            # bytes: the row already names the source; files: keep the media path in the message
            reason = exc.reason if ref.data is not None else str(exc)
            raise DataError(self.path, f"{ref.column}: {reason}", where=where) from exc
        return self._transform(media) if transform and self._transform is not None else media

    # ------------------------------------------------------------------ public

    def __len__(self) -> int:
        return len(self._index)

    def __getitem__(self, index: int) -> PreferencePair:
        row = self._check_row(self._index[index])
        media_a, media_b = self._load(row.ref_a, row.where), self._load(row.ref_b, row.where)
        if self.order_by is None:
            media_w, media_l, labels = media_a, media_b, row.labels
        else:
            media_w, media_l, labels = canonicalise_pair(media_a, media_b, row.labels, order_by=self.order_by)
        condition = None
        if row.condition is not None:  # the model resizes it to the generated size
            condition = self._load(row.condition, row.where, transform=False)
            if condition.ndim != 3:
                raise DataError(
                    self.path,
                    f"{row.condition.column}: a condition must be an image, not a video",
                    where=row.where,
                )
        source = f"{self.path} {row.where}"
        return PreferencePair(row.prompt, media_w, media_l, labels, source, row.meta, condition)

    def prompt(self, index: int) -> str:
        """The prompt of item ``index`` (reads the row only; no media decoded)."""
        return self._check_row(self._index[index]).prompt

    def media_sources(self, index: int) -> tuple[str, tuple[Path | bytes, Path | bytes]]:
        """``(where, (media_w, media_l))`` of item ``index`` as files or encoded bytes, in the order
        :meth:`__getitem__` gives them (for reading headers without decoding pixels)."""
        row = self._check_row(self._index[index])
        a, b = (r.path if r.data is None else r.data for r in (row.ref_a, row.ref_b))
        if self.order_by is not None:
            a, b, _ = canonicalise_pair(a, b, row.labels, order_by=self.order_by)
        return row.where, (a, b)

    def validate(self, *, decode: bool = False, max_errors: int = 20) -> int:
        """Check every row: prompt, labels, paths (inside root, existing, distinct), bytes.

        Args:
            decode: also decode every media file (slow; catches corrupt files).
            max_errors: how many problems to list in the message (all are counted).

        Returns:
            The number of rows (all valid).

        Raises:
            DataError: naming the file, the number of invalid rows, and the first
                ``max_errors`` problems, each with its row.
        """
        problems: list[str] = []
        for i in self._index:
            try:
                row = self._check_row(i)
                if decode:
                    self._load(row.ref_a, row.where)
                    self._load(row.ref_b, row.where)
            except DataError as exc:
                problems.append(f"{exc.where}: {exc.reason}" if exc.where else exc.reason)
        if problems:
            shown = "\n  ".join(problems[:max_errors])
            more = f"\n  ... and {len(problems) - max_errors} more" if len(problems) > max_errors else ""
            raise DataError(
                self.path, f"{len(problems)} of {len(self._index)} rows are invalid:\n  {shown}{more}"
            )
        return len(self._index)


def load_preference_dataset(
    path: str | os.PathLike[str],
    *,
    root: str | os.PathLike[str] | None = None,
    dimensions: Sequence[str] | None = None,
    order_by: str | None = _AUTO,
    keep_ties: bool = True,
    max_frames: int | None = None,
    transform: Callable[[Tensor], Tensor] | None = None,
    split: str | None = None,
) -> PreferenceDataset:
    """Open a preference dataset: ``.parquet`` (file or folder of shards), ``.jsonl``,
    ``.csv``/``.tsv``, or a ``save_to_disk`` folder.

    Args:
        path: the dataset file or folder.
        root: folder that media paths are relative to (default: the dataset file's folder).
        dimensions: label dimensions to read (default: all found; see module doc).
        order_by: the dimension that orders each pair into (w, l); ``"auto"`` = the only
            dimension of a single-label dataset, else None (keep A = w, B = l).
        keep_ties: False drops pairs that tie on ``order_by`` (labels are parsed upfront).
        max_frames: keep only the first frames of each video.
        transform: applied to each loaded media tensor (e.g. resize to a common size).
        split: for a ``DatasetDict`` folder, which split to read.

    Returns:
        The dataset; rows are checked and decoded lazily.

    Raises:
        DataError: unreadable file, missing columns, or (with keep_ties=False) a bad label.
    """
    return PreferenceDataset(
        open_table(path, split=split),
        root=root,
        dimensions=dimensions,
        order_by=order_by,
        keep_ties=keep_ties,
        max_frames=max_frames,
        transform=transform,
    )


def _describe(ref: _Ref) -> str:
    return str(ref.path) if ref.path is not None else f"<{len(ref.data or b'')} bytes>"
