"""File modes of atomic writes: temporary files and folders made shareable under the process umask.

``tempfile.mkstemp`` creates files with mode 0600 and ``tempfile.mkdtemp`` folders with mode 0700 (so no
other user can read a half-written file). Renamed into place they would keep those modes whatever the
umask, so every atomic writer calls :func:`match_umask` on its temporary path before the rename: a file
gets 0666 & ~umask, a folder 0777 & ~umask -- the modes ``open`` and ``mkdir`` would have given it.
Symlinks are never followed or changed.

Also here: :func:`exclusive_lock`, the lock that lets several processes share an output folder, and
:func:`first_difference`, which names the setting that makes a resumed run differ from the recorded one.
"""

from __future__ import annotations

import contextlib
import os
from collections.abc import Iterator
from pathlib import Path


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
    import json

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
