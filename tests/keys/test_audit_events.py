"""Key custody is audited: every KeyManager change appends a record in the same transaction.

Runs on SQLite and PostgreSQL (the ``engine`` fixture follows ``database_url``).
"""

from __future__ import annotations

import io
from typing import Any

import pytest
from sqlalchemy import Engine, select
from sqlalchemy.orm import Session

from tensafe.audit import (
    AuditError,
    AuditRecord,
    AuditVerificationError,
    iter_records,
    list_checkpoints,
    verify_chain,
)
from tensafe.audit.canonical import canonical_json
from tensafe.cli.main import main
from tensafe.crypto.signing import HybridSigningKey
from tensafe.keys import DEPLOYMENT_TENANT, KEY_EVENTS, KeyConfigurationError, KeyManager, LocalKekProvider
from tensafe.keys.models import DeploymentKey, TenantDek
from tensafe.storage import EncryptedArtifactStore, LocalFilesystemBackend


def _records(engine: Engine, tenant: str) -> list[AuditRecord]:
    with Session(engine) as session, session.begin():
        return list(iter_records(session, tenant=tenant))


def _events(engine: Engine, tenant: str) -> list[str]:
    return [r.action for r in _records(engine, tenant)]


def _secrets_absent(records: list[AuditRecord], secrets: list[bytes]) -> None:
    """No key material, raw or hex, appears anywhere in the records."""
    for record in records:
        text = canonical_json(
            {"a": record.actor, "r": record.resource, "d": record.details, "x": record.action}
        ).decode()
        for secret in secrets:
            assert secret.hex() not in text
            assert secret.hex().upper() not in text


@pytest.fixture
def manager(engine: Engine, local_provider: LocalKekProvider) -> KeyManager:
    return KeyManager(engine, local_provider, actor="user:alice")


def test_every_event_id_is_dotted_with_a_severity(manager: KeyManager) -> None:
    for event, spec in KEY_EVENTS.items():
        assert event.startswith("keys.") and event.count(".") >= 2
        assert spec.severity in {"info", "warning", "error", "critical"}
        assert isinstance(spec.recoverable, bool) and spec.description


def test_dek_creation_and_rotation_are_recorded_in_the_tenant_chain(
    manager: KeyManager, engine: Engine, make_tenant: Any
) -> None:
    tenant = make_tenant()
    version, dek = manager.encryption_key(tenant)
    assert manager.create_dek(tenant) == version  # existing DEK: no second record
    v2 = manager.rotate_dek(tenant)
    records = _records(engine, tenant)
    assert [r.action for r in records] == ["keys.dek.created", "keys.dek.rotated"]
    created, rotated = records
    kek_version = manager.provider.current_version
    assert created.actor == rotated.actor == "user:alice"
    assert created.resource == f"dek/{tenant}/1"
    assert created.details == {
        "severity": "info",
        "recoverable": True,
        "dek_version": 1,
        "kek_provider": "local",
        "kek_version": kek_version,
    }
    assert rotated.details["dek_version"] == v2 == 2
    assert rotated.details["retired_versions"] == [1]
    with Session(engine) as session:
        wrapped = [r.wrapped_dek for r in session.execute(select(TenantDek)).scalars() if r.wrapped_dek]
    _secrets_absent(records, [dek, manager.decryption_key(tenant, 2), *wrapped])


def test_shredding_is_recorded_as_critical_and_not_recoverable(
    manager: KeyManager, engine: Engine, make_tenant: Any, tmp_path: Any
) -> None:
    tenant = make_tenant()
    store = EncryptedArtifactStore(LocalFilesystemBackend(tmp_path / "blobs"), manager)
    store.put(tenant, "a", io.BytesIO(b"weights"), kind="adapter")
    manager.rotate_dek(tenant)
    assert manager.shred_tenant(tenant, store=store) == 2
    last = _records(engine, tenant)[-1]
    assert last.action == "keys.tenant.shredded"
    assert last.resource == f"tenant/{tenant}"
    assert last.details == {
        "severity": "critical",
        "recoverable": False,
        "destroyed_versions": [1, 2],
        "destroyed_count": 2,
        "artifacts_deleted": True,
    }
    # Shredding again destroys nothing new but is still recorded.
    assert manager.shred_tenant(tenant) == 0
    assert _records(engine, tenant)[-1].details["destroyed_versions"] == []


