"""The error types of ``flowalign.data``: a bad file, row or value (or media file), named in the message."""

from __future__ import annotations

import os

from flowalign.files import FileRowError

__all__ = ["DataError", "MediaError"]


class DataError(FileRowError):
    """A data file or one of its rows is invalid.

    The message always starts with the file, then the location inside it when there is one:
    ``"pairs.jsonl: line 3: empty prompt"``. Text formats (txt, jsonl, csv, tsv) count
    ``line`` from 1 as editors do; tabular formats (parquet, HF datasets) count ``row``
    from 0 as pandas/pyarrow do.

    Attributes:
        path: the file (or a description of the source, e.g. a parquet cell).
        where: the location inside the file (``"line 3"``, ``"row 0"``) or None.
        reason: what is wrong, with the expected and actual value.
    """


class MediaError(DataError):
    """A media file could not be read or written; the message names the path and the reason."""

    def __init__(self, path: str | os.PathLike[str], reason: str) -> None:
        super().__init__(path, reason)
