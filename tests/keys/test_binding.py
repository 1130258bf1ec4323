"""A database writer cannot swap wrapped keys between rows, and legacy (unbound) rows fail closed.

Every attack runs with raw SQL against each KEK provider's real service (local file,
OpenBao Transit, SoftHSM2) on SQLite and PostgreSQL. The attacker has write access to
the database only, never to the KEK.
"""

from __future__ import annotations

import io
import os
import secrets
from pathlib import Path
from typing import Any

import pytest
from sqlalchemy import Engine, text
from sqlalchemy.orm import Session

from keys.conftest import legacy_wrap
from tensafe.audit import iter_records, list_checkpoints, verify_chain
from tensafe.crypto.aead import seal
from tensafe.crypto.signing import HybridSigningKey
from tensafe.db import utcnow
from tensafe.keys import (
    DEPLOYMENT_TENANT,
    KekProvider,
    KeyManagementError,
    KeyManager,
    ProviderError,
    UnboundKeyError,
)
from tensafe.keys.models import DeploymentKey, TenantDek
from tensafe.storage import EncryptedArtifactStore, LocalFilesystemBackend

pytestmark = pytest.mark.integration


def _blob(engine: Engine, tenant: str, version: int) -> bytes:
    with engine.connect() as conn:
        value = conn.execute(
            text("SELECT wrapped_dek FROM tenant_deks WHERE tenant_id = :t AND version = :v"),
            {"t": tenant, "v": version},
        ).scalar_one()
    return bytes(value)


def _set_blob(engine: Engine, tenant: str, version: int, blob: bytes, kek_version: int | None = None) -> None:
    """The attack: overwrite one row's wrapped DEK (and optionally its KEK version) with raw SQL."""
    with engine.begin() as conn:
        if kek_version is None:
            conn.execute(
                text("UPDATE tenant_deks SET wrapped_dek = :b WHERE tenant_id = :t AND version = :v"),
                {"b": blob, "t": tenant, "v": version},
            )
        else:
            conn.execute(
                text(
                    "UPDATE tenant_deks SET wrapped_dek = :b, kek_version = :k "
                    "WHERE tenant_id = :t AND version = :v"
                ),
                {"b": blob, "k": kek_version, "t": tenant, "v": version},
            )


def _fresh(engine: Engine, provider: KekProvider) -> KeyManager:
    """Another process: no cached DEKs or signing key."""
    return KeyManager(engine, provider)


def test_a_dek_copied_to_another_tenants_row_does_not_unwrap(
    provider: KekProvider, engine: Engine, make_tenant: Any, tmp_path: Path
) -> None:
    manager = KeyManager(engine, provider)
    store = EncryptedArtifactStore(LocalFilesystemBackend(tmp_path / "blobs"), manager, chunk_size=1024)
    a, b = make_tenant(), make_tenant()
    store.put(a, "model", io.BytesIO(b"tenant a weights"), kind="adapter")
    store.put(b, "model", io.BytesIO(b"tenant b weights"), kind="adapter")
    dek_a = manager.decryption_key(a, 1)
    assert manager.decryption_key(b, 1) != dek_a  # the check below can fail

    _set_blob(engine, b, 1, _blob(engine, a, 1))  # B's row now holds A's wrapped DEK

    for reader in (manager, _fresh(engine, provider)):  # a warm cache does not help either
        with pytest.raises(ProviderError):
            reader.decryption_key(b, 1)
        with pytest.raises(ProviderError):
            reader.encryption_key(b)  # new data of B is never encrypted under A's DEK
        reader_store = EncryptedArtifactStore(store.backend, reader)
        with pytest.raises(ProviderError):
            reader_store.put(b, "new", io.BytesIO(b"would be under A's key"), kind="adapter")
        with pytest.raises(ProviderError):
            reader_store.get_bytes(b, "model")
        assert reader.decryption_key(a, 1) == dek_a  # the victim's own row is untouched
    assert not store.exists(b, "new")
    # KEK rotation cannot launder the swapped blob into a valid wrap for B's row.
    with pytest.raises(ProviderError, match=f"tenant '{b}' DEK version 1"):
        manager.rotate_kek()
    with pytest.raises(ProviderError):
        _fresh(engine, provider).decryption_key(b, 1)


