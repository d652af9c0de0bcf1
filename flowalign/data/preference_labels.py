"""Preference labels: their encoding, the pair order they imply, and one reader per label layout.

Per dimension: 1 = media_w (or A) better, 0 = tie, -1 = media_l (or B) better, -2 = missing. The
layouts (see :mod:`flowalign.data.preference` for the files that carry them):

- ``chosen``/``rejected`` media columns: the chosen item is better (one dimension, ``overall``);
- Pick-a-Pic ``label_0``/``label_1``: (1, 0), (0, 1) or (0.5, 0.5);
- a ``label`` column: ``"A" | "B" | "tie"`` (``overall``) or an object per dimension;
- one column per dimension (``VQ``, ``MQ``, ``TA``, ``Overall``) of ``A``, ``B``, ``same``/``tie``
  or an empty cell (missing).

:func:`label_reader` picks the reader of a table's columns once; the reader turns each row into
labels in A/B terms, raising :class:`~flowalign.data.errors.DataError` naming the file and row.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Mapping, Sequence
from functools import partial
from pathlib import Path
from typing import Any, TypeVar

from flowalign.data.errors import DataError
from flowalign.data.tables import Table

__all__ = [
    "LABEL_L_BETTER",
    "LABEL_MISSING",
    "LABEL_TIE",
    "LABEL_W_BETTER",
    "OVERALL",
    "LabelReader",
    "canonicalise_pair",
    "is_missing",
    "label_reader",
]

LABEL_W_BETTER = 1
LABEL_TIE = 0
LABEL_L_BETTER = -1
LABEL_MISSING = -2
OVERALL = "overall"
"""Dimension name of single-label datasets."""

_TEXT_LABELS = {"a": LABEL_W_BETTER, "b": LABEL_L_BETTER, "tie": LABEL_TIE, "same": LABEL_TIE}
DIMENSION_COLUMNS = ("VQ", "MQ", "TA", "Overall")

T = TypeVar("T")
LabelReader = Callable[[Mapping[str, Any], str], dict[str, int]]
"""``reader(row, where) -> {dimension: label}`` in A/B terms."""


def canonicalise_pair(
    media_a: T, media_b: T, labels: Mapping[str, int], *, order_by: str
) -> tuple[T, T, dict[str, int]]:
    """Order an A/B pair so that the first item is not worse on ``order_by``.

    If ``labels[order_by]`` is -1 (B better) the items swap and every non-missing label is
    negated (1 <-> -1; 0 and -2 stay); otherwise (A better, tie, missing) nothing moves.

    Args:
        media_a: item A (a tensor, a path, anything).
        media_b: item B.
        labels: dimension -> label in A/B terms (1 = A better, 0 tie, -1 B better, -2 missing).
        order_by: the dimension that decides the order.

    Returns:
        ``(media_w, media_l, labels_wl)`` with ``labels_wl[order_by]`` in {1, 0, -2}.

    Raises:
        KeyError: ``order_by`` is not in ``labels``.
    """
    if labels[order_by] != LABEL_L_BETTER:
        return media_a, media_b, dict(labels)
    flipped = {k: (v if v in (LABEL_TIE, LABEL_MISSING) else -v) for k, v in labels.items()}
    return media_b, media_a, flipped


def is_missing(value: Any) -> bool:
    return (
        value is None
        or (isinstance(value, float) and math.isnan(value))
        or (isinstance(value, str) and not value.strip())
    )


def label_reader(
    table: Table, media_columns: tuple[str, str], dimensions: Sequence[str] | None = None
) -> tuple[tuple[str, ...], LabelReader]:
    """The label dimensions of ``table`` and the reader of its layout (``dimensions``: the ones to
    read of a ``label`` column or of the dimension columns; default all found)."""
    path, cols = table.path, table.columns
    if media_columns == ("chosen", "rejected"):
        return (OVERALL,), _chosen_labels
    if "label_0" in cols or "label_1" in cols:
        for c in ("label_0", "label_1"):
            if c not in cols:
                raise DataError(path, f"missing label column {c!r}; found {cols}")
        return (OVERALL,), partial(_pickapic_labels, path)
    if "label" in cols:
        if dimensions:
            dims = tuple(dimensions)
        else:
            first = table.row(0).get("label") if table.num_rows else None
            dims = tuple(first) if isinstance(first, Mapping) and first else (OVERALL,)
        return dims, partial(_label_column_labels, path, dims)
    dims = tuple(dimensions) if dimensions else tuple(c for c in DIMENSION_COLUMNS if c in cols)
    if not dims:
        raise DataError(
            path,
            f"missing label columns: expected label_0/label_1, label, or any of {list(DIMENSION_COLUMNS)}; found {cols}",
        )
    for d in dims:
        if d not in cols:
            raise DataError(path, f"missing label column {d!r}; found {cols}")
    return dims, partial(_dimension_column_labels, path, dims)


def _chosen_labels(row: Mapping[str, Any], where: str) -> dict[str, int]:
    return {OVERALL: LABEL_W_BETTER}


def _pickapic_labels(path: Path, row: Mapping[str, Any], where: str) -> dict[str, int]:
    pair = (row.get("label_0"), row.get("label_1"))
    codes = {(1, 0): LABEL_W_BETTER, (0, 1): LABEL_L_BETTER, (0.5, 0.5): LABEL_TIE}
    try:
        return {OVERALL: codes[pair]}
    except (KeyError, TypeError):
        raise DataError(
            path, f"label_0/label_1 = {pair}, expected (1, 0), (0, 1) or (0.5, 0.5)", where=where
        ) from None


def _label_column_labels(
    path: Path, dims: tuple[str, ...], row: Mapping[str, Any], where: str
) -> dict[str, int]:
    if not isinstance(row.get("label"), Mapping):
        if dims != (OVERALL,):
            raise DataError(path, f"label must be an object with dimensions {list(dims)}", where=where)
        return _text_labels(path, dims, {OVERALL: row.get("label")}, where)
    unknown = sorted(set(row["label"]) - set(dims))
    if unknown:
        raise DataError(path, f"label has unknown dimensions {unknown}; expected {list(dims)}", where=where)
    return _text_labels(path, dims, {d: row["label"].get(d) for d in dims}, where)


def _dimension_column_labels(
    path: Path, dims: tuple[str, ...], row: Mapping[str, Any], where: str
) -> dict[str, int]:
    # a jsonl row may leave a dimension out: missing
    return _text_labels(path, dims, {d: row.get(d) for d in dims}, where)


def _text_labels(path: Path, dims: tuple[str, ...], raw: Mapping[str, Any], where: str) -> dict[str, int]:
    """``A``/``B``/``tie``/``same`` (any case) or empty per dimension -> codes; not all may be missing."""
    labels = {}
    for d, value in raw.items():
        if is_missing(value):
            labels[d] = LABEL_MISSING
            continue
        code = _TEXT_LABELS.get(value.strip().lower()) if isinstance(value, str) else None
        if code is None:
            raise DataError(path, f"label {d!r} = {value!r}, expected one of A, B, tie/same", where=where)
        labels[d] = code
    if all(v == LABEL_MISSING for v in labels.values()):
        raise DataError(path, f"missing label (dimensions {list(dims)} are all empty)", where=where)
    return labels
