"""Reading the small JSON files that tag a saved folder's format (checkpoints, caches, reward models).

Each such file is a JSON object with a ``"format"`` name and, for some, a version. One reader checks
both, so every folder kind fails the same way: one error of the caller's type, naming the file.
"""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Any


def read_tagged_json(
    file: str | os.PathLike,
    fmt: str,
    *,
    error: type[Exception] = ValueError,
    version: int | None = None,
    version_key: str = "format_version",
    missing: str = "missing",
) -> dict[str, Any]:
    """The JSON object in ``file``, after checking ``data["format"] == fmt`` (and the version if given).

    Args:
        file: the JSON file.
        fmt: the format name it must carry.
        error: the exception type raised (the caller's own, e.g. ``CheckpointError``).
        version: the supported version (None: not checked).
        version_key: the key holding the version.
        missing: what the error says after the file name when the file does not exist.

    Raises:
        error: missing, unreadable, not a JSON object, another format or an unsupported version.
    """
    file = Path(file)
    try:
        data = json.loads(file.read_text(encoding="utf-8"))
    except FileNotFoundError:
        raise error(f"{file}: {missing}") from None
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as err:
        raise error(f"{file}: not valid JSON ({err})") from None
    if not isinstance(data, dict) or data.get("format") != fmt:
        got = data.get("format") if isinstance(data, dict) else type(data).__name__
        raise error(f"{file}: 'format' must be {fmt!r}, got {got!r}")
    if version is not None and data.get(version_key) != version:
        raise error(f"{file}: {version_key} {data.get(version_key)!r} is not supported (expected {version})")
    return data
