"""Files keel keeps private: its data directory is created 0700 and its state files 0600 (the SQLite database, its
``-wal`` and ``-shm``, the lock, the secret key file), whatever the umask. They hold tenants' data, key hashes and
webhook secrets; nobody but keel's own user has any business reading them."""

from __future__ import annotations

import contextlib
import os
from pathlib import Path

DIR_MODE = 0o700
FILE_MODE = 0o600


def private_dir(path: Path) -> Path:
    """Create ``path`` (and its parents) if missing; the directory keel creates itself is made 0700. One that
    already exists keeps its mode: it may be a folder the user chose and shares on purpose."""
    if not path.is_dir():
        path.mkdir(parents=True, exist_ok=True, mode=DIR_MODE)
        os.chmod(path, DIR_MODE)  # mkdir's mode is filtered by the umask
    return path


def private_file(path: Path) -> Path:
    """Create ``path`` empty and 0600 if missing (so it is never readable by others, not even for a moment); an
    existing one is narrowed to 0600 (a file an older keel made 0644)."""
    with contextlib.suppress(FileExistsError):
        os.close(os.open(path, os.O_CREAT | os.O_EXCL | os.O_WRONLY, FILE_MODE))
    os.chmod(path, FILE_MODE)
    return path
