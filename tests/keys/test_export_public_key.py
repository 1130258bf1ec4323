"""``tensafe keys export-public-key`` feeds offline audit verification end to end."""

from __future__ import annotations

from pathlib import Path

import pytest
from sqlalchemy.orm import Session

from tensafe.audit import AuditLog
from tensafe.cli.main import main
from tensafe.db import create_engine_from_url, ensure_tenant, make_session_factory
from tensafe.keys import KeyManager


def test_exported_key_verifies_the_audit_chain(
    dev_env: dict[str, str], tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    assert main(["keys", "init"]) == 0
    pub = tmp_path / "deployment.pub"
    assert main(["keys", "export-public-key", "--out", str(pub)]) == 0
    assert pub.read_bytes().startswith(b"-----BEGIN")
    assert b"PRIVATE" not in pub.read_bytes()
    # Refuses to overwrite an existing file.
    assert main(["keys", "export-public-key", "--out", str(pub)]) != 0

    manager = KeyManager.from_environment()
    engine = create_engine_from_url(dev_env["DATABASE_URL"])
    with Session(engine) as session, session.begin():
        ensure_tenant(session, "acme")
    log = AuditLog(make_session_factory(engine), signer=manager.deployment_signing_key(), checkpoint_every=2)
    for i in range(4):
        log.append(tenant="acme", actor="test", action="op", resource=f"r{i}")
    log.checkpoint(tenant="acme")
    manager.close()
    capsys.readouterr()
    url = dev_env["DATABASE_URL"]
    assert main(["audit", "verify", "--database-url", url, "--tenant", "acme", "--public-key", str(pub)]) == 0
    # Another deployment's key must not verify the checkpoints.
    other = tmp_path / "other.pub"
    from tensafe.crypto.signing import HybridSigningKey

    other.write_bytes(HybridSigningKey.generate().verifying_key().public_bytes())
    assert (
        main(["audit", "verify", "--database-url", url, "--tenant", "acme", "--public-key", str(other)]) != 0
    )
