"""The deployment's verifying key comes from the sealed private key, never from a column a DB writer can set.

The attacker replaces ``deployment_keys.public_key`` (and possibly ``key_id``) with raw
SQL, e.g. with the public half of a key they hold and with which they forge audit
checkpoints. Every path that hands out or uses the deployment key must refuse.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest
from sqlalchemy import Engine, text

from tensafe.cli.main import main
from tensafe.crypto.signing import HybridSigningKey
from tensafe.keys import KeyManagementError, KeyManager, LocalKekProvider, ProviderError

MISMATCH = "does not match the sealed private key"


def _swap_public_key(engine: Engine, public: bytes, *, key_id: str | None = None) -> None:
    with engine.begin() as conn:
        if key_id is None:
            conn.execute(text("UPDATE deployment_keys SET public_key = :p"), {"p": public})
        else:
            conn.execute(
                text("UPDATE deployment_keys SET public_key = :p, key_id = :k"), {"p": public, "k": key_id}
            )


def test_a_swapped_public_key_is_refused_everywhere(
    engine: Engine, local_provider: LocalKekProvider, make_tenant: Any
) -> None:
    manager = KeyManager(engine, local_provider)
    genuine = manager.deployment_signing_key()
    assert manager.deployment_verifying_key().public_bytes() == genuine.verifying_key().public_bytes()
    tenant = make_tenant()
    manager.create_dek(tenant)
    attacker = HybridSigningKey.generate()

    _swap_public_key(engine, attacker.verifying_key().public_bytes())

    # The manager that created the key (and cached it) re-reads the row, and so does a fresh one.
    for victim in (manager, KeyManager(engine, local_provider)):
        with pytest.raises(KeyManagementError, match=MISMATCH):
            victim.deployment_verifying_key()
        with pytest.raises(KeyManagementError, match=MISMATCH):
            victim.deployment_signing_key()
        with pytest.raises(KeyManagementError, match=MISMATCH):
            victim.rotate_dek(tenant)  # key events are signed with it: no change without a valid key
        status = victim.status()
        assert status["signing_key_id"] is None and MISMATCH in status["signing_key_error"]
    assert [d.version for d in manager.dek_versions(tenant)] == [1]


def test_a_swapped_public_key_and_key_id_do_not_unwrap(
    engine: Engine, local_provider: LocalKekProvider
) -> None:
    """Changing the key id too (to match the attacker's key) breaks the binding of the wrapped sealing key."""
    KeyManager(engine, local_provider).deployment_signing_key()
    attacker = HybridSigningKey.generate().verifying_key()
    _swap_public_key(engine, attacker.public_bytes(), key_id=attacker.key_id)
    with pytest.raises(ProviderError):
        KeyManager(engine, local_provider).deployment_verifying_key()


def test_the_verifying_key_is_derived_from_the_private_key(
    engine: Engine, local_provider: LocalKekProvider
) -> None:
    """Independent check: a signature made by the loaded private key verifies under the exported key."""
    key = KeyManager(engine, local_provider).deployment_signing_key()
    fresh = KeyManager(engine, local_provider)
    verifying = fresh.deployment_verifying_key()
    assert verifying.key_id == key.key_id
    verifying.verify(
        key.sign(b"checkpoint", context="tensafe/test/v1"), b"checkpoint", context="tensafe/test/v1"
    )


def test_cli_refuses_to_export_a_swapped_public_key(
    dev_env: dict[str, str], tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    from tensafe.db import create_engine_from_url

    assert main(["keys", "init"]) == 0
    capsys.readouterr()
    attacker = HybridSigningKey.generate().verifying_key().public_bytes()
    engine = create_engine_from_url(dev_env["DATABASE_URL"])
    _swap_public_key(engine, attacker)
    engine.dispose()

    out = tmp_path / "deployment.pub"
    assert main(["keys", "export-public-key", "--out", str(out)]) == 1
    err = capsys.readouterr().err
    assert err.startswith("tensafe: error:") and MISMATCH in err and err.count("\n") == 1
    assert not out.exists() and not list(tmp_path.glob(".deployment.pub*"))
    assert main(["keys", "status"]) == 1
    captured = capsys.readouterr()
    assert "deployment signing key: (invalid" in captured.out and MISMATCH in captured.err
    assert main(["keys", "init"]) == 1  # init loads the key and refuses it too
    assert MISMATCH in capsys.readouterr().err
