"""The store's zero-copy put/get paths: every kind of source and sink, the atomic writer."""

from __future__ import annotations

import contextlib
import hashlib
import io
import os
from collections.abc import Iterator
from pathlib import Path
from typing import BinaryIO

import pytest

from tensafe.storage import (
    ArtifactIntegrityError,
    ArtifactNotFoundError,
    BlobBackend,
    EncryptedArtifactStore,
    LocalFilesystemBackend,
    StoreError,
)

CHUNK = 1024


class ReadOnly:
    """A source with only ``read``, returning fixed-size pieces regardless of what is asked."""

    def __init__(self, data: bytes, piece: int) -> None:
        self.data, self.pos, self.piece = data, 0, piece

    def read(self, n: int = -1) -> bytes:
        out = self.data[self.pos : self.pos + self.piece]
        self.pos += len(out)
        return out


class Trickle(io.RawIOBase):
    """A ``readinto`` source that returns at most ``piece`` bytes per call (short reads)."""

    def __init__(self, data: bytes, piece: int) -> None:
        super().__init__()
        self.data, self.pos, self.piece = data, 0, piece

    def readable(self) -> bool:
        return True

    def readinto(self, buffer: memoryview) -> int:  # type: ignore[override]
        n = min(len(buffer), self.piece, len(self.data) - self.pos)
        buffer[:n] = self.data[self.pos : self.pos + n]
        self.pos += n
        return n


class MutatingReader:
    """Returns the same bytearray from every read, rewriting it each time (a hostile source)."""

    def __init__(self, blocks: list[bytes]) -> None:
        self.blocks = list(blocks)
        self.buf = bytearray()

    def read(self, n: int = -1) -> bytearray:
        if not self.blocks:
            return bytearray()
        self.buf[:] = self.blocks.pop(0)
        return self.buf


class MemoryBackend(BlobBackend):
    """A backend with only the abstract methods, so the default ``open_atomic`` is used."""

    def __init__(self) -> None:
        self.blobs: dict[str, bytes] = {}

    def put_stream(self, key: str, src: BinaryIO) -> int:
        data = src.read()
        self.blobs[key] = data
        return len(data)

    @contextlib.contextmanager
    def _get(self, key: str) -> Iterator[BinaryIO]:
        if key not in self.blobs:
            raise ArtifactNotFoundError(key)
        yield io.BytesIO(self.blobs[key])

    def get_stream(self, key: str) -> contextlib.AbstractContextManager[BinaryIO]:
        return self._get(key)

    def delete(self, key: str) -> bool:
        return self.blobs.pop(key, None) is not None

    def exists(self, key: str) -> bool:
        return key in self.blobs

    def list(self, prefix: str = "") -> Iterator[str]:
        yield from sorted(k for k in self.blobs if k.startswith(prefix + "/"))


def _data(n: int) -> bytes:
    return hashlib.shake_256(n.to_bytes(4, "big")).digest(n) if n else b""


@pytest.mark.parametrize("size", [0, 1, CHUNK - 1, CHUNK, CHUNK + 1, 70_000, 300_001])
@pytest.mark.parametrize("kind", ["bytesio", "file", "read-only", "trickle"])
def test_every_source_kind_round_trips_with_an_independent_hash(
    store: EncryptedArtifactStore, tmp_path: Path, size: int, kind: str
) -> None:
    data = _data(size)
    src: object
    if kind == "bytesio":
        src = io.BytesIO(data)
    elif kind == "file":
        path = tmp_path / "plain.bin"
        path.write_bytes(data)
        src = path.open("rb")
    elif kind == "read-only":
        src = ReadOnly(data, piece=3000)  # more than one chunk per read, never aligned
    else:
        src = Trickle(data, piece=333)
    info = store.put("acme", "a", src, kind="adapter")  # type: ignore[arg-type]
    if kind == "file":
        src.close()  # type: ignore[attr-defined]
    assert (info.size, info.sha256) == (size, hashlib.sha256(data).hexdigest())
    out = tmp_path / "out.bin"
    with out.open("wb") as dst:
        got = store.get("acme", "a", dst)
    assert out.read_bytes() == data
    assert (got.size, got.sha256) == (size, info.sha256)
    assert store.info("acme", "a").sha256 == info.sha256
    with store.open("acme", "a") as stream:
        assert stream.read() == data


