"""The encrypted artifact store: round trips, the format spec, and every tampering case."""

from __future__ import annotations

import base64
import hashlib
import io
import json
import os
import shutil
import struct
import tracemalloc
from pathlib import Path

import pytest
from cryptography.hazmat.primitives import hashes
from cryptography.hazmat.primitives.ciphers.aead import AESGCM
from cryptography.hazmat.primitives.kdf.hkdf import HKDF
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from tensafe.crypto.stream import HEADER_SIZE, TAG_SIZE, decrypt_stream
from tensafe.storage import (
    ArtifactIntegrityError,
    ArtifactNotFoundError,
    EncryptedArtifactStore,
    LocalFilesystemBackend,
    StoreError,
)

CHUNK = 1024


def blob_path(store: EncryptedArtifactStore, tenant: str, artifact_id: str) -> Path:
    backend = store.backend
    assert isinstance(backend, LocalFilesystemBackend)
    return backend.root / tenant / f"{artifact_id}.tsa"


def header_len(data: bytes) -> int:
    return 9 + struct.unpack(">I", data[5:9])[0]


@settings(max_examples=30, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(data=st.binary(max_size=5 * CHUNK + 7))
def test_round_trip_any_size(store: EncryptedArtifactStore, data: bytes) -> None:
    info = store.put("acme", "a1", io.BytesIO(data), kind="adapter", metadata={"run": "7"}, overwrite=True)
    assert info.size == len(data)
    assert info.sha256 == hashlib.sha256(data).hexdigest()
    assert store.get_bytes("acme", "a1") == data
    got = store.info("acme", "a1")
    assert (got.kind, dict(got.metadata), got.sha256, got.size) == (
        "adapter",
        {"run": "7"},
        info.sha256,
        len(data),
    )


def test_chunk_boundaries_round_trip(store: EncryptedArtifactStore) -> None:
    for n in (0, 1, CHUNK - 1, CHUNK, CHUNK + 1, 3 * CHUNK, 3 * CHUNK + 1):
        data = os.urandom(n)
        store.put("acme", f"b{n}", io.BytesIO(data), kind="dataset")
        assert store.get_bytes("acme", f"b{n}") == data


def test_format_matches_spec_with_independent_hkdf(store: EncryptedArtifactStore, resolver) -> None:
    """Parse a stored artifact following docs/security/keys.md, deriving keys with pyca's HKDF."""
    data = os.urandom(2 * CHUNK + 100)
    store.put("acme", "spec", io.BytesIO(data), kind="adapter", metadata={"k": "v"})
    raw = blob_path(store, "acme", "spec").read_bytes()
    assert raw[:4] == b"TSAF" and raw[4] == 1
    hlen = struct.unpack(">I", raw[5:9])[0]
    header_bytes = raw[: 9 + hlen]
    header = json.loads(raw[9 : 9 + hlen])
    assert json.dumps(header, sort_keys=True, separators=(",", ":")).encode() == raw[9 : 9 + hlen]
    assert header["tenant"] == "acme" and header["artifact_id"] == "spec" and header["dek_version"] == 1
    salt = bytes.fromhex(header["salt"])

    def lp(b: bytes) -> bytes:
        return struct.pack(">H", len(b)) + b

    dek = resolver.decryption_key("acme", 1)
    info = b"tensafe/artifact-key/v1\x00" + lp(b"acme") + lp(b"spec") + struct.pack(">I", 1)
    subkey = HKDF(algorithm=hashes.SHA256(), length=32, salt=salt, info=info).derive(dek)
    ad = (
        b"tensafe/artifact/v1\x00\x01"
        + lp(b"acme")
        + lp(b"spec")
        + struct.pack(">I", 1)
        + lp(salt)
        + lp(hashlib.sha256(header_bytes).digest())
    )
    trailer_len = header["trailer_len"]
    body = raw[9 + hlen : len(raw) - trailer_len]
    out = io.BytesIO()
    decrypt_stream(subkey, io.BytesIO(body), out, associated_data=ad)
    assert out.getvalue() == data
    # The trailer is an AEAD envelope (docs/spec/crypto.md): version, alg, nonce, ct||tag.
    trailer = raw[len(raw) - trailer_len :]
    aad = b"tensafe/aead/v1" + trailer[:2] + bytes([27]) + b"tensafe/artifact-trailer/v1" + ad
    plain = AESGCM(subkey).decrypt(trailer[2:14], trailer[14:], aad)
    assert plain == hashlib.sha256(data).digest() + struct.pack(">Q", len(data))
    # The metadata is encrypted: neither the key nor the value appears on disk.
    assert b'"k"' not in raw and base64.b64decode(header["sealed_meta"])


def test_metadata_and_kind_are_not_on_disk(store: EncryptedArtifactStore) -> None:
    store.put("acme", "m", io.BytesIO(b"x"), kind="secretkind", metadata={"patient": "Jane Roe"})
    raw = blob_path(store, "acme", "m").read_bytes()
    assert b"Jane Roe" not in raw and b"secretkind" not in raw and b"patient" not in raw


@settings(max_examples=120, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(position=st.floats(min_value=0, max_value=1, exclude_max=True), bit=st.integers(0, 7))
def test_any_bit_flip_is_rejected(store: EncryptedArtifactStore, position: float, bit: int) -> None:
    if not store.exists("acme", "flip"):
        store.put("acme", "flip", io.BytesIO(os.urandom(3 * CHUNK + 5)), kind="adapter")
        shutil.copy(blob_path(store, "acme", "flip"), blob_path(store, "acme", "flip").with_suffix(".orig"))
    path = blob_path(store, "acme", "flip")
    original = path.with_suffix(".orig").read_bytes()
    damaged = bytearray(original)
    index = int(position * len(damaged))
    damaged[index] ^= 1 << bit
    path.write_bytes(bytes(damaged))
    with pytest.raises(ArtifactIntegrityError) as excinfo:
        store.get_bytes("acme", "flip")
    assert str(excinfo.value) == "artifact failed integrity verification"


def test_truncation_at_every_chunk_boundary_and_byte_is_rejected(store: EncryptedArtifactStore) -> None:
    data = os.urandom(4 * CHUNK)
    store.put("acme", "t", io.BytesIO(data), kind="adapter")
    path = blob_path(store, "acme", "t")
    raw = path.read_bytes()
    body_start = header_len(raw) + HEADER_SIZE
    cuts = {body_start + i * (CHUNK + TAG_SIZE) for i in range(5)}
    cuts |= {0, 4, 9, header_len(raw), len(raw) - 1, len(raw) - 40}
    cuts |= {c + d for c in list(cuts) for d in (-1, 1)}
    for cut in sorted(c for c in cuts if 0 <= c < len(raw)):
        path.write_bytes(raw[:cut])
        with pytest.raises(ArtifactIntegrityError):
            store.get_bytes("acme", "t")
    path.write_bytes(raw + b"\x00")
    with pytest.raises(ArtifactIntegrityError):
        store.get_bytes("acme", "t")
    path.write_bytes(raw)
    assert store.get_bytes("acme", "t") == data


def test_chunk_swap_and_duplication_are_rejected(store: EncryptedArtifactStore) -> None:
    store.put("acme", "s", io.BytesIO(os.urandom(4 * CHUNK)), kind="adapter")
    path = blob_path(store, "acme", "s")
    raw = path.read_bytes()
    start = header_len(raw) + HEADER_SIZE
    size = CHUNK + TAG_SIZE
    chunks = [raw[start + i * size : start + (i + 1) * size] for i in range(3)]
    rest = raw[start + 3 * size :]
    for order in ([1, 0, 2], [0, 2, 1], [0, 0, 2], [0, 1, 1]):
        path.write_bytes(raw[:start] + b"".join(chunks[i] for i in order) + rest)
        with pytest.raises(ArtifactIntegrityError):
            store.get_bytes("acme", "s")


def test_blob_copied_to_another_tenant_is_rejected(tmp_path: Path) -> None:
    class SameDek:
        """Both tenants share one DEK, so only the associated data stops the swap."""

        dek = os.urandom(32)

        def encryption_key(self, tenant: str) -> tuple[int, bytes]:
            return 1, self.dek

        def decryption_key(self, tenant: str, dek_version: int) -> bytes:
            return self.dek

    store = EncryptedArtifactStore(LocalFilesystemBackend(tmp_path), SameDek(), chunk_size=CHUNK)
    store.put("tenant-a", "model", io.BytesIO(b"secret weights of A"), kind="adapter")
    store.put("tenant-b", "other", io.BytesIO(b"B"), kind="adapter")
    (tmp_path / "tenant-b" / "model.tsa").write_bytes((tmp_path / "tenant-a" / "model.tsa").read_bytes())
    with pytest.raises(ArtifactIntegrityError):
        store.get_bytes("tenant-b", "model")
    # Even with the JSON header rewritten to name tenant-b, the body's AD no longer matches.
    raw = (tmp_path / "tenant-a" / "model.tsa").read_bytes()
    hlen = header_len(raw)
    header = json.loads(raw[9:hlen])
    header["tenant"] = "tenant-b"
    text = json.dumps(header, sort_keys=True, separators=(",", ":")).encode()
    forged = b"TSAF\x01" + struct.pack(">I", len(text)) + text + raw[hlen:]
    (tmp_path / "tenant-b" / "model.tsa").write_bytes(forged)
    with pytest.raises(ArtifactIntegrityError):
        store.get_bytes("tenant-b", "model")


def test_blob_copied_to_another_artifact_id_is_rejected(store: EncryptedArtifactStore) -> None:
    store.put("acme", "one", io.BytesIO(b"1" * 3000), kind="adapter")
    store.put("acme", "two", io.BytesIO(b"2" * 3000), kind="adapter")
    blob_path(store, "acme", "two").write_bytes(blob_path(store, "acme", "one").read_bytes())
    with pytest.raises(ArtifactIntegrityError):
        store.get_bytes("acme", "two")


def test_header_claiming_another_dek_version_is_rejected(store: EncryptedArtifactStore, resolver) -> None:
    store.put("acme", "v", io.BytesIO(b"data" * 500), kind="adapter")
    resolver.rotate("acme")
    path = blob_path(store, "acme", "v")
    raw = path.read_bytes()
    hlen = header_len(raw)
    for version in (2, 3):  # known (wrong key) and unknown to the resolver
        header = json.loads(raw[9:hlen])
        header["dek_version"] = version
        text = json.dumps(header, sort_keys=True, separators=(",", ":")).encode()
        path.write_bytes(b"TSAF\x01" + struct.pack(">I", len(text)) + text + raw[hlen:])
        with pytest.raises(ArtifactIntegrityError):
            store.get_bytes("acme", "v")


def test_trailer_swap_between_artifacts_is_rejected(store: EncryptedArtifactStore) -> None:
    store.put("acme", "x", io.BytesIO(b"a" * 100), kind="adapter")
    raw = blob_path(store, "acme", "x").read_bytes()
    store.put("acme", "x", io.BytesIO(b"b" * 100), kind="adapter", overwrite=True)
    raw2 = blob_path(store, "acme", "x").read_bytes()
    tl = json.loads(raw[9 : header_len(raw)])["trailer_len"]
    blob_path(store, "acme", "x").write_bytes(raw2[:-tl] + raw[-tl:])
    with pytest.raises(ArtifactIntegrityError):
        store.get_bytes("acme", "x")


def test_old_dek_versions_still_decrypt(store: EncryptedArtifactStore, resolver) -> None:
    store.put("acme", "old", io.BytesIO(b"old data"), kind="adapter")
    resolver.rotate("acme")
    info = store.put("acme", "new", io.BytesIO(b"new data"), kind="adapter")
    assert info.dek_version == 2
    assert store.info("acme", "old").dek_version == 1
    assert store.get_bytes("acme", "old") == b"old data"
    assert store.get_bytes("acme", "new") == b"new data"


def test_get_to_path_is_all_or_nothing(store: EncryptedArtifactStore, tmp_path: Path) -> None:
    data = os.urandom(3 * CHUNK)
    store.put("acme", "p", io.BytesIO(data), kind="adapter")
    target = tmp_path / "out" / "p.bin"
    target.parent.mkdir()
    info = store.get_to_path("acme", "p", target)
    assert target.read_bytes() == data and info.sha256 == hashlib.sha256(data).hexdigest()
    assert oct(target.stat().st_mode & 0o777) == oct(0o600)
    path = blob_path(store, "acme", "p")
    path.write_bytes(path.read_bytes()[:-10])
    target2 = tmp_path / "out" / "p2.bin"
    with pytest.raises(ArtifactIntegrityError):
        store.get_to_path("acme", "p", target2)
    assert sorted(p.name for p in target.parent.iterdir()) == ["p.bin"]


def test_open_streams_and_fails_closed_at_the_end(store: EncryptedArtifactStore) -> None:
    data = os.urandom(5 * CHUNK)
    store.put("acme", "o", io.BytesIO(data), kind="adapter")
    with store.open("acme", "o") as f:
        assert f.read(10) == data[:10]
        assert f.read() == data[10:]
    path = blob_path(store, "acme", "o")
    raw = path.read_bytes()
    start = header_len(raw) + HEADER_SIZE
    path.write_bytes(raw[: start + 3 * (CHUNK + TAG_SIZE)])  # drop the last chunks and trailer
    with store.open("acme", "o") as f, pytest.raises(ArtifactIntegrityError):
        f.read()


def test_not_found_overwrite_list_delete(store: EncryptedArtifactStore) -> None:
    with pytest.raises(ArtifactNotFoundError):
        store.get_bytes("acme", "missing")
    store.put("acme", "a", io.BytesIO(b"1"), kind="adapter")
    with pytest.raises(StoreError, match="already exists"):
        store.put("acme", "a", io.BytesIO(b"2"), kind="adapter")
    store.put("acme", "b", io.BytesIO(b"2"), kind="dataset")
    store.put("other", "c", io.BytesIO(b"3"), kind="dataset")
    assert store.list("acme") == ["a", "b"]
    assert store.delete("acme", "a") is True and store.delete("acme", "a") is False
    assert store.list("acme") == ["b"] and store.list("nobody") == []


@pytest.mark.parametrize("bad", ["", "..", ".hidden", "a/b", "a b", "x" * 129, "ü"])
def test_invalid_ids_are_refused(store: EncryptedArtifactStore, bad: str) -> None:
    with pytest.raises(StoreError):
        store.put("acme", bad, io.BytesIO(b"x"), kind="adapter")
    with pytest.raises(StoreError):
        store.put(bad, "ok", io.BytesIO(b"x"), kind="adapter")


def test_bad_kind_and_metadata_are_refused(store: EncryptedArtifactStore) -> None:
    with pytest.raises(StoreError):
        store.put("acme", "k", io.BytesIO(b"x"), kind="Bad Kind")
    with pytest.raises(StoreError):
        store.put("acme", "k", io.BytesIO(b"x"), kind="adapter", metadata={"n": 1})  # type: ignore[dict-item]
    with pytest.raises(StoreError):
        store.put("acme", "k", io.BytesIO(b"x"), kind="adapter", metadata={"big": "x" * 20000})
    assert not store.exists("acme", "k")


class _Zeros:
    """A readable of ``n`` bytes produced on demand (no large buffer)."""

    def __init__(self, n: int) -> None:
        self.left = n

    def read(self, size: int = -1) -> bytes:
        size = self.left if size < 0 else min(size, self.left)
        self.left -= size
        return bytes(size)


class _Sink:
    def __init__(self) -> None:
        self.hash = hashlib.sha256()
        self.n = 0

    def write(self, b: bytes) -> int:
        self.hash.update(b)
        self.n += len(b)
        return len(b)


def test_memory_is_constant_for_large_artifacts(tmp_path: Path, resolver) -> None:
    """Python allocations stay far below the artifact size while writing and reading 48 MiB."""
    store = EncryptedArtifactStore(LocalFilesystemBackend(tmp_path), resolver)
    size = 48 << 20
    tracemalloc.start()
    try:
        info = store.put("acme", "big", _Zeros(size), kind="dataset")  # type: ignore[arg-type]
        _, put_peak = tracemalloc.get_traced_memory()
        tracemalloc.reset_peak()
        sink = _Sink()
        store.get("acme", "big", sink)  # type: ignore[arg-type]
        _, get_peak = tracemalloc.get_traced_memory()
    finally:
        tracemalloc.stop()
    assert sink.n == size and info.sha256 == sink.hash.hexdigest() == hashlib.sha256(bytes(size)).hexdigest()
    assert put_peak < 12 << 20, put_peak
    assert get_peak < 12 << 20, get_peak


def test_tampered_header_timestamp_is_integrity_error(store: EncryptedArtifactStore) -> None:
    """Regression (found by Hypothesis): an invalid month in the header is tampering, not a crash."""
    import re

    store.put("t1", "stamp", io.BytesIO(b"payload"), kind="test")
    path = blob_path(store, "t1", "stamp")
    raw = bytearray(path.read_bytes())
    match = re.search(rb"\d{4}-(\d{2})-\d{2}T", bytes(raw))
    assert match is not None
    raw[match.start(1)] = ord("3")  # month 3x: no such month
    path.write_bytes(bytes(raw))
    with pytest.raises(ArtifactIntegrityError):
        store.get_bytes("t1", "stamp")
