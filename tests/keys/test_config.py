"""Start-up configuration: production refuses weak settings; development creates keys once."""

from __future__ import annotations

import io
import logging
import os
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest
from sqlalchemy.orm import Session

from tensafe.db import create_engine_from_url, ensure_tenant, upgrade
from tensafe.keys import KeyConfigurationError, KeyManager, KeySettings, check_passphrase
from tensafe.storage import EncryptedArtifactStore, LocalFilesystemBackend

STRONG = "Tr0ub4dor&3-horse-battery-staple"
DB = "postgresql://db.internal/tensafe"


@pytest.mark.parametrize(
    ("env", "message"),
    [
        ({"TS_ENVIRONMENT": "production", "DATABASE_URL": DB}, "no KEK provider configured"),
        (
            {
                "TS_ENVIRONMENT": "production",
                "TS_KEK_PROVIDER": "local",
                "TS_KEY_MASTER": STRONG,
                "DATABASE_URL": DB,
            },
            "development only",
        ),
        ({"TS_ENVIRONMENT": "production", "TS_KEK_PROVIDER": "vault", "DATABASE_URL": DB}, "TS_VAULT_ADDR"),
        (
            {
                "TS_ENVIRONMENT": "production",
                "TS_KEK_PROVIDER": "vault",
                "TS_VAULT_ADDR": "http://vault.corp:8200",
                "TS_VAULT_TOKEN": "t",
                "DATABASE_URL": DB,
            },
            "plain http to a non-loopback",
        ),
        (
            {
                "TS_ENVIRONMENT": "production",
                "TS_KEK_PROVIDER": "vault",
                "TS_VAULT_ADDR": "https://vault.corp:8200",
                "DATABASE_URL": DB,
            },
            "TS_VAULT_TOKEN",
        ),
        (
            {
                "TS_ENVIRONMENT": "production",
                "TS_KEK_PROVIDER": "vault",
                "TS_VAULT_ADDR": "https://vault.corp:8200",
                "TS_VAULT_TOKEN": "t",
                "TS_VAULT_SKIP_VERIFY": "true",
                "DATABASE_URL": DB,
            },
            "TS_VAULT_CACERT",
        ),
        (
            {
                "TS_ENVIRONMENT": "production",
                "TS_KEK_PROVIDER": "vault",
                "TS_VAULT_ADDR": "https://vault.corp:8200",
                "TS_VAULT_TOKEN": "t",
            },
            "DATABASE_URL",
        ),
        (
            {
                "TS_ENVIRONMENT": "production",
                "TS_KEK_PROVIDER": "pkcs11",
                "TS_PKCS11_LIB": "/x.so",
                "TS_PKCS11_TOKEN_LABEL": "t",
                "DATABASE_URL": DB,
            },
            "TS_PKCS11_PIN",
        ),
        (
            {
                "TS_ENVIRONMENT": "production",
                "TS_KEK_PROVIDER": "vault",
                "TS_VAULT_ADDR": "https://v:8200",
                "TS_VAULT_TOKEN": "t",
                "TS_KEY_MASTER": "short",
                "DATABASE_URL": DB,
            },
            "shorter than 16",
        ),
        ({"TS_ENVIRONMENT": "staging"}, "TS_ENVIRONMENT must be"),
        ({"TS_KEK_PROVIDER": "kms"}, "TS_KEK_PROVIDER must be one of"),
        ({"TS_KEY_MASTER": "aaaaaaaaaaaaaaaaaaaaaaaa"}, "too little entropy"),
    ],
)
def test_weak_or_missing_configuration_is_refused(env: dict[str, str], message: str) -> None:
    with pytest.raises(KeyConfigurationError, match=message):
        KeySettings.from_environment(env)


def test_acceptable_production_settings() -> None:
    settings = KeySettings.from_environment(
        {
            "TS_ENVIRONMENT": "production",
            "TS_KEK_PROVIDER": "vault",
            "TS_VAULT_ADDR": "http://127.0.0.1:8200",
            "TS_VAULT_TOKEN": "s.secret-token",
            "DATABASE_URL": DB,
        }
    )
    assert settings.production and settings.provider == "vault"
    assert "secret-token" not in repr(settings)


