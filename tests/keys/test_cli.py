"""``tensafe keys`` end to end in a development data dir."""

from __future__ import annotations

import io
import json
from pathlib import Path

import pytest
from sqlalchemy.orm import Session

from tensafe.cli.main import main
from tensafe.db import create_engine_from_url, ensure_tenant
from tensafe.keys import KeyManager
from tensafe.storage import EncryptedArtifactStore, LocalFilesystemBackend


def test_keys_lifecycle(dev_env: dict[str, str], capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["keys", "init"]) == 0
    out = capsys.readouterr().out
    assert "KEK provider: local (current version 1)" in out and "deployment signing key:" in out
    key_id = out.split("deployment signing key: ")[1].split()[0]

    engine = create_engine_from_url(dev_env["DATABASE_URL"])
    with Session(engine) as session, session.begin():
        ensure_tenant(session, "acme")
    manager = KeyManager.from_environment()
    store = EncryptedArtifactStore(
        LocalFilesystemBackend(Path(dev_env["TS_DATA_DIR"]) / "artifacts"), manager
    )
    store.put("acme", "m1", io.BytesIO(b"first"), kind="adapter")

    assert main(["keys", "rotate-dek", "--tenant", "acme"]) == 0
    assert "DEK version 2" in capsys.readouterr().out
    assert main(["keys", "rotate-kek"]) == 0
    assert "from version 1 to 2; 3 key(s) re-wrapped" in capsys.readouterr().out
    assert main(["keys", "status", "--json"]) == 0
    status = json.loads(capsys.readouterr().out)
    assert status["kek"]["current_version"] == 2 and status["signing_key_id"] == key_id
    assert status["deks_by_state"] == {"active": 1, "retired": 1}
    assert main(["keys", "status"]) == 0
    text = capsys.readouterr().out
    passphrase = (Path(dev_env["TS_DATA_DIR"]) / "keys" / "master.passphrase").read_text().strip()
    assert "environment: development" in text and passphrase not in text

    manager2 = KeyManager.from_environment()
    store2 = EncryptedArtifactStore(store.backend, manager2)
    assert store2.get_bytes("acme", "m1") == b"first"  # readable after both rotations

    assert main(["keys", "shred", "--tenant", "acme"]) == 1
    assert "without --yes" in capsys.readouterr().err
    assert main(["keys", "shred", "--tenant", "acme", "--yes", "--delete-artifacts"]) == 0
    assert "2 DEK version(s) destroyed" in capsys.readouterr().out
    assert store2.list("acme") == []
    engine.dispose()


def test_errors_are_one_line(
    dev_env: dict[str, str], capsys: pytest.CaptureFixture[str], monkeypatch
) -> None:
    assert main(["keys", "status"]) == 2  # database not migrated yet
    err = capsys.readouterr().err
    assert err.startswith("tensafe: error:") and "tensafe db upgrade" in err and err.count("\n") == 1
    assert main(["keys", "init"]) == 0
    capsys.readouterr()
    assert main(["keys", "rotate-dek", "--tenant", "ghost"]) == 1
    assert "unknown tenant 'ghost'" in capsys.readouterr().err
    monkeypatch.setenv("TS_ENVIRONMENT", "production")
    assert main(["keys", "status"]) == 2
    assert "no KEK provider configured" in capsys.readouterr().err


def test_rebind_command(
    dev_env: dict[str, str], capsys: pytest.CaptureFixture[str], request: pytest.FixtureRequest
) -> None:
    from keys.conftest import legacy_wrap
    from tensafe.db import utcnow
    from tensafe.keys import UnboundKeyError
    from tensafe.keys.models import TenantDek

    assert main(["keys", "init"]) == 0
    engine = create_engine_from_url(dev_env["DATABASE_URL"])
    manager = KeyManager.from_environment()
    dek = bytes(range(32))
    with Session(engine) as session, session.begin():
        ensure_tenant(session, "acme")
        session.add(
            TenantDek(
                tenant_id="acme",
                version=1,
                kek_provider="local",
                kek_version=1,
                wrapped_dek=legacy_wrap(manager.provider, dek, request),
                created_at=utcnow(),
                destroyed_at=None,
                state="active",
            )
        )
    with pytest.raises(UnboundKeyError):
        manager.decryption_key("acme", 1)
    capsys.readouterr()
    assert main(["keys", "status"]) == 0
    assert "legacy (unbound) wrapped keys: 1" in capsys.readouterr().out
    assert main(["keys", "rebind"]) == 0
    assert "1 legacy wrapped key(s) rebound" in capsys.readouterr().out
    assert main(["keys", "rebind"]) == 0
    assert "already bound" in capsys.readouterr().out
    assert KeyManager.from_environment().decryption_key("acme", 1) == dek
    manager.close()
    engine.dispose()
