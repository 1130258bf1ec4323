"""Blob backends: where the (already encrypted) bytes of artifacts live.

A backend stores opaque byte strings under slash-separated keys. It never sees plaintext:
:class:`tensafe.storage.EncryptedArtifactStore` encrypts before calling it. Writes are
all-or-nothing: a reader sees either the previous complete blob or the new complete blob,
never a prefix, even if the writing process is killed.
"""

from __future__ import annotations

import abc
import contextlib
import os
import re
import secrets
import tempfile
from collections.abc import Iterator
from pathlib import Path
from typing import BinaryIO

from tensafe._fsutil import fsync_dir
from tensafe.storage._errors import ArtifactNotFoundError, StoreError

__all__ = ["BlobBackend", "LocalFilesystemBackend", "validate_key"]

#: One path segment of a blob key: starts with an alphanumeric character, then
#: alphanumerics, ``.``, ``_`` or ``-``; at most 128 characters. This excludes ``.``,
#: ``..``, hidden names (used for temporary files) and anything a filesystem or object
#: store could interpret specially.
_SEGMENT = re.compile(r"[A-Za-z0-9][A-Za-z0-9._-]{0,127}")
_COPY_BUFFER = 4 << 20
_TEMP_PREFIX = ".tmp-"


def validate_key(key: str) -> list[str]:
    """Check a blob key and split it into its path segments.

    Args:
        key: Slash-separated key such as ``"tenant-a/model-1.tsa"``.

    Returns:
        The segments of the key.

    Raises:
        StoreError: The key is empty, absolute, has empty, ``.``/``..`` or hidden
            segments, or uses characters outside ``[A-Za-z0-9._-]``.
    """
    segments = key.split("/")
    if not key or len(segments) > 8 or not all(_SEGMENT.fullmatch(s) for s in segments):
        raise StoreError(
            "invalid blob key: use 1-8 slash-separated segments of letters, digits, '.', '_' "
            "or '-', each starting with a letter or digit"
        )
    return segments


class BlobBackend(abc.ABC):
    """Interface every blob backend implements (local filesystem, object stores, ...)."""

    @abc.abstractmethod
    def put_stream(self, key: str, src: BinaryIO) -> int:
        """Store everything readable from ``src`` under ``key``, atomically.

        The blob becomes visible only after ``src`` is exhausted and the bytes are
        durable; if reading ``src`` raises, nothing is stored and any previous blob
        under ``key`` is untouched.

        Args:
            key: Blob key (see :func:`validate_key`).
            src: Readable binary stream; read until EOF.

        Returns:
            The number of bytes stored.
        """

    @contextlib.contextmanager
    def open_atomic(self, key: str) -> Iterator[BinaryIO]:
        """Open a writer whose bytes become the blob under ``key`` when the block exits cleanly.

        Writes are all-or-nothing as for :meth:`put_stream`: if the ``with`` block raises,
        nothing is stored and any previous blob is untouched. ``write`` always writes
        every byte it is given. This default spools to a temporary file and calls
        :meth:`put_stream`; backends override it to write in place.

        Args:
            key: Blob key (see :func:`validate_key`).
        """
        validate_key(key)
        with tempfile.TemporaryFile() as spool:
            yield spool  # type: ignore[misc]
            spool.seek(0)
            self.put_stream(key, spool)  # type: ignore[arg-type]

    @abc.abstractmethod
    def get_stream(self, key: str) -> contextlib.AbstractContextManager[BinaryIO]:
        """Open the blob under ``key`` for reading.

        Raises:
            ArtifactNotFoundError: No blob exists under ``key``.
        """

    @abc.abstractmethod
    def delete(self, key: str) -> bool:
        """Delete the blob under ``key``; returns whether one existed."""

    @abc.abstractmethod
    def exists(self, key: str) -> bool:
        """Whether a complete blob exists under ``key``."""

    @abc.abstractmethod
    def list(self, prefix: str = "") -> Iterator[str]:
        """Yield the keys of complete blobs under ``prefix`` (a key prefix ending at a segment)."""


class _FullWriter:
    """Write-only view of an unbuffered file whose ``write`` never writes short."""

    def __init__(self, raw: BinaryIO) -> None:
        self._raw = raw

    def writable(self) -> bool:
        return True

    def write(self, data: bytes | bytearray | memoryview) -> int:
        view = memoryview(data).cast("B")
        total = len(view)
        while view:
            written = self._raw.write(view)
            view = view[written:]
        return total

    def flush(self) -> None:
        self._raw.flush()


