"""File modes of atomic writes: temporary files and folders made shareable under the process umask.

``tempfile.mkstemp`` creates files with mode 0600 and ``tempfile.mkdtemp`` folders with mode 0700 (so no
other user can read a half-written file). Renamed into place they would keep those modes whatever the
umask, so every atomic writer calls :func:`match_umask` on its temporary path before the rename: a file
gets 0666 & ~umask, a folder 0777 & ~umask -- the modes ``open`` and ``mkdir`` would have given it.
Symlinks are never followed or changed.
"""

from __future__ import annotations

import os
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