def test_a_source_reusing_its_buffer_cannot_corrupt_the_hash(store: EncryptedArtifactStore) -> None:
    blocks = [_data(200_000 + i) for i in range(6)]
    info = store.put("acme", "m", MutatingReader(blocks), kind="adapter")  # type: ignore[arg-type]
    joined = b"".join(blocks)
    assert info.sha256 == hashlib.sha256(joined).hexdigest()
    assert store.get_bytes("acme", "m") == joined


def test_a_non_blocking_source_is_refused_and_nothing_is_stored(store: EncryptedArtifactStore) -> None:
    class WouldBlock(io.RawIOBase):
        def readable(self) -> bool:
            return True

        def readinto(self, buffer: memoryview) -> None:  # type: ignore[override]
            return None

    with pytest.raises(StoreError, match="non-blocking"):
        store.put("acme", "nb", WouldBlock(), kind="adapter")  # type: ignore[arg-type]
    assert not store.exists("acme", "nb")


def test_a_failing_source_leaves_the_previous_artifact(store: EncryptedArtifactStore) -> None:
    store.put("acme", "keep", io.BytesIO(b"v1" * 5000), kind="adapter")

    class Boom:
        calls = 0

        def read(self, n: int = -1) -> bytes:
            self.calls += 1
            if self.calls > 3:
                raise OSError("disk gone")
            return b"x" * 4000

    with pytest.raises(OSError, match="disk gone"):
        store.put("acme", "keep", Boom(), kind="adapter", overwrite=True)  # type: ignore[arg-type]
    assert store.get_bytes("acme", "keep") == b"v1" * 5000
    backend = store.backend
    assert isinstance(backend, LocalFilesystemBackend)
    assert backend.remove_stale_temporaries() == 0


def test_default_open_atomic_works_for_a_minimal_backend() -> None:
    store = EncryptedArtifactStore(MemoryBackend(), _Keys(), chunk_size=CHUNK)
    data = _data(10_000)
    info = store.put("acme", "a", io.BytesIO(data), kind="adapter")
    assert info.sha256 == hashlib.sha256(data).hexdigest()
    assert store.get_bytes("acme", "a") == data
    assert store.list("acme") == ["a"]

    class Boom:
        def read(self, n: int = -1) -> bytes:
            raise OSError("source failed")

    with pytest.raises(OSError, match="source failed"):
        store.put("acme", "b", Boom(), kind="adapter")  # type: ignore[arg-type]
    assert not store.exists("acme", "b")


def test_local_open_atomic_is_all_or_nothing(tmp_path: Path) -> None:
    backend = LocalFilesystemBackend(tmp_path)
    with backend.open_atomic("t/a") as out:
        assert out.write(memoryview(b"hello world")[6:]) == 5
    with pytest.raises(RuntimeError), backend.open_atomic("t/a") as out:
        out.write(b"half")
        raise RuntimeError("stop")
    with backend.get_stream("t/a") as f:
        assert f.read() == b"world"
    assert sorted(p.name for p in (tmp_path / "t").iterdir()) == ["a"]


def test_truncating_the_trailer_is_detected_by_get_and_info(store: EncryptedArtifactStore) -> None:
    store.put("acme", "t", io.BytesIO(_data(5000)), kind="adapter")
    backend = store.backend
    assert isinstance(backend, LocalFilesystemBackend)
    path = backend.root / "acme" / "t.tsa"
    blob = path.read_bytes()
    for cut in (1, 10, 60):
        path.write_bytes(blob[:-cut])
        with pytest.raises(ArtifactIntegrityError):
            store.get("acme", "t", io.BytesIO())
        with pytest.raises(ArtifactIntegrityError):
            store.info("acme", "t")
    path.write_bytes(blob + b"\x00")
    with pytest.raises(ArtifactIntegrityError):
        store.info("acme", "t")


class _Keys:
    dek = os.urandom(32)

    def encryption_key(self, tenant: str) -> tuple[int, bytes]:
        return 1, self.dek

    def decryption_key(self, tenant: str, dek_version: int) -> bytes:
        return self.dek