def test_a_dek_copied_to_another_version_does_not_unwrap(
    provider: KekProvider, engine: Engine, make_tenant: Any
) -> None:
    manager = KeyManager(engine, provider)
    tenant = make_tenant()
    manager.create_dek(tenant)
    manager.rotate_dek(tenant)
    old = manager.decryption_key(tenant, 1)

    _set_blob(engine, tenant, 2, _blob(engine, tenant, 1))  # version 2 (active) := version 1's blob

    fresh = _fresh(engine, provider)
    with pytest.raises(ProviderError):
        fresh.decryption_key(tenant, 2)
    with pytest.raises(ProviderError):
        fresh.encryption_key(tenant)
    assert fresh.decryption_key(tenant, 1) == old


def test_the_deployment_keys_wrapped_key_is_bound_to_its_row(
    provider: KekProvider, engine: Engine, make_tenant: Any
) -> None:
    """A tenant's wrapped DEK copied over the signing key's sealing key (same KEK) is refused, and back."""
    manager = KeyManager(engine, provider)
    tenant = make_tenant()
    manager.create_dek(tenant)  # creates the deployment signing key too
    with engine.connect() as conn:
        sealing_blob = bytes(conn.execute(text("SELECT wrapped_key FROM deployment_keys")).scalar_one())
    dek_blob = _blob(engine, tenant, 1)
    with engine.begin() as conn:
        conn.execute(text("UPDATE deployment_keys SET wrapped_key = :b"), {"b": dek_blob})
    with pytest.raises(ProviderError):
        _fresh(engine, provider).deployment_signing_key()
    with engine.begin() as conn:
        conn.execute(text("UPDATE deployment_keys SET wrapped_key = :b"), {"b": sealing_blob})
    _set_blob(engine, tenant, 1, sealing_blob)
    with pytest.raises(ProviderError):
        _fresh(engine, provider).decryption_key(tenant, 1)


# --- legacy rows -------------------------------------------------------------------------------


def _insert_legacy_signing_key(engine: Engine, provider: KekProvider, request: pytest.FixtureRequest) -> str:
    """A deployment_keys row exactly as TenSafe wrote it before binding; returns its key id."""
    key = HybridSigningKey.generate()
    sealing_key = secrets.token_bytes(32)
    sealed = seal(
        sealing_key,
        key.private_bytes(passphrase=None),
        label="tensafe/deployment-key/v1",
        associated_data=f"signing:{key.key_id}".encode(),
    )
    with Session(engine) as session, session.begin():
        session.add(
            DeploymentKey(
                name="signing",
                kind="hybrid-signing/ed25519+ml-dsa-65",
                key_id=key.key_id,
                public_key=key.verifying_key().public_bytes(),
                kek_provider=provider.name,
                kek_version=provider.current_version,
                wrapped_key=legacy_wrap(provider, sealing_key, request),
                sealed_private=sealed,
                created_at=utcnow(),
            )
        )
    return key.key_id


def _insert_legacy_dek(
    engine: Engine, provider: KekProvider, request: pytest.FixtureRequest, tenant: str, version: int
) -> bytes:
    dek = os.urandom(32)
    with Session(engine) as session, session.begin():
        session.add(
            TenantDek(
                tenant_id=tenant,
                version=version,
                kek_provider=provider.name,
                kek_version=provider.current_version,
                wrapped_dek=legacy_wrap(provider, dek, request),
                created_at=utcnow(),
                destroyed_at=None,
                state="active",
            )
        )
    return dek


