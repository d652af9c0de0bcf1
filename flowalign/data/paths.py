"""Media paths named inside dataset files (manifests, candidate lists): relative and confined to a root.

A dataset file may only name media inside its own folder (the root): a path with a ``..`` component,
or an absolute path outside the root, is refused, so a crafted file cannot make a training run read
arbitrary files. Symlinks inside the root are followed (hub snapshots are symlinks). The same rule as
:mod:`flowalign.data.preference`.
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any

from torch import Tensor

from flowalign.data.errors import DataError

__all__ = ["load_row_media", "resolve_data_path"]


def resolve_data_path(
    root: str | os.PathLike[str], value: Any, *, source: str | os.PathLike[str], where: str, key: str
) -> Path:
    """The file that ``value`` names, relative to ``root`` (existence is not checked here).

    Args:
        root: the folder media paths start from (usually the dataset file's folder).
        value: the path as written in the file.
        source: the dataset file, for error messages.
        where: the row, e.g. ``"line 3"``.
        key: the field that held the path, e.g. ``"file"``.

    Raises:
        DataError: ``value`` is not a non-empty string, contains ``..``, or is absolute and outside ``root``.
    """
    if not isinstance(value, str) or not value.strip():
        raise DataError(source, f"{key!r} must be a non-empty path string, got {value!r:.200}", where=where)
    root = Path(os.path.abspath(root))
    rel = Path(value)
    if ".." in rel.parts:
        raise DataError(
            source, f"{key} {value!r:.200} contains '..' (paths must stay under {root})", where=where
        )
    full = Path(os.path.normpath(rel if rel.is_absolute() else root / rel))
    if not full.is_relative_to(root):
        raise DataError(source, f"{key} {value!r:.200} is outside the dataset folder {root}", where=where)
    return full


def load_row_media(file: Path, *, source: str | os.PathLike[str], where: str, key: str) -> Tensor:
    """:func:`~flowalign.data.media.load_media` of a row's file; a problem names the dataset file and row too.

    Raises:
        DataError: ``"<source>: <where>: <key>: <media path>: <reason>"``.
    """
    from flowalign.data.media import MediaError, load_media

    try:
        return load_media(file)
    except MediaError as err:
        raise DataError(source, f"{key}: {err}", where=where) from err