def test_deployment_key_and_kek_rotation_go_to_the_deployment_chain(
    manager: KeyManager, engine: Engine, make_tenant: Any
) -> None:
    key = manager.deployment_signing_key()
    manager.deployment_signing_key()  # loading it again is not an event
    tenant = make_tenant()
    manager.create_dek(tenant)
    previous = manager.provider.current_version
    result = manager.rotate_kek()
    records = _records(engine, DEPLOYMENT_TENANT)
    assert [r.action for r in records] == [
        "keys.deployment_key.created",
        "keys.kek.rotated",
        "keys.kek.rewrapped",
    ]
    created, rotated, rewrapped = records
    assert created.details["key_id"] == key.key_id
    assert created.details["severity"] == "warning"
    assert created.resource == "deployment-key/signing"
    assert rotated.details == {
        "severity": "warning",
        "recoverable": True,
        "kek_provider": "local",
        "previous_version": previous,
        "new_version": result.new_version,
    }
    assert rewrapped.details["rewrapped"] == result.rewrapped == 2  # one DEK + the deployment key
    assert rewrapped.details["kek_version"] == result.new_version
    with Session(engine) as session:
        row = session.get(DeploymentKey, "signing")
        assert row is not None
        blobs = [row.wrapped_key, row.sealed_private]
    _secrets_absent(records, blobs)
    # The records form a valid chain that the audit verifier accepts.
    with Session(engine) as session, session.begin():
        report = verify_chain(
            session,
            tenant=DEPLOYMENT_TENANT,
            verifying_key=key.verifying_key(),
            allow_unsigned_tail=True,
        )
    assert report.length == 3


def test_a_failing_audit_append_rolls_the_key_change_back(
    engine: Engine, local_provider: LocalKekProvider, make_tenant: Any
) -> None:
    """Same transaction: an actor the audit log refuses makes every key change fail, atomically."""
    tenant = make_tenant()
    good = KeyManager(engine, local_provider)
    bad = KeyManager(engine, local_provider, actor="user:\x00evil")
    # First, while no signing key exists: its creation (audited) rolls back.
    with pytest.raises(AuditError):
        bad.deployment_signing_key()
    with Session(engine) as session:
        assert session.get(DeploymentKey, "signing") is None
    good.create_dek(tenant)  # creates the signing key too (it signs the key events' checkpoints)
    with pytest.raises(AuditError):
        bad.rotate_dek(tenant)
    with pytest.raises(AuditError):
        bad.shred_tenant(tenant)
    other = make_tenant()
    with pytest.raises(AuditError):
        bad.create_dek(other)
    assert [d.version for d in good.dek_versions(tenant)] == [1]
    assert [d.state for d in good.dek_versions(tenant)] == ["active"]
    assert good.dek_versions(other) == []
    assert _events(engine, tenant) == ["keys.dek.created"]
    assert _events(engine, DEPLOYMENT_TENANT) == ["keys.deployment_key.created"]
    assert _events(engine, other) == []
    assert good.decryption_key(tenant, 1)  # the tenant was not shredded


def test_default_actor_names_the_key_service(
    engine: Engine, local_provider: LocalKekProvider, make_tenant: Any
) -> None:
    tenant = make_tenant()
    KeyManager(engine, local_provider).create_dek(tenant)
    assert _records(engine, tenant)[0].actor == "service:tensafe.keys"


# --- signed checkpoints over key events ----------------------------------------------------


