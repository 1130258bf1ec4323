"""The local filesystem backend, crash safety and the header parser under fuzzing."""

from __future__ import annotations

import io
import os
import signal
import subprocess
import sys
import textwrap
import time
from pathlib import Path

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from tensafe.storage import ArtifactIntegrityError, ArtifactNotFoundError, LocalFilesystemBackend, StoreError
from tensafe.storage._format import parse_header


def test_put_get_list_delete(tmp_path: Path) -> None:
    backend = LocalFilesystemBackend(tmp_path)
    assert backend.put_stream("t/a.tsa", io.BytesIO(b"hello")) == 5
    backend.put_stream("t/b.tsa", io.BytesIO(b""))
    backend.put_stream("u/c.tsa", io.BytesIO(b"x"))
    with backend.get_stream("t/a.tsa") as f:
        assert f.read() == b"hello"
    assert list(backend.list("t")) == ["t/a.tsa", "t/b.tsa"]
    assert list(backend.list()) == ["t/a.tsa", "t/b.tsa", "u/c.tsa"]
    assert oct((tmp_path / "t" / "a.tsa").stat().st_mode & 0o777) == oct(0o600)
    assert backend.delete("t/a.tsa") and not backend.exists("t/a.tsa")
    with pytest.raises(ArtifactNotFoundError):
        backend.get_stream("t/a.tsa").__enter__()


@pytest.mark.parametrize(
    "key", ["", "/abs", "../escape", "a/../b", "a//b", ".tmp-x", "a/.hidden", "a\\b", "a\x00"]
)
def test_unsafe_keys_are_refused(tmp_path: Path, key: str) -> None:
    backend = LocalFilesystemBackend(tmp_path / "root")
    with pytest.raises(StoreError):
        backend.put_stream(key, io.BytesIO(b"x"))
    assert not (tmp_path / "escape").exists()


def test_failing_source_leaves_previous_blob_and_no_temp(tmp_path: Path) -> None:
    backend = LocalFilesystemBackend(tmp_path)
    backend.put_stream("t/a", io.BytesIO(b"v1"))

    class Boom(io.RawIOBase):
        calls = 0

        def readable(self) -> bool:
            return True

        def read(self, n: int = -1) -> bytes:
            self.calls += 1
            if self.calls > 2:
                raise OSError("source failed")
            return b"partial"

    with pytest.raises(OSError):
        backend.put_stream("t/a", Boom())  # type: ignore[arg-type]
    with backend.get_stream("t/a") as f:
        assert f.read() == b"v1"
    assert sorted(p.name for p in (tmp_path / "t").iterdir()) == ["a"]


_WRITER = textwrap.dedent(
    """
    import os, sys, time
    from tensafe.storage import EncryptedArtifactStore, LocalFilesystemBackend

    class Keys:
        dek = bytes.fromhex(os.environ["DEK"])
        def encryption_key(self, tenant): return 1, self.dek
        def decryption_key(self, tenant, version): return self.dek

    class Slow:
        sent = 0
        def read(self, n=-1):
            self.sent += 1
            if self.sent == 4:
                print("writing", flush=True)
            time.sleep(0.01)
            return os.urandom(65536)

    store = EncryptedArtifactStore(LocalFilesystemBackend(sys.argv[1]), Keys(), chunk_size=4096)
    store.put("acme", sys.argv[2], Slow(), kind="adapter", overwrite=True)
    """
)


@pytest.mark.parametrize("artifact_id", ["fresh", "existing"])
def test_writer_killed_mid_write_leaves_no_artifact_and_no_corruption(
    tmp_path: Path, artifact_id: str
) -> None:
    from tensafe.storage import EncryptedArtifactStore

    dek = os.urandom(32)

    class Keys:
        def encryption_key(self, tenant: str) -> tuple[int, bytes]:
            return 1, dek

        def decryption_key(self, tenant: str, version: int) -> bytes:
            return dek

    backend = LocalFilesystemBackend(tmp_path)
    store = EncryptedArtifactStore(backend, Keys(), chunk_size=4096)
    store.put("acme", "existing", io.BytesIO(b"precious" * 1000), kind="adapter")
    store.put("acme", "neighbour", io.BytesIO(b"other" * 1000), kind="adapter")
    proc = subprocess.Popen(
        [sys.executable, "-c", _WRITER, str(tmp_path), artifact_id],
        stdout=subprocess.PIPE,
        env={**os.environ, "DEK": dek.hex()},
    )
    assert proc.stdout is not None
    assert proc.stdout.readline() == b"writing\n"
    time.sleep(0.1)
    temps = [p for p in (tmp_path / "acme").iterdir() if p.name.startswith(".tmp-")]
    assert temps and temps[0].stat().st_size > 0  # the write really was in progress
    os.kill(proc.pid, signal.SIGKILL)
    proc.wait()
    assert proc.returncode == -signal.SIGKILL
    assert store.list("acme") == ["existing", "neighbour"]
    assert store.get_bytes("acme", "existing") == b"precious" * 1000
    assert store.get_bytes("acme", "neighbour") == b"other" * 1000
    if artifact_id == "fresh":
        assert not store.exists("acme", "fresh")
        with pytest.raises(ArtifactNotFoundError):
            store.get_bytes("acme", "fresh")
    assert backend.remove_stale_temporaries() == 1
    assert sorted(p.name for p in (tmp_path / "acme").iterdir()) == ["existing.tsa", "neighbour.tsa"]


@settings(max_examples=300, deadline=None)
@given(data=st.binary(max_size=400))
def test_header_parser_rejects_garbage_cleanly(data: bytes) -> None:
    with pytest.raises(ArtifactIntegrityError):
        parse_header(io.BytesIO(data))


@settings(max_examples=300, deadline=None)
@given(
    body=st.dictionaries(
        st.sampled_from(
            [
                "alg",
                "artifact_id",
                "chunk_size",
                "created_at",
                "dek_version",
                "salt",
                "sealed_meta",
                "tenant",
                "x",
            ]
        ),
        st.one_of(
            st.integers(-5, 2**40), st.text(max_size=40), st.none(), st.booleans(), st.lists(st.integers())
        ),
    )
)
def test_header_parser_rejects_malformed_json_headers(body: dict[str, object]) -> None:
    import json

    text = json.dumps(body, sort_keys=True, separators=(",", ":")).encode()
    with pytest.raises(ArtifactIntegrityError):
        parse_header(io.BytesIO(b"TSAF\x01" + len(text).to_bytes(4, "big") + text))
