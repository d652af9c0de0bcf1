"""File modes of atomic writes: temporary files and folders made shareable under the process umask.

``tempfile.mkstemp`` creates files with mode 0600 and ``tempfile.mkdtemp`` folders with mode 0700 (so no
other user can read a half-written file). Renamed into place they would keep those modes whatever the
umask, so every atomic writer calls :func:`match_umask` on its temporary path before the rename: a file
gets 0666 & ~umask, a folder 0777 & ~umask -- the modes ``open`` and ``mkdir`` would have given it.
Symlinks are never followed or changed.

The one home of the package's file chores:

- atomic writes: :func:`atomic_write` (a temporary path renamed over the destination),
  :func:`atomic_write_bytes`, :func:`atomic_write_text`, :func:`atomic_write_json`, :func:`write_jsonl`;
- JSON lines: :func:`parse_json_object` (one line, errors naming the file and line), :func:`read_jsonl`,
  :func:`append_jsonl`;
- safetensors files the same byte for byte for the same tensors and metadata: :func:`save_safetensors`,
  :func:`canonical_safetensors`;
- :func:`sha256_file`; :func:`exclusive_lock`, the lock that lets several processes share an output
  folder; :func:`first_difference`, which names the setting that makes a resumed run differ from the
  recorded one.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import os
import tempfile
from collections.abc import Callable, Iterable, Iterator, Mapping
from pathlib import Path
from typing import Any


def current_umask() -> int:
    """The process umask, read from /proc where the kernel reports it, else by setting and restoring it."""
    try:
        for line in Path("/proc/self/status").read_text().splitlines():
            if line.startswith("Umask:"):
                return int(line.split()[1], 8)
    except (OSError, ValueError, IndexError):
        pass
    mask = os.umask(0o022)  # no other way to read it; restored at once
    os.umask(mask)
    return mask


def match_umask(path: str | os.PathLike[str]) -> None:
    """Give ``path`` the mode a plain ``open``/``mkdir`` would: 0666 & ~umask for a file, 0777 & ~umask
    for a folder and, recursively, the same to everything inside it (symlinks are left alone).

    Writers that do not go through a temporary file of ours need it too: safetensors' ``save_file``
    (and so diffusers' ``save_pretrained``) creates its files with mode 0600.
    """
    mask = current_umask()
    path = Path(path)
    if path.is_symlink():
        return
    if not path.is_dir():
        os.chmod(path, 0o666 & ~mask)
        return
    os.chmod(path, 0o777 & ~mask)
    for root, dirs, files in os.walk(path):
        for name in dirs:
            if not os.path.islink(os.path.join(root, name)):
                os.chmod(os.path.join(root, name), 0o777 & ~mask)
        for name in files:
            if not os.path.islink(os.path.join(root, name)):
                os.chmod(os.path.join(root, name), 0o666 & ~mask)


@contextlib.contextmanager
def exclusive_lock(lock_path: str | os.PathLike[str]) -> Iterator[None]:
    """Hold an exclusive advisory lock (``fcntl.flock``) on ``lock_path`` for the block.

    A second process asking for the same lock waits until the first leaves the block (or dies: the
    kernel drops the lock with the process), so writers of one output folder take turns and each sees
    what the previous one wrote. The lock file is created if needed and left in place (removing it would
    let a third process lock a new file while a second still holds the old one). Where ``fcntl`` does
    not exist (Windows) the block runs unlocked.
    """
    path = Path(lock_path)
    path.parent.mkdir(parents=True, exist_ok=True)
    with open(path, "a") as handle:
        try:
            import fcntl
        except ImportError:  # pragma: no cover - not POSIX
            yield
            return
        fcntl.flock(handle.fileno(), fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(handle.fileno(), fcntl.LOCK_UN)


def first_difference(recorded: dict, wanted: dict) -> tuple[str, object, object] | None:
    """The first key (in ``wanted``'s order) whose value differs between two JSON-like records, with the
    recorded and wanted values; None if they agree. Values are compared after a JSON round trip (so a
    tuple equals the list it was written as); nested dicts are compared key by key (``settings.seed``)."""
    for key, value in wanted.items():
        old = recorded.get(key)
        new = json.loads(json.dumps(value, default=str))
        if isinstance(old, dict) and isinstance(new, dict):
            inner = first_difference(old, {**dict.fromkeys(old), **new})
            if inner is not None:
                return (f"{key}.{inner[0]}", inner[1], inner[2])
        elif old != new:
            return (key, old, new)
    return None


# ----------------------------------------------------------------------------- atomic writes


@contextlib.contextmanager
def atomic_write(path: str | os.PathLike[str]) -> Iterator[Path]:
    """Yield a temporary path next to ``path``; on success rename it over ``path``.

    The temporary file keeps the destination's extension (encoders choose the container from it) and
    lives in the same folder, so :func:`os.replace` is an atomic rename; it gets the mode a plain
    ``open`` would (:func:`match_umask`). On any error the temporary file is removed and an existing
    file at ``path`` is left untouched. Missing parent folders are created.
    """
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp_name = tempfile.mkstemp(dir=path.parent, prefix=f".{path.stem}.", suffix=f".tmp{path.suffix}")
    os.close(fd)
    tmp = Path(tmp_name)
    try:
        yield tmp
        match_umask(tmp)
        os.replace(tmp, path)
    finally:
        tmp.unlink(missing_ok=True)


def atomic_write_bytes(path: str | os.PathLike[str], data: bytes) -> Path:
    """Write ``data`` to ``path`` atomically (see :func:`atomic_write`); returns the path."""
    with atomic_write(path) as tmp:
        tmp.write_bytes(data)
    return Path(path)


def atomic_write_text(path: str | os.PathLike[str], text: str) -> Path:
    """Write ``text`` (UTF-8) to ``path`` atomically; returns the path."""
    return atomic_write_bytes(path, text.encode("utf-8"))


def atomic_write_json(path: str | os.PathLike[str], obj: Any, **dumps: Any) -> Path:
    """Write ``json.dumps(obj, **dumps)`` plus a final newline to ``path`` atomically (default indent 2)."""
    dumps.setdefault("indent", 2)
    return atomic_write_text(path, json.dumps(obj, **dumps) + "\n")


def write_jsonl(path: str | os.PathLike[str], rows: Iterable[Mapping[str, Any]], **dumps: Any) -> Path:
    """Write ``rows`` as JSON lines (one object a line) to ``path`` atomically; returns the path."""
    return atomic_write_text(path, "".join(json.dumps(row, **dumps) + "\n" for row in rows))


# ----------------------------------------------------------------------------- safetensors


def save_safetensors(
    tensors: Mapping[str, Any], path: str | os.PathLike[str], *, metadata: Mapping[str, str] | None = None
) -> Path:
    """Write ``tensors`` (name -> torch tensor) to ``path`` as a safetensors file, atomically, with the same
    bytes whenever the tensors and ``metadata`` are the same.

    safetensors holds the header's metadata in a hash map whose order changes from one map to the next
    (and so from run to run): with two or more metadata keys its own writer gives one of several byte
    strings for one content. The header is rewritten with sorted metadata (:func:`canonical_safetensors`).
    """
    import safetensors.torch

    data = safetensors.torch.save(dict(tensors), metadata=None if metadata is None else dict(metadata))
    return atomic_write_bytes(path, canonical_safetensors(data))


def canonical_safetensors(data: bytes) -> bytes:
    """The bytes of a safetensors file with its header's ``__metadata__`` first and in sorted key order.

    The format: an 8-byte little-endian header length N, N bytes of JSON header (padded with spaces to a
    multiple of 8), then the tensor bytes, whose offsets in the header count from the start of the tensor
    bytes; a header of another length therefore leaves them valid. The tensor entries keep their order.
    """
    n = int.from_bytes(data[:8], "little")
    header = json.loads(data[8 : 8 + n])
    meta = header.pop("__metadata__", None)
    if meta is not None:
        header = {"__metadata__": dict(sorted(meta.items())), **header}
    text = json.dumps(header, separators=(",", ":"), ensure_ascii=False).encode("utf-8")
    text += b" " * (-len(text) % 8)
    return len(text).to_bytes(8, "little") + text + data[8 + n :]


def sha256_file(path: str | os.PathLike[str], *, chunk: int = 1 << 20) -> str:
    """Hex SHA-256 of a file's bytes, read in ``chunk``-byte blocks."""
    digest = hashlib.sha256()
    with open(path, "rb") as handle:
        while block := handle.read(chunk):
            digest.update(block)
    return digest.hexdigest()


# ----------------------------------------------------------------------------- JSON lines


class FileRowError(ValueError):
    """A file or one of its rows is invalid; the message is ``"<path>: <where>: <reason>"``."""

    def __init__(self, path: str | os.PathLike[str], reason: str, *, where: str | None = None) -> None:
        self.path = str(path)
        self.where = where
        self.reason = reason
        loc = f"{self.path}: {where}" if where else self.path
        super().__init__(f"{loc}: {reason}")


def parse_json_object(
    line: str, path: str | os.PathLike[str], number: int, *, error: Callable[..., Exception] = FileRowError
) -> dict[str, Any]:
    """One JSON-object line of a JSON-lines file. Bad JSON or a non-object raises ``error(path, reason,
    where="line <number>")`` (:class:`FileRowError` unless the caller names its own, e.g. ``DataError``)."""
    try:
        obj = json.loads(line)
    except json.JSONDecodeError as exc:
        raise error(path, f"invalid JSON ({exc.msg} at column {exc.colno})", where=f"line {number}") from None
    if not isinstance(obj, dict):
        raise error(path, f"expected a JSON object, got {type(obj).__name__}", where=f"line {number}")
    return obj


def read_jsonl(
    path: str | os.PathLike[str], *, error: Callable[..., Exception] = FileRowError
) -> list[tuple[int, dict[str, Any]]]:
    """``(line number, object)`` of each non-blank line of a JSON-lines file (numbers from 1)."""
    text = Path(path).read_text(encoding="utf-8")
    return [
        (number, parse_json_object(line, path, number, error=error))
        for number, line in enumerate(text.splitlines(), start=1)
        if line.strip()
    ]


def append_jsonl(path: str | os.PathLike[str], rows: Iterable[Mapping[str, Any]], **dumps: Any) -> None:
    """Append ``rows`` as JSON lines to ``path`` (created with its folder if missing) and flush them.

    Each row is written with one ``write`` call in append mode, so concurrent appenders (under
    :func:`exclusive_lock`) never interleave within a line.
    """
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    with open(path, "a", encoding="utf-8") as handle:
        for row in rows:
            handle.write(json.dumps(row, **dumps) + "\n")
        handle.flush()