@pytest.mark.parametrize("phrase", ["short", "passwordpassword", "abcabcabcabcabcabc", "1111111111111111111"])
def test_weak_passphrases(phrase: str) -> None:
    with pytest.raises(KeyConfigurationError):
        check_passphrase(phrase)


@pytest.mark.parametrize("phrase", [STRONG, "correct horse battery staple", "q8X-2vLp_9sR!mWz"])
def test_strong_passphrases(phrase: str) -> None:
    check_passphrase(phrase)


@pytest.mark.integration
def test_production_refuses_exportable_vault_key(openbao, openbao_transit_key: str) -> None:
    import hvac

    hvac.Client(url=openbao.address, token=openbao.token).secrets.transit.create_key(
        name=openbao_transit_key, key_type="aes256-gcm96", exportable=True
    )
    env = {
        "TS_ENVIRONMENT": "production",
        "TS_KEK_PROVIDER": "vault",
        "TS_VAULT_ADDR": openbao.address,
        "TS_VAULT_TOKEN": openbao.token,
        "TS_VAULT_TRANSIT_KEY": openbao_transit_key,
        "DATABASE_URL": "sqlite:///unused.db",
    }
    from tensafe.keys import open_provider

    with pytest.raises(KeyConfigurationError, match="exportable"):
        open_provider(KeySettings.from_environment(env), create=False)


def _dev_env(tmp_path: Path) -> dict[str, str]:
    return {"TS_DATA_DIR": str(tmp_path / "data"), "DATABASE_URL": f"sqlite:///{tmp_path / 'dev.db'}"}


def test_development_creates_keys_once_warns_and_survives_restart(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    env = _dev_env(tmp_path)
    upgrade(env["DATABASE_URL"])
    engine = create_engine_from_url(env["DATABASE_URL"])
    with Session(engine) as session, session.begin():
        ensure_tenant(session, "acme")
    with caplog.at_level(logging.WARNING, logger="tensafe.keys"):
        manager = KeyManager.from_environment(env, engine=engine)
    assert any(
        "DEVELOPMENT KEY CUSTODY" in r.getMessage() for r in caplog.records if r.levelno == logging.WARNING
    )
    kek_file = tmp_path / "data" / "keys" / "kek.json"
    passphrase_file = tmp_path / "data" / "keys" / "master.passphrase"
    assert oct(kek_file.stat().st_mode & 0o777) == oct(0o600)
    assert oct(passphrase_file.stat().st_mode & 0o777) == oct(0o600)
    kek_bytes = kek_file.read_bytes()
    signing_id = manager.deployment_signing_key().key_id
    store = EncryptedArtifactStore(LocalFilesystemBackend(tmp_path / "blobs"), manager)
    store.put("acme", "model", io.BytesIO(b"persisted across restarts"), kind="adapter")
    engine.dispose()

    # A brand-new process with the same environment reads the same KEK and keys.
    script = textwrap.dedent(
        """
        import sys
        from tensafe.keys import KeyManager
        from tensafe.storage import EncryptedArtifactStore, LocalFilesystemBackend
        m = KeyManager.from_environment()
        s = EncryptedArtifactStore(LocalFilesystemBackend(sys.argv[1]), m)
        sys.stdout.write(s.get_bytes("acme", "model").decode() + "|" + m.deployment_signing_key().key_id)
        """
    )
    clean = {k: v for k, v in os.environ.items() if not k.startswith("TS_")}
    out = subprocess.run(
        [sys.executable, "-c", script, str(tmp_path / "blobs")],
        env={**clean, **env},
        capture_output=True,
        text=True,
        check=True,
    )
    assert out.stdout == f"persisted across restarts|{signing_id}"
    assert kek_file.read_bytes() == kek_bytes  # never regenerated


def test_unmigrated_database_is_reported(tmp_path: Path) -> None:
    with pytest.raises(KeyConfigurationError, match="tensafe db upgrade"):
        KeyManager.from_environment(_dev_env(tmp_path))
