"""In-memory sealed records (``seal_bytes`` / ``unseal_bytes``): same format, same bindings."""

from __future__ import annotations

import pathlib

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from tensafe.storage import ArtifactIntegrityError, EncryptedArtifactStore, StoreError


@settings(max_examples=40, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(data=st.binary(max_size=3 * 1024 + 5))
def test_round_trip_and_info(store: EncryptedArtifactStore, data: bytes) -> None:
    import hashlib

    blob, info = store.seal_bytes("acme", "rec-1", data, kind="request-payload")
    assert len(data) < 16 or data not in blob  # ciphertext only
    assert info.size == len(data) and info.sha256 == hashlib.sha256(data).hexdigest()
    assert store.unseal_bytes("acme", "rec-1", blob) == data


def test_blob_is_a_tsaf_artifact_readable_by_get(store: EncryptedArtifactStore) -> None:
    """The in-memory blob is byte-for-byte an artifact: written to the backend, get() reads it."""
    blob, _ = store.seal_bytes("acme", "rec-2", b"payload " * 300, kind="request-result")
    with store.backend.open_atomic("acme/rec-2.tsa") as out:
        out.write(blob)
    assert store.get_bytes("acme", "rec-2") == b"payload " * 300
    assert store.info("acme", "rec-2").kind == "request-result"


def test_bound_to_tenant_and_record_id(store: EncryptedArtifactStore) -> None:
    blob, _ = store.seal_bytes("acme", "rec-3", b"secret", kind="request-payload")
    with pytest.raises(ArtifactIntegrityError):
        store.unseal_bytes("acme", "rec-4", blob)
    with pytest.raises(ArtifactIntegrityError):
        store.unseal_bytes("other", "rec-3", blob)


@settings(max_examples=80, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(position=st.floats(min_value=0, max_value=1, exclude_max=True), bit=st.integers(0, 7))
def test_any_bit_flip_is_rejected(store: EncryptedArtifactStore, position: float, bit: int) -> None:
    blob, _ = store.seal_bytes("acme", "rec-5", b"x" * 2500, kind="request-payload")
    i = int(position * len(blob))
    bad = bytearray(blob)
    bad[i] ^= 1 << bit
    with pytest.raises(ArtifactIntegrityError):
        store.unseal_bytes("acme", "rec-5", bytes(bad))


@pytest.mark.parametrize("cut", [0, 1, 10, 100, -1, -17])
def test_truncation_and_garbage_are_rejected(store: EncryptedArtifactStore, cut: int) -> None:
    blob, _ = store.seal_bytes("acme", "rec-6", b"y" * 2100, kind="request-payload")
    with pytest.raises(ArtifactIntegrityError):
        store.unseal_bytes("acme", "rec-6", blob[:cut])


def test_invalid_ids_are_refused(store: EncryptedArtifactStore) -> None:
    with pytest.raises(StoreError):
        store.seal_bytes("acme", "../x", b"", kind="request-payload")
    with pytest.raises(StoreError):
        store.seal_bytes("acme", "ok", b"", kind="Bad Kind")


def test_tenant_digest_is_keyed_per_tenant_stable_across_rotation_and_gone_after_shredding(
    tmp_path: pathlib.Path,
) -> None:
    """``tenant_digest``: the same data gives the same digest for one tenant (also after a DEK
    rotation), another digest for another tenant, never a plain hash, and none after shredding."""
    import hashlib

    from tensafe.crypto.kdf import Argon2idParams
    from tensafe.db import create_engine_from_url, ensure_tenant, make_session_factory, upgrade
    from tensafe.keys import KeyManager, LocalKekProvider, TenantShreddedError
    from tensafe.storage import EncryptedArtifactStore, LocalFilesystemBackend

    url = f"sqlite:///{tmp_path / 'db.sqlite'}"
    upgrade(url)
    engine = create_engine_from_url(url)
    with make_session_factory(engine).begin() as session:
        ensure_tenant(session, "acme")
        ensure_tenant(session, "other")
    provider = LocalKekProvider.create(
        tmp_path / "kek.json", passphrase=b"tenant digest test 1234", params=Argon2idParams.minimum()
    )
    keys = KeyManager(engine, provider)
    store = EncryptedArtifactStore(LocalFilesystemBackend(tmp_path / "blobs"), keys)
    label = b"tensafe/test-digest/v1"
    first = store.tenant_digest("acme", label=label, data=b"record")
    assert len(first) == 64 and first != hashlib.sha256(b"record").hexdigest()
    assert store.tenant_digest("acme", label=label, data=[b"rec", b"ord"]) == first
    assert store.tenant_digest("other", label=label, data=b"record") != first
    assert store.tenant_digest("acme", label=b"tensafe/other-purpose/v1", data=b"record") != first
    keys.rotate_dek("acme")
    assert store.tenant_digest("acme", label=label, data=b"record") == first
    keys.shred_tenant("acme")
    with pytest.raises(TenantShreddedError):
        store.tenant_digest("acme", label=label, data=b"record")
    keys.close()
    engine.dispose()
