"""``tensafe admin`` and the API key store: keys are shown once and stored only as hashes."""

from __future__ import annotations

import argparse
import datetime as dt
import re
from pathlib import Path

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from sqlalchemy import select, text

from tensafe.cli import admin
from tensafe.db import create_engine_from_url, make_session_factory
from tensafe.errors import TenSafeError
from tensafe.server.errors import AuthenticationError, TenantAdminError
from tensafe.server.models import ApiKey
from tensafe.server.tenants import authenticate, create_api_key, create_tenant, hash_api_key


@pytest.fixture(autouse=True)
def _deployment_key_dir(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """Admin commands sign audit checkpoints with the deployment key (``KeyManager.from_environment``):
    keep the development KEK it creates in this test's directory, not in the working directory."""
    monkeypatch.setenv("TS_DATA_DIR", str(tmp_path / "ts-data"))


def _run(url: str, *argv: str) -> int:
    parser = argparse.ArgumentParser(prog="tensafe")
    admin.register(parser.add_subparsers(dest="command"))
    args = parser.parse_args(["admin", *argv, "--database-url", url])
    code: int = args.handler(args)
    return code


def test_cli_tenant_and_key_lifecycle(migrated_database_url: str, capsys: pytest.CaptureFixture[str]) -> None:
    url = migrated_database_url
    assert _run(url, "create-tenant", "acme") == 0
    assert _run(url, "create-api-key", "--tenant", "acme", "--expires-in-days", "30") == 0
    key = capsys.readouterr().out.strip().splitlines()[-1]
    assert re.fullmatch(r"tml-[A-Za-z0-9_-]{43}", key)
    engine = create_engine_from_url(url)
    sessions = make_session_factory(engine)
    with sessions() as s:
        principal = authenticate(s, key)
        assert principal.tenant == "acme"
        row = s.get(ApiKey, principal.key_id)
        assert row is not None and row.key_hash == hash_api_key(key)
        # The key itself is nowhere in the database.
        dump = " ".join(str(v) for r in s.execute(text("SELECT * FROM api_keys")).all() for v in r)
        assert key not in dump and key[4:] not in dump
        assert dt.timedelta(days=29) < row.expires_at - row.created_at <= dt.timedelta(days=30)
    assert _run(url, "list-tenants") == 0
    assert "acme" in capsys.readouterr().out
    assert _run(url, "revoke-api-key", principal.key_id) == 0
    with sessions() as s, pytest.raises(AuthenticationError, match="revoked"):
        authenticate(s, key)
    assert _run(url, "list-api-keys", "--tenant", "acme") == 0
    assert "revoked" in capsys.readouterr().out
    engine.dispose()


def test_cli_errors_are_tensafe_errors(migrated_database_url: str, tmp_path, monkeypatch) -> None:  # type: ignore[no-untyped-def]
    with pytest.raises(TenantAdminError, match="unknown tenant"):
        _run(migrated_database_url, "create-api-key", "--tenant", "nope")
    _run(migrated_database_url, "create-tenant", "acme")
    with pytest.raises(TenantAdminError, match="already exists"):
        _run(migrated_database_url, "create-tenant", "acme")
    with pytest.raises(TenantAdminError, match="invalid tenant name"):
        _run(migrated_database_url, "create-tenant", "Bad Name")
    with pytest.raises(TenantAdminError, match="positive"):
        _run(migrated_database_url, "create-api-key", "--tenant", "acme", "--expires-in-days", "0")
    # Production: an unmigrated database is refused (development's embedded SQLite creates its schema).
    monkeypatch.setenv("TS_ENVIRONMENT", "production")
    with pytest.raises(TenSafeError, match="tensafe db upgrade"):
        _run(f"sqlite:///{tmp_path / 'empty.db'}", "list-tenants")


def test_expiry_is_enforced(migrated_database_url: str) -> None:
    engine = create_engine_from_url(migrated_database_url)
    sessions = make_session_factory(engine)
    with sessions.begin() as s:
        create_tenant(s, "acme")
        key, info = create_api_key(s, "acme", expires_in=dt.timedelta(hours=1))
    with sessions() as s:
        assert authenticate(s, key, now=info.created_at + dt.timedelta(minutes=59)).key_id == info.key_id
        with pytest.raises(AuthenticationError, match="expired"):
            authenticate(s, key, now=info.created_at + dt.timedelta(hours=1))
        assert s.execute(select(ApiKey.id)).scalars().all() == [info.key_id]
    engine.dispose()


@settings(max_examples=200, deadline=None)
@given(st.text(max_size=80))
def test_authenticate_rejects_arbitrary_strings_without_echoing_them(candidate: str) -> None:
    from unittest.mock import MagicMock

    session = MagicMock()
    session.execute.return_value.scalar_one_or_none.return_value = None
    with pytest.raises(AuthenticationError) as info:
        authenticate(session, candidate)
    # One of two fixed messages: nothing of the candidate is echoed.
    assert str(info.value) in {"missing API key: send it in the X-API-Key header", "invalid API key"}