def test_legacy_rows_fail_closed_until_rebind_and_rebind_is_audited(
    provider: KekProvider, engine: Engine, make_tenant: Any, request: pytest.FixtureRequest
) -> None:
    key_id = _insert_legacy_signing_key(engine, provider, request)
    a, b = make_tenant(), make_tenant()
    dek_a = _insert_legacy_dek(engine, provider, request, a, 1)
    dek_b = _insert_legacy_dek(engine, provider, request, b, 1)
    manager = KeyManager(engine, provider, audit_checkpoint_every=2)
    assert manager.legacy_key_count() == 3

    with pytest.raises(UnboundKeyError, match="tensafe keys rebind"):
        manager.decryption_key(a, 1)
    with pytest.raises(UnboundKeyError, match="tensafe keys rebind"):
        manager.encryption_key(b)
    with pytest.raises(UnboundKeyError, match="tensafe keys rebind"):
        manager.deployment_signing_key()
    with pytest.raises(UnboundKeyError):
        manager.rotate_dek(a)  # its audit record needs the (legacy) signing key
    status = manager.status()
    assert status["legacy_wrapped_keys"] == 3 and "rebind" in status["signing_key_error"]

    assert manager.rebind_all(batch_size=1) == 3  # batches of one row exercise the resumption

    assert manager.legacy_key_count() == 0
    assert manager.rebind_all() == 0  # idempotent
    fresh = _fresh(engine, provider)
    assert fresh.decryption_key(a, 1) == dek_a and fresh.encryption_key(b) == (1, dek_b)
    signing = fresh.deployment_signing_key()
    assert signing.key_id == key_id  # the same key, now bound
    for tenant in (a, b):
        blob = _blob(engine, tenant, 1)
        assert not provider.is_legacy(blob)
    # The rebound rows are bound: swapping them now fails like any other bound row.
    _set_blob(engine, b, 1, _blob(engine, a, 1))
    with pytest.raises(ProviderError):
        _fresh(engine, provider).decryption_key(b, 1)

    with Session(engine) as session, session.begin():
        records = list(iter_records(session, tenant=DEPLOYMENT_TENANT))
        checkpoints = list_checkpoints(session, tenant=DEPLOYMENT_TENANT)
        report = verify_chain(
            session, tenant=DEPLOYMENT_TENANT, verifying_key=signing.verifying_key(), allow_unsigned_tail=True
        )
    rebound = [r for r in records if r.action == "keys.kek.rebound"]
    assert [(r.details["scope"], r.details["rebound"]) for r in rebound] == [
        ("deployment-keys", 1),
        ("tenant-deks", 1),
        ("tenant-deks", 1),
    ]
    assert rebound[0].resource == "deployment-key/signing"
    assert all(
        r.details["severity"] == "warning" and r.details["kek_provider"] == provider.name for r in rebound
    )
    assert report.length == 3 and [c.length for c in checkpoints] == [2]  # signed by the rebound key
    assert checkpoints[0].key_id == key_id


def test_rebind_refuses_a_legacy_signing_key_whose_public_key_was_swapped(
    provider: KekProvider, engine: Engine, request: pytest.FixtureRequest
) -> None:
    _insert_legacy_signing_key(engine, provider, request)
    attacker = HybridSigningKey.generate().verifying_key().public_bytes()
    with engine.begin() as conn:
        conn.execute(text("UPDATE deployment_keys SET public_key = :p"), {"p": attacker})
    manager = KeyManager(engine, provider)
    with pytest.raises(KeyManagementError, match="does not match the sealed private key"):
        manager.rebind_all()
    assert manager.legacy_key_count() == 1  # nothing was rebound


def test_kek_rotation_binds_the_legacy_keys_it_rewraps(
    provider: KekProvider, engine: Engine, make_tenant: Any, request: pytest.FixtureRequest
) -> None:
    manager = KeyManager(engine, provider)
    manager.deployment_signing_key()
    tenant = make_tenant()
    dek = _insert_legacy_dek(engine, provider, request, tenant, 1)
    result = manager.rotate_kek()
    assert result.rewrapped == 2  # the legacy DEK and the signing key's sealing key
    blob = _blob(engine, tenant, 1)
    assert not provider.is_legacy(blob)
    assert _fresh(engine, provider).decryption_key(tenant, 1) == dek
    with Session(engine) as session, session.begin():
        last = list(iter_records(session, tenant=DEPLOYMENT_TENANT))[-1]
    assert last.action == "keys.kek.rewrapped" and last.details["rebound"] == 1
