"""KeyManager on SQLite and PostgreSQL: DEK lifecycle, KEK rotation, shredding, signing key."""

from __future__ import annotations

import io
import os
from pathlib import Path

import pytest
from sqlalchemy import Engine, select
from sqlalchemy.orm import Session

from keys.conftest import PASSPHRASE
from tensafe.crypto.signing import HybridSigningKey
from tensafe.db import Tenant
from tensafe.keys import (
    KekProvider,
    KeyConfigurationError,
    KeyManager,
    KeyNotFoundError,
    LocalKekProvider,
    TenantShreddedError,
)
from tensafe.keys.models import DeploymentKey, TenantDek
from tensafe.storage import EncryptedArtifactStore, LocalFilesystemBackend


def _rows(engine: Engine, tenant: str) -> list[TenantDek]:
    with Session(engine, expire_on_commit=False) as session:
        return list(
            session.execute(
                select(TenantDek).where(TenantDek.tenant_id == tenant).order_by(TenantDek.version)
            )
            .scalars()
            .all()
        )


@pytest.fixture
def manager(engine: Engine, local_provider: LocalKekProvider) -> KeyManager:
    return KeyManager(engine, local_provider)


@pytest.fixture
def store(tmp_path: Path, manager: KeyManager) -> EncryptedArtifactStore:
    return EncryptedArtifactStore(LocalFilesystemBackend(tmp_path / "blobs"), manager, chunk_size=1024)


def test_dek_created_once_and_stored_wrapped(manager: KeyManager, engine: Engine, make_tenant) -> None:
    tenant = make_tenant()
    version, dek = manager.encryption_key(tenant)
    assert version == 1 and len(dek) == 32
    assert manager.encryption_key(tenant) == (1, dek)
    assert manager.decryption_key(tenant, 1) == dek
    (row,) = _rows(engine, tenant)
    assert row.state == "active" and row.kek_provider == "local" and row.kek_version == 1
    assert row.wrapped_dek is not None and dek not in row.wrapped_dek
    # A fresh manager (another process) unwraps the same DEK from the database.
    fresh = KeyManager(engine, LocalKekProvider.open(manager.provider.path, passphrase=PASSPHRASE))  # type: ignore[attr-defined]
    assert fresh.decryption_key(tenant, 1) == dek


def test_unknown_tenant_and_version(manager: KeyManager, make_tenant) -> None:
    with pytest.raises(KeyNotFoundError, match="unknown tenant"):
        manager.encryption_key("no-such-tenant")
    tenant = make_tenant()
    manager.create_dek(tenant)
    with pytest.raises(KeyNotFoundError, match="no DEK version 7"):
        manager.decryption_key(tenant, 7)


def test_dek_rotation_new_data_new_version_old_data_readable(
    manager: KeyManager, store: EncryptedArtifactStore, engine: Engine, make_tenant
) -> None:
    tenant = make_tenant()
    old = os.urandom(5000)
    assert store.put(tenant, "old", io.BytesIO(old), kind="adapter").dek_version == 1
    assert manager.rotate_dek(tenant) == 2
    new = os.urandom(3000)
    assert store.put(tenant, "new", io.BytesIO(new), kind="adapter").dek_version == 2
    assert store.get_bytes(tenant, "old") == old and store.get_bytes(tenant, "new") == new
    assert [(r.version, r.state) for r in _rows(engine, tenant)] == [(1, "retired"), (2, "active")]
    assert manager.decryption_key(tenant, 1) != manager.decryption_key(tenant, 2)


@pytest.mark.integration
@pytest.mark.parametrize("provider_name", ["local", "vault", "pkcs11"])
def test_kek_rotation_rewraps_every_dek_without_touching_data(
    request: pytest.FixtureRequest, provider_name: str, engine: Engine, make_tenant, tmp_path: Path
) -> None:
    provider: KekProvider = request.getfixturevalue(f"{provider_name}_provider")
    manager = KeyManager(engine, provider)
    store = EncryptedArtifactStore(LocalFilesystemBackend(tmp_path / "blobs"), manager, chunk_size=1024)
    tenants = [make_tenant() for _ in range(3)]
    payloads = {t: os.urandom(2500) for t in tenants}
    for t in tenants:
        store.put(t, "a", io.BytesIO(payloads[t]), kind="adapter")
    manager.rotate_dek(tenants[0])
    store.put(tenants[0], "b", io.BytesIO(b"v2 data"), kind="adapter")
    signing_id = manager.deployment_signing_key().key_id
    blobs_before = {t: (tmp_path / "blobs" / t / "a.tsa").read_bytes() for t in tenants}
    wrapped_before = {(r.tenant_id, r.version): r.wrapped_dek for t in tenants for r in _rows(engine, t)}

    result = manager.rotate_kek()

    assert (result.previous_version, result.new_version) == (1, 2)
    assert result.rewrapped == len(wrapped_before) + 1  # every DEK plus the signing key
    for t in tenants:
        assert (tmp_path / "blobs" / t / "a.tsa").read_bytes() == blobs_before[t]  # data untouched
        for row in _rows(engine, t):
            assert row.kek_version == 2
            assert row.wrapped_dek != wrapped_before[(t, row.version)]
    manager2 = KeyManager(engine, provider)  # no cached DEKs
    store2 = EncryptedArtifactStore(LocalFilesystemBackend(tmp_path / "blobs"), manager2)
    for t in tenants:
        assert store2.get_bytes(t, "a") == payloads[t]
    assert store2.get_bytes(tenants[0], "b") == b"v2 data"
    assert manager2.deployment_signing_key().key_id == signing_id
    assert manager2.status()["live_deks_by_kek_version"] == {"2": len(wrapped_before)}