def test_key_events_are_covered_by_checkpoints_signed_with_the_deployment_key(
    engine: Engine, local_provider: LocalKekProvider, make_tenant: Any
) -> None:
    """With interval N, every run of N key events is covered by a checkpoint the verifier accepts."""
    manager = KeyManager(engine, local_provider, audit_checkpoint_every=2)
    tenant = make_tenant()
    manager.create_dek(tenant)
    manager.rotate_dek(tenant)
    manager.rotate_dek(tenant)
    manager.shred_tenant(tenant)
    manager.rotate_kek()
    key = manager.deployment_verifying_key()
    with Session(engine) as session, session.begin():
        tenant_checkpoints = list_checkpoints(session, tenant=tenant)
        deployment_checkpoints = list_checkpoints(session, tenant=DEPLOYMENT_TENANT)
        # tenant: strict (its 4 records are all signed); deployment: a tail shorter than N is allowed.
        verify_chain(session, tenant=tenant, verifying_key=key, checkpoint_every=2, allow_unsigned_tail=False)
        verify_chain(
            session, tenant=DEPLOYMENT_TENANT, verifying_key=key, checkpoint_every=2, allow_unsigned_tail=True
        )
        other = HybridSigningKey.generate().verifying_key()
        with pytest.raises(AuditVerificationError):
            verify_chain(session, tenant=tenant, verifying_key=other, checkpoint_every=2)
    # tenant: dek.created, dek.rotated, dek.rotated, tenant.shredded -> checkpoints at 2 and 4
    assert [c.length for c in tenant_checkpoints] == [2, 4]
    # deployment: deployment_key.created, kek.rotated, kek.rewrapped -> a checkpoint at 2
    assert [c.length for c in deployment_checkpoints] == [2]
    assert {c.key_id for c in tenant_checkpoints + deployment_checkpoints} == {key.key_id}


def test_the_signing_keys_creation_record_is_signed_by_the_new_key(
    engine: Engine, local_provider: LocalKekProvider
) -> None:
    """The recursion case: the first deployment record is due a checkpoint (N = 1) before any key exists."""
    manager = KeyManager(engine, local_provider, audit_checkpoint_every=1)
    key = manager.deployment_signing_key()
    with Session(engine) as session, session.begin():
        (checkpoint,) = list_checkpoints(session, tenant=DEPLOYMENT_TENANT)
        report = verify_chain(
            session, tenant=DEPLOYMENT_TENANT, verifying_key=key.verifying_key(), checkpoint_every=1
        )
    assert checkpoint.length == 1 and checkpoint.key_id == key.key_id and report.length == 1


def test_the_interval_comes_from_the_environment(
    engine: Engine, tmp_path: Any, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    base = {"TS_DATA_DIR": str(tmp_path / "data"), "TS_KEY_MASTER": "Zq8#vL2!pR7@wX4$kM9%"}
    assert KeyManager.from_environment(base, engine=engine).audit_checkpoint_every == 1000
    chosen = KeyManager.from_environment({**base, "TS_AUDIT_CHECKPOINT_EVERY": " 7 "}, engine=engine)
    assert chosen.audit_checkpoint_every == 7
    for bad in ("0", "-3", "abc", "1.5", "1e3", "true", "٣"):
        with pytest.raises(
            KeyConfigurationError, match="TS_AUDIT_CHECKPOINT_EVERY must be a positive integer"
        ):
            KeyManager.from_environment({**base, "TS_AUDIT_CHECKPOINT_EVERY": bad}, engine=engine)
    for value in (0, -1, True, 2.0):
        with pytest.raises(KeyConfigurationError, match="audit_checkpoint_every"):
            KeyManager(engine, chosen.provider, audit_checkpoint_every=value)  # type: ignore[arg-type]
    monkeypatch.setenv("TS_DATA_DIR", str(tmp_path / "data"))
    monkeypatch.setenv("TS_AUDIT_CHECKPOINT_EVERY", "often")
    assert main(["keys", "status"]) == 2
    err = capsys.readouterr().err
    assert err.startswith("tensafe: error:") and "TS_AUDIT_CHECKPOINT_EVERY" in err and err.count("\n") == 1
