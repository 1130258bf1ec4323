"""Fixtures of the audit tests: a signing key and a migrated database with one tenant."""

from __future__ import annotations

from collections.abc import Iterator

import pytest
from audit_helpers import AuditDB

from tensafe.audit import AuditLog
from tensafe.crypto.signing import HybridSigningKey, HybridVerifyingKey
from tensafe.db import create_engine_from_url, ensure_tenant, make_session_factory


@pytest.fixture(scope="session")
def signing_key() -> HybridSigningKey:
    return HybridSigningKey.generate()


@pytest.fixture(scope="session")
def verifying_key(signing_key: HybridSigningKey) -> HybridVerifyingKey:
    return signing_key.verifying_key()


@pytest.fixture
def audit_db(migrated_database_url: str, signing_key: HybridSigningKey) -> Iterator[AuditDB]:
    """A migrated database (SQLite and PostgreSQL) with tenants ``acme`` and ``globex``."""
    engine = create_engine_from_url(migrated_database_url)
    sessions = make_session_factory(engine)
    with sessions.begin() as session:
        ensure_tenant(session, "acme", name="ACME")
        ensure_tenant(session, "globex", name="Globex")
    log = AuditLog(sessions, signer=signing_key, checkpoint_every=5)
    try:
        yield AuditDB(migrated_database_url, engine, sessions, log)
    finally:
        engine.dispose()
