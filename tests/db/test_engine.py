"""The database layer: URLs, SQLite settings, sessions, tenants, UTC timestamps."""

from __future__ import annotations

import datetime as dt
import threading
from pathlib import Path

import pytest
from sqlalchemy import select, text
from sqlalchemy.exc import IntegrityError

from tensafe.db import (
    DEFAULT_DATABASE_URL,
    DatabaseError,
    Tenant,
    create_engine_from_url,
    ensure_tenant,
    get_database_url,
    make_session_factory,
    safe_url,
)
from tensafe.errors import TenSafeError


def test_database_url_from_environment(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv("DATABASE_URL", raising=False)
    assert get_database_url() == DEFAULT_DATABASE_URL == "sqlite:///./tensafe.db"
    monkeypatch.setenv("DATABASE_URL", "postgresql://u@h/db")
    assert get_database_url() == "postgresql://u@h/db"
    monkeypatch.setenv("DATABASE_URL", "   ")
    assert get_database_url() == DEFAULT_DATABASE_URL


def test_errors_derive_from_tensafe_error() -> None:
    assert issubclass(DatabaseError, TenSafeError)


@pytest.mark.parametrize("url", ["not a url", "mysql://u@h/db", "oracle://x"])
def test_bad_or_unsupported_urls_are_refused(url: str) -> None:
    with pytest.raises(DatabaseError):
        create_engine_from_url(url)


def test_plain_postgresql_scheme_uses_psycopg3() -> None:
    engine = create_engine_from_url("postgresql://user:hunter2@127.0.0.1:1/x")
    assert engine.dialect.driver == "psycopg"
    engine.dispose()


def test_safe_url_hides_the_password() -> None:
    shown = safe_url("postgresql+psycopg://alice:hunter2@db:5432/t")
    assert "hunter2" not in shown and "alice" in shown


def test_sqlite_pragmas(tmp_path: Path) -> None:
    engine = create_engine_from_url(f"sqlite:///{tmp_path / 'p.db'}")
    with engine.connect() as conn:
        assert conn.exec_driver_sql("PRAGMA journal_mode").scalar() == "wal"
        assert conn.exec_driver_sql("PRAGMA foreign_keys").scalar() == 1
        assert conn.exec_driver_sql("PRAGMA busy_timeout").scalar() == 30000
        assert conn.exec_driver_sql("PRAGMA synchronous").scalar() == 2  # FULL
    engine.dispose()


def test_sqlite_transactions_take_the_write_lock_at_begin(tmp_path: Path) -> None:
    """BEGIN IMMEDIATE: a second writer cannot even start a transaction while one is open."""
    url = f"sqlite:///{tmp_path / 'lock.db'}"
    first = create_engine_from_url(url)
    second = create_engine_from_url(url, connect_args={"timeout": 0.1})
    with second.connect() as conn:
        conn.exec_driver_sql("PRAGMA busy_timeout = 100")
    with first.begin() as conn:
        conn.exec_driver_sql("CREATE TABLE t (x INTEGER)")
    with first.begin() as conn1:
        conn1.exec_driver_sql("SELECT 1")  # only a read, but the lock is already held
        with pytest.raises(Exception, match="locked"):
            with second.connect() as conn2:
                conn2.exec_driver_sql("PRAGMA busy_timeout = 100")
                conn2.begin()
    # A DEFERRED connection can still read while a writer holds the lock (WAL).
    with first.begin() as conn1:
        conn1.exec_driver_sql("INSERT INTO t VALUES (1)")
        with second.connect().execution_options(tensafe_sqlite_begin="DEFERRED") as conn2:
            assert conn2.exec_driver_sql("SELECT count(*) FROM t").scalar() == 0
    first.dispose()
    second.dispose()


def test_sqlite_concurrent_read_modify_write_threads(tmp_path: Path) -> None:
    """Read-then-write transactions from many threads never lose an update."""
    url = f"sqlite:///{tmp_path / 'counter.db'}"
    engine = create_engine_from_url(url)
    with engine.begin() as conn:
        conn.exec_driver_sql("CREATE TABLE c (n INTEGER)")
        conn.exec_driver_sql("INSERT INTO c VALUES (0)")
    errors: list[BaseException] = []

    def work() -> None:
        try:
            for _ in range(25):
                with engine.begin() as conn:
                    n = conn.exec_driver_sql("SELECT n FROM c").scalar_one()
                    conn.execute(text("UPDATE c SET n = :n"), {"n": n + 1})
        except BaseException as exc:  # pragma: no cover - reported below
            errors.append(exc)

    threads = [threading.Thread(target=work) for _ in range(4)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert not errors
    with engine.connect() as conn:
        assert conn.exec_driver_sql("SELECT n FROM c").scalar_one() == 100
    engine.dispose()


def test_tenants_and_utc_timestamps(migrated_database_url: str) -> None:
    engine = create_engine_from_url(migrated_database_url)
    sessions = make_session_factory(engine)
    with sessions.begin() as session:
        acme = ensure_tenant(session, "acme", name="ACME Corp")
        again = ensure_tenant(session, "acme")
        assert again is acme
        generated = ensure_tenant(session, name="Other")
        assert len(generated.id) == 32
    with sessions.begin() as session:
        row = session.execute(select(Tenant).where(Tenant.id == "acme")).scalar_one()
        assert row.name == "ACME Corp"
        assert row.created_at.tzinfo is not None
        assert abs(row.created_at - dt.datetime.now(dt.UTC)) < dt.timedelta(minutes=5)
        assert row.deleted_at is None
    with pytest.raises(IntegrityError), sessions.begin() as session:
        session.add(Tenant(id="dup", name="ACME Corp", created_at=dt.datetime.now(dt.UTC)))
    with pytest.raises(DatabaseError, match="invalid tenant id"), sessions.begin() as session:
        ensure_tenant(session, "Bad Id!")
    with pytest.raises(Exception, match="timezone-aware"), sessions.begin() as session:
        session.add(Tenant(id="naive", name="n", created_at=dt.datetime(2026, 1, 1)))
    engine.dispose()


def test_foreign_keys_are_enforced(migrated_database_url: str) -> None:
    engine = create_engine_from_url(migrated_database_url)
    with pytest.raises(IntegrityError), engine.begin() as conn:
        conn.execute(
            text(
                "INSERT INTO audit_chain_heads (tenant_id, length, head_hash, updated_at) "
                "VALUES ('ghost', 0, 'x', CURRENT_TIMESTAMP)"
            )
        )
    engine.dispose()


def test_read_sessions_do_not_wait_for_the_write_lock(tmp_path: Path) -> None:
    """A read session reads its snapshot while a writer holds the lock (SQLite, WAL)."""
    from tensafe.db import make_read_session_factory

    url = f"sqlite:///{tmp_path / 'reads.db'}"
    engine = create_engine_from_url(url, connect_args={"timeout": 0.1})
    with engine.begin() as conn:
        conn.exec_driver_sql("CREATE TABLE t (x INTEGER)")
        conn.exec_driver_sql("INSERT INTO t VALUES (1)")
    reads = make_read_session_factory(engine)
    other = create_engine_from_url(url)
    with other.begin() as writer:
        writer.exec_driver_sql("INSERT INTO t VALUES (2)")  # holds the write lock, uncommitted
        with reads() as session:
            session.connection().exec_driver_sql("PRAGMA busy_timeout = 100")
            assert session.execute(text("SELECT count(*) FROM t")).scalar_one() == 1
    with reads() as session:
        assert session.execute(text("SELECT count(*) FROM t")).scalar_one() == 2
    other.dispose()
    engine.dispose()


def test_read_sessions_refuse_writes(migrated_database_url: str) -> None:
    from sqlalchemy import update

    from tensafe.db import DatabaseError, make_read_session_factory

    engine = create_engine_from_url(migrated_database_url)
    with make_session_factory(engine).begin() as session:
        ensure_tenant(session, "acme", name="ACME")
    reads = make_read_session_factory(engine)
    with reads() as session, pytest.raises(DatabaseError, match="read-only"):
        session.add(Tenant(id="x", name="X", created_at=dt.datetime.now(dt.UTC)))
        session.flush()
    with reads() as session, pytest.raises(DatabaseError, match="read-only"):
        session.execute(update(Tenant).values(name="changed"))
    with reads() as session:
        row = session.get(Tenant, "acme")
        assert row is not None and row.name == "ACME"
        row.name = "changed"
        with pytest.raises(DatabaseError, match="read-only"):
            session.flush()
    with reads() as session:
        assert session.execute(select(Tenant.name).where(Tenant.id == "acme")).scalar_one() == "ACME"
    engine.dispose()
