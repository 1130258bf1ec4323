"""Durable, atomic file writes shared by every layer (imports nothing from TenSafe).

A file written with :func:`atomic_write_bytes` either keeps its old content or has the new
content in full: the data goes to a temporary file in the same directory, is flushed and
``fsync``-ed, replaces the target with :func:`os.replace` (atomic on POSIX), and the directory
is ``fsync``-ed so the rename itself survives a crash.
"""

from __future__ import annotations

import json
import os
import tempfile
from pathlib import Path
from typing import Any

__all__ = ["atomic_write_bytes", "atomic_write_json", "ensure_parent_dir", "fsync_dir"]


def fsync_dir(path: str | os.PathLike[str]) -> None:
    """``fsync`` a directory so that renames and creations inside it are durable."""
    fd = os.open(path, os.O_RDONLY | getattr(os, "O_DIRECTORY", 0))
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def ensure_parent_dir(path: str | os.PathLike[str], *, mode: int = 0o777) -> Path:
    """Create the missing parent directories of ``path`` (like ``mkdir -p``) and return ``path``.

    Directories that exist are left as they are; new ones get ``mode`` (minus the umask).

    Raises:
        OSError: A parent cannot be created (permission denied, or a file is in the way).
    """
    target = Path(path)
    parent = target.parent
    if not parent.is_dir():
        parent.mkdir(parents=True, exist_ok=True, mode=mode)
    return target


def atomic_write_bytes(path: str | os.PathLike[str], data: bytes, *, mode: int = 0o644) -> None:
    """Write ``data`` to ``path`` atomically and durably, with permission bits ``mode``."""
    target = Path(path)
    directory = target.parent if str(target.parent) else Path(".")
    fd, tmp_name = tempfile.mkstemp(prefix=f".{target.name}.", suffix=".tmp", dir=directory)
    try:
        with os.fdopen(fd, "wb") as fh:
            fh.write(data)
            fh.flush()
            os.fchmod(fh.fileno(), mode)
            os.fsync(fh.fileno())
        os.replace(tmp_name, target)
    except BaseException:
        Path(tmp_name).unlink(missing_ok=True)
        raise
    fsync_dir(directory)


def atomic_write_json(path: str | os.PathLike[str], payload: Any, *, mode: int = 0o644) -> None:
    """Write ``payload`` as indented, key-sorted JSON (with a final newline) atomically."""
    text = json.dumps(payload, indent=2, sort_keys=True, ensure_ascii=False) + "\n"
    atomic_write_bytes(path, text.encode("utf-8"), mode=mode)
