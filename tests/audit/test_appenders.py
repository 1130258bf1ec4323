"""Every appender outside the server signs: ``tensafe admin`` and ``tensafe tssp ... --audit-db``.

They take the deployment signing key from ``KeyManager.from_environment()`` and the interval
from ``TS_AUDIT_CHECKPOINT_EVERY``, so their records keep the interval rule; when the key
manager cannot be opened they fail closed with one line and write nothing.
"""

from __future__ import annotations

import argparse
from pathlib import Path

import pytest
from sqlalchemy import select

from tensafe.audit import iter_records, list_checkpoints, verify_chain
from tensafe.cli.main import main
from tensafe.db import Tenant, create_engine_from_url, ensure_tenant, make_session_factory
from tensafe.keys import KeyManager


@pytest.fixture
def deployment(migrated_database_url: str, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> str:
    """A development key configuration in a temporary data directory, interval 2."""
    monkeypatch.setenv("TS_DATA_DIR", str(tmp_path / "data"))
    monkeypatch.setenv("TS_AUDIT_CHECKPOINT_EVERY", "2")
    monkeypatch.delenv("TS_KEK_PROVIDER", raising=False)
    monkeypatch.delenv("TS_ENVIRONMENT", raising=False)
    return migrated_database_url


def _deployment_key(url: str) -> object:
    engine = create_engine_from_url(url)
    try:
        manager = KeyManager.from_environment(engine=engine, create=False)
        try:
            return manager.deployment_verifying_key()
        finally:
            manager.close()
    finally:
        engine.dispose()


def test_admin_appends_are_signed_at_the_deployment_interval(
    deployment: str, capsys: pytest.CaptureFixture[str]
) -> None:
    url = deployment
    assert main(["admin", "create-tenant", "acme", "--database-url", url]) == 0
    for _ in range(3):
        assert main(["admin", "create-api-key", "--tenant", "acme", "--database-url", url]) == 0
    capsys.readouterr()
    key = _deployment_key(url)
    engine = create_engine_from_url(url)
    try:
        with make_session_factory(engine).begin() as session:
            actions = [r.action for r in iter_records(session, tenant="acme")]
            lengths = [c.length for c in list_checkpoints(session, tenant="acme")]
            report = verify_chain(session, tenant="acme", verifying_key=key, checkpoint_every=2)  # type: ignore[arg-type]
    finally:
        engine.dispose()
    assert actions == ["admin.create_tenant", *["admin.create_api_key"] * 3]
    assert lengths == [2, 4]
    assert (report.length, report.unsigned_tail) == (4, 0)


def test_admin_fails_closed_without_the_key_manager(
    deployment: str, capsys: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("TS_KEK_PROVIDER", "no-such-provider")
    code = main(["admin", "create-tenant", "acme", "--database-url", deployment])
    err = capsys.readouterr().err
    assert code == 1
    assert err.startswith("tensafe: error: the audit log must be signed with the deployment signing key")
    assert "TS_KEK_PROVIDER" in err and err.count("\n") == 1
    engine = create_engine_from_url(deployment)
    try:
        with make_session_factory(engine).begin() as session:
            assert session.execute(select(Tenant.id).where(Tenant.id == "acme")).first() is None
    finally:
        engine.dispose()
    # Read-only commands do not need the key.
    assert main(["admin", "list-tenants", "--database-url", deployment]) == 0


def test_tssp_audit_sink_signs_at_the_deployment_interval(deployment: str) -> None:
    from tensafe.cli.tssp import _audit_sink
    from tensafe.package import PackageEvent

    engine = create_engine_from_url(deployment)
    try:
        with make_session_factory(engine).begin() as session:
            ensure_tenant(session, "edge")
        sink = _audit_sink(
            argparse.Namespace(audit_db=deployment, audit_tenant="edge", audit_actor="user:ops")
        )
        for _ in range(5):
            sink.append(PackageEvent.create("tssp.input.invalid", operation="verify", message="missing file"))
        key = _deployment_key(deployment)
        with make_session_factory(engine).begin() as session:
            lengths = [c.length for c in list_checkpoints(session, tenant="edge")]
            report = verify_chain(
                session,
                tenant="edge",
                verifying_key=key,  # type: ignore[arg-type]
                checkpoint_every=2,
                allow_unsigned_tail=True,
            )
    finally:
        engine.dispose()
    assert lengths == [2, 4] and report.unsigned_tail == 1


def test_tssp_audit_sink_fails_closed_without_the_key_manager(
    deployment: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    from tensafe.cli.tssp import _audit_sink
    from tensafe.package import PackageInputError

    monkeypatch.setenv("TS_KEK_PROVIDER", "no-such-provider")
    with pytest.raises(PackageInputError, match="key manager cannot be opened") as info:
        _audit_sink(argparse.Namespace(audit_db=deployment, audit_tenant="edge", audit_actor="user:ops"))
    assert info.value.exit_code == 2
    monkeypatch.setenv("TS_KEK_PROVIDER", "local")
    monkeypatch.setenv("TS_AUDIT_CHECKPOINT_EVERY", "zero")
    with pytest.raises(PackageInputError, match="TS_AUDIT_CHECKPOINT_EVERY must be a positive integer"):
        _audit_sink(argparse.Namespace(audit_db=deployment, audit_tenant="edge", audit_actor="user:ops"))