def test_shredding_makes_artifacts_unreadable(
    manager: KeyManager, store: EncryptedArtifactStore, engine: Engine, make_tenant, local_provider
) -> None:
    victim, bystander = make_tenant(), make_tenant()
    store.put(victim, "model", io.BytesIO(b"victim weights" * 100), kind="adapter")
    manager.rotate_dek(victim)
    store.put(victim, "model2", io.BytesIO(b"more"), kind="adapter")
    store.put(bystander, "model", io.BytesIO(b"bystander"), kind="adapter")
    other_process = KeyManager(engine, LocalKekProvider.open(local_provider.path, passphrase=PASSPHRASE))
    other_store = EncryptedArtifactStore(store.backend, other_process)
    assert other_store.get_bytes(victim, "model") == b"victim weights" * 100  # DEK now cached there

    assert manager.shred_tenant(victim) == 2

    for row in _rows(engine, victim):
        assert row.state == "destroyed" and row.wrapped_dek is None and row.destroyed_at is not None
    with Session(engine) as session:
        assert session.get(Tenant, victim).deleted_at is not None  # type: ignore[union-attr]
    for s in (store, other_store):  # the cache of another instance does not help
        with pytest.raises(TenantShreddedError, match="crypto-shredded"):
            s.get_bytes(victim, "model")
        with pytest.raises(TenantShreddedError):
            s.get_bytes(victim, "model2")
    with pytest.raises(TenantShreddedError):
        store.put(victim, "again", io.BytesIO(b"x"), kind="adapter")
    with pytest.raises(TenantShreddedError):
        manager.rotate_dek(victim)
    assert store.get_bytes(bystander, "model") == b"bystander"
    assert manager.shred_tenant(victim) == 0  # idempotent
    # Deleting the blobs too:
    assert manager.shred_tenant(bystander, store=store) == 1
    assert store.list(bystander) == []


def test_shredded_dek_bytes_are_gone_from_the_sqlite_files(local_provider, tmp_path: Path) -> None:
    """SQLite only (secure_delete + WAL checkpoint); PostgreSQL needs VACUUM, see the docs."""
    from tensafe.db import create_engine_from_url, ensure_tenant, upgrade

    url = f"sqlite:///{tmp_path / 'shred.db'}"
    upgrade(url)
    engine = create_engine_from_url(url)
    manager = KeyManager(engine, local_provider)
    with Session(engine) as session, session.begin():
        ensure_tenant(session, "victim")
    manager.create_dek("victim")
    manager.rotate_dek("victim")
    wrapped = [r.wrapped_dek for r in _rows(engine, "victim")]
    files = sorted((tmp_path).glob("shred.db*"))
    before = b"".join(p.read_bytes() for p in files)
    assert all(blob is not None and blob in before for blob in wrapped)  # the check can fail
    manager.shred_tenant("victim")  # connections stay open: no close-time checkpoint helps
    after = b"".join(p.read_bytes() for p in sorted(tmp_path.glob("shred.db*")))
    for blob in wrapped:
        assert blob is not None and blob not in after
    engine.dispose()


def test_deployment_signing_key_created_once_and_sealed(
    manager: KeyManager, engine: Engine, local_provider
) -> None:
    key = manager.deployment_signing_key()
    assert isinstance(key, HybridSigningKey)
    again = KeyManager(engine, LocalKekProvider.open(local_provider.path, passphrase=PASSPHRASE))
    loaded = again.deployment_signing_key()
    assert loaded.key_id == key.key_id
    signature = loaded.sign(b"checkpoint", context="tensafe/test")
    manager.deployment_verifying_key().verify(signature, b"checkpoint", context="tensafe/test")
    with Session(engine) as session:
        row = session.get(DeploymentKey, "signing")
        assert row is not None
        assert key.private_bytes(passphrase=None) not in row.sealed_private
        assert b"PRIVATE" not in row.sealed_private


@pytest.mark.integration
def test_wrong_provider_is_refused(
    manager: KeyManager, engine: Engine, make_tenant, tmp_path: Path, pkcs11_provider
) -> None:
    tenant = make_tenant()
    manager.create_dek(tenant)
    other = KeyManager(engine, pkcs11_provider)
    with pytest.raises(KeyConfigurationError, match="TS_KEK_PROVIDER"):
        other.decryption_key(tenant, 1)


def test_status_has_no_secrets(manager: KeyManager, make_tenant) -> None:
    tenant = make_tenant()
    _, dek = manager.encryption_key(tenant)
    status = manager.status()
    assert status["deks_by_state"] == {"active": 1} and status["tenants_with_deks"] == 1
    assert status["kek"]["provider"] == "local"
    text = repr(status) + repr(manager)
    assert dek.hex() not in text and PASSPHRASE.decode() not in text


def test_schema_matches_models(migrated_database_url: str) -> None:
    from alembic.autogenerate import compare_metadata
    from alembic.migration import MigrationContext

    import tensafe.keys.models  # noqa: F401
    from tensafe.db import Base, create_engine_from_url

    eng = create_engine_from_url(migrated_database_url)
    try:
        with eng.connect() as conn:
            diff = compare_metadata(MigrationContext.configure(conn), Base.metadata)
    finally:
        eng.dispose()
    mine = [d for d in diff if "tenant_deks" in repr(d) or "deployment_keys" in repr(d)]
    assert mine == []