class LocalFilesystemBackend(BlobBackend):
    """Blobs as files under a root directory.

    Writes go to a hidden temporary file in the destination directory, are flushed and
    ``fsync``-ed, then moved into place with :func:`os.replace` (atomic on POSIX) and the
    directory is ``fsync``-ed so the rename itself is durable. A writer killed midway
    leaves at most a hidden ``.tmp-*`` file, which :meth:`list` and :meth:`exists`
    ignore and :meth:`remove_stale_temporaries` deletes. Files are created with mode
    0600 and directories with 0700.
    """

    def __init__(self, root: str | os.PathLike[str]) -> None:
        """Use (and create if needed) ``root`` as the storage directory."""
        self._root = Path(root).resolve()
        self._root.mkdir(mode=0o700, parents=True, exist_ok=True)

    @property
    def root(self) -> Path:
        """The storage directory."""
        return self._root

    def __repr__(self) -> str:
        return f"LocalFilesystemBackend(root={str(self._root)!r})"

    def _path(self, key: str) -> Path:
        return self._root.joinpath(*validate_key(key))

    def put_stream(self, key: str, src: BinaryIO) -> int:
        """See :meth:`BlobBackend.put_stream`."""
        path = self._path(key)
        directory = path.parent
        directory.mkdir(mode=0o700, parents=True, exist_ok=True)
        tmp = directory / f"{_TEMP_PREFIX}{path.name}.{secrets.token_hex(8)}"
        fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL | getattr(os, "O_CLOEXEC", 0), 0o600)
        total = 0
        try:
            with os.fdopen(fd, "wb", buffering=0) as out:
                while True:
                    block = src.read(_COPY_BUFFER)
                    if not block:
                        break
                    view = memoryview(block)
                    while view:
                        written = out.write(view)
                        view = view[written:]
                    total += len(block)
                os.fsync(out.fileno())
            os.replace(tmp, path)
        except BaseException:
            with contextlib.suppress(FileNotFoundError):
                tmp.unlink()
            raise
        fsync_dir(directory)
        return total

    @contextlib.contextmanager
    def open_atomic(self, key: str) -> Iterator[BinaryIO]:
        """See :meth:`BlobBackend.open_atomic`: a hidden temporary file, fsync, rename, fsync.

        ``write`` goes straight to the file (no user-space buffer) and loops until every
        byte is written.
        """
        path = self._path(key)
        directory = path.parent
        directory.mkdir(mode=0o700, parents=True, exist_ok=True)
        tmp = directory / f"{_TEMP_PREFIX}{path.name}.{secrets.token_hex(8)}"
        fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL | getattr(os, "O_CLOEXEC", 0), 0o600)
        try:
            with os.fdopen(fd, "wb", buffering=0) as raw:
                yield _FullWriter(raw)  # type: ignore[misc]
                os.fsync(raw.fileno())
            os.replace(tmp, path)
        except BaseException:
            with contextlib.suppress(FileNotFoundError):
                tmp.unlink()
            raise
        fsync_dir(directory)

    @contextlib.contextmanager
    def _open(self, key: str) -> Iterator[BinaryIO]:
        path = self._path(key)
        try:
            handle = path.open("rb")
        except (FileNotFoundError, IsADirectoryError, NotADirectoryError):
            raise ArtifactNotFoundError(f"no blob stored under {key!r}") from None
        with handle:
            yield handle

    def get_stream(self, key: str) -> contextlib.AbstractContextManager[BinaryIO]:
        """See :meth:`BlobBackend.get_stream`; the stream is seekable."""
        self._path(key)  # validate now, not when the context is entered
        return self._open(key)

    def delete(self, key: str) -> bool:
        """See :meth:`BlobBackend.delete`; the directory is ``fsync``-ed afterwards."""
        path = self._path(key)
        try:
            path.unlink()
        except (FileNotFoundError, IsADirectoryError):
            return False
        fsync_dir(path.parent)
        return True

    def exists(self, key: str) -> bool:
        """See :meth:`BlobBackend.exists`."""
        return self._path(key).is_file()

    def list(self, prefix: str = "") -> Iterator[str]:
        """See :meth:`BlobBackend.list`; keys are yielded in sorted order."""
        base = self._root.joinpath(*validate_key(prefix)) if prefix else self._root
        if not base.is_dir():
            return
        for dirpath, dirnames, filenames in os.walk(base):
            dirnames[:] = sorted(d for d in dirnames if not d.startswith("."))
            rel = Path(dirpath).relative_to(self._root)
            for name in sorted(filenames):
                if name.startswith("."):
                    continue
                yield "/".join((*rel.parts, name))

    def remove_stale_temporaries(self) -> int:
        """Delete temporary files left by writers that died; returns how many.

        Only call this when no write is in progress (for example at start-up).
        """
        removed = 0
        for dirpath, _dirnames, filenames in os.walk(self._root):
            for name in filenames:
                if name.startswith(_TEMP_PREFIX):
                    with contextlib.suppress(FileNotFoundError):
                        os.unlink(os.path.join(dirpath, name))
                        removed += 1
        return removed
