"""Crypto-shredding reports success only once the wrapped DEKs are gone from the database files.

The oracle is the bytes on disk: the SQLite database and ``-wal`` files, and the
PostgreSQL heap file of ``tenant_deks`` (after ``CHECKPOINT`` flushes shared buffers).
The attack is a reader that holds a snapshot from before the shred, which keeps the old
row versions (with the wrapped DEKs) alive.
"""

from __future__ import annotations

import sqlite3
import threading
import time
import uuid
from collections.abc import Iterator
from pathlib import Path

import pytest
from sqlalchemy import Engine, text
from sqlalchemy.engine import make_url
from sqlalchemy.orm import Session

from tensafe.cli.main import main
from tensafe.db import create_engine_from_url, ensure_tenant, upgrade
from tensafe.keys import (
    KeyConfigurationError,
    KeyManager,
    LocalKekProvider,
    ShredIncompleteError,
    TenantShreddedError,
)
from tensafe.keys.models import TenantDek


def _wrapped(engine: Engine, tenant: str) -> list[bytes]:
    with Session(engine) as session:
        rows = session.query(TenantDek).filter(TenantDek.tenant_id == tenant).order_by(TenantDek.version)
        return [bytes(r.wrapped_dek) for r in rows if r.wrapped_dek is not None]


# --- SQLite ----------------------------------------------------------------------------------


@pytest.fixture
def sqlite_db(tmp_path: Path) -> Iterator[tuple[Engine, Path]]:
    path = tmp_path / "shred.db"
    upgrade(f"sqlite:///{path}")
    engine = create_engine_from_url(f"sqlite:///{path}")
    yield engine, path
    engine.dispose()


def _sqlite_bytes(path: Path) -> bytes:
    return b"".join(p.read_bytes() for p in sorted(path.parent.glob(path.name + "*")))


def _victim(engine: Engine, manager: KeyManager) -> list[bytes]:
    with Session(engine) as session, session.begin():
        ensure_tenant(session, "victim")
        ensure_tenant(session, "bystander")
    manager.create_dek("victim")
    manager.rotate_dek("victim")
    manager.create_dek("bystander")
    return _wrapped(engine, "victim")


def _open_reader(path: Path) -> sqlite3.Connection:
    """Another process's connection holding a read transaction (a snapshot from before the shred)."""
    reader = sqlite3.connect(path, isolation_level=None, check_same_thread=False)
    reader.execute("BEGIN")
    assert reader.execute("SELECT count(*) FROM tenant_deks").fetchone()[0] == 3
    return reader


def test_sqlite_shred_with_an_open_reader_fails_loudly_then_finishes(
    sqlite_db: tuple[Engine, Path], local_provider: LocalKekProvider
) -> None:
    engine, path = sqlite_db
    manager = KeyManager(engine, local_provider, purge_timeout_s=0.3)
    wrapped = _victim(engine, manager)
    reader = _open_reader(path)
    try:
        started = time.monotonic()
        with pytest.raises(ShredIncompleteError, match="tensafe keys shred --finish") as info:
            manager.shred_tenant("victim")
        assert time.monotonic() - started >= 0.3  # it retried for the whole window
        assert info.value.tenant == "victim" and info.value.destroyed == 2
        assert "destroyed logically" in str(info.value) and info.value.exit_code == 3
        # Logically done: every read is refused...
        with pytest.raises(TenantShreddedError):
            manager.decryption_key("victim", 1)
        # ...but the bytes are really still on disk, which is why success was not reported.
        assert any(blob in _sqlite_bytes(path) for blob in wrapped)
        with pytest.raises(ShredIncompleteError):
            manager.finish_shred(purge_timeout_s=0.05)
    finally:
        reader.rollback()
        reader.close()
    manager.finish_shred()
    on_disk = _sqlite_bytes(path)
    assert all(blob not in on_disk for blob in wrapped)
    assert (path.parent / (path.name + "-wal")).stat().st_size == 0
    assert _wrapped(engine, "bystander")[0] in on_disk  # the scan does find live keys


def test_sqlite_shred_succeeds_when_the_reader_closes_within_the_retry_window(
    sqlite_db: tuple[Engine, Path], local_provider: LocalKekProvider
) -> None:
    engine, path = sqlite_db
    manager = KeyManager(engine, local_provider, purge_timeout_s=20)
    wrapped = _victim(engine, manager)
    reader = _open_reader(path)

    def close_later() -> None:
        time.sleep(0.5)
        reader.rollback()
        reader.close()

    closer = threading.Thread(target=close_later)
    started = time.monotonic()
    closer.start()
    try:
        assert manager.shred_tenant("victim") == 2
    finally:
        closer.join()
    assert time.monotonic() - started >= 0.5  # success came only after the reader closed
    on_disk = _sqlite_bytes(path)
    assert all(blob not in on_disk for blob in wrapped)


def test_cli_shred_exits_3_then_finish_completes(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    for name in (
        "TS_ENVIRONMENT",
        "TS_KEK_PROVIDER",
        "TS_KEY_MASTER",
        "TS_LOCAL_KEK_FILE",
        "TS_ARTIFACT_DIR",
    ):
        monkeypatch.delenv(name, raising=False)
    path = tmp_path / "cli.db"
    monkeypatch.setenv("TS_DATA_DIR", str(tmp_path / "data"))
    monkeypatch.setenv("DATABASE_URL", f"sqlite:///{path}")
    assert main(["keys", "init"]) == 0
    engine = create_engine_from_url(f"sqlite:///{path}")
    manager = KeyManager.from_environment()
    wrapped = _victim(engine, manager)
    manager.close()
    capsys.readouterr()
    reader = _open_reader(path)
    try:
        assert main(["keys", "shred", "--tenant", "victim", "--yes", "--timeout", "0.2"]) == 3
        err = capsys.readouterr().err
        assert err.startswith("tensafe: error:") and err.count("\n") == 1
        assert "destroyed logically" in err and "tensafe keys shred --finish" in err
        assert main(["keys", "shred", "--finish", "--timeout", "0"]) == 3
        capsys.readouterr()
    finally:
        reader.rollback()
        reader.close()
    assert main(["keys", "shred", "--finish"]) == 0
    assert "purged" in capsys.readouterr().out
    assert all(blob not in _sqlite_bytes(path) for blob in wrapped)
    assert main(["keys", "shred", "--yes"]) == 1
    assert "--tenant" in capsys.readouterr().err
    assert main(["keys", "shred", "--finish", "--tenant", "x"]) == 1
    capsys.readouterr()
    engine.dispose()


def test_purge_timeout_must_be_a_finite_non_negative_number(
    sqlite_db: tuple[Engine, Path], local_provider: LocalKekProvider
) -> None:
    engine, _ = sqlite_db
    for bad in (-1.0, float("nan"), float("inf")):
        with pytest.raises(KeyConfigurationError):
            KeyManager(engine, local_provider, purge_timeout_s=bad)
        with pytest.raises(KeyConfigurationError):
            KeyManager(engine, local_provider).finish_shred(purge_timeout_s=bad)


# --- PostgreSQL ------------------------------------------------------------------------------


def _heap_path(admin: Engine) -> Path:
    """The heap file of tenant_deks, after CHECKPOINT wrote every dirty page (needs a superuser)."""
    with admin.connect() as conn:
        conn = conn.execution_options(isolation_level="AUTOCOMMIT")
        conn.execute(text("CHECKPOINT"))
        directory = conn.execute(text("SELECT current_setting('data_directory')")).scalar_one()
        relpath = conn.execute(text("SELECT pg_relation_filepath('tenant_deks')")).scalar_one()
    return Path(directory) / relpath


def _file_bytes(path: Path) -> bytes:
    """Every segment of a relation file (``N``, ``N.1``, ...), or b"" once it is unlinked."""
    try:
        return b"".join(
            p.read_bytes()
            for p in sorted(path.parent.glob(path.name + "*"))
            if p.name.split(".")[0] == path.name
        )
    except PermissionError:  # pragma: no cover - the fixture's server runs as another user
        pytest.skip("cannot read PostgreSQL's data directory here")


def _heap_bytes(admin: Engine) -> bytes:
    return _file_bytes(_heap_path(admin))


@pytest.fixture
def pg(postgres_database_url: str) -> Iterator[tuple[str, Engine]]:
    upgrade(postgres_database_url)
    admin = create_engine_from_url(postgres_database_url)
    yield postgres_database_url, admin
    admin.dispose()


@pytest.mark.integration
def test_postgres_shred_vacuums_the_wrapped_deks_out_of_the_heap_file(
    pg: tuple[str, Engine], local_provider: LocalKekProvider
) -> None:
    _url, admin = pg
    manager = KeyManager(admin, local_provider, purge_timeout_s=0.5)
    wrapped = _victim(admin, manager)
    old_file = _heap_path(admin)
    assert all(blob in _file_bytes(old_file) for blob in wrapped)  # the check can fail

    reader = admin.connect()
    reader.exec_driver_sql("SET TRANSACTION ISOLATION LEVEL REPEATABLE READ")
    assert reader.execute(text("SELECT count(*) FROM tenant_deks")).scalar_one() == 3
    try:
        with pytest.raises(ShredIncompleteError, match="snapshot from before the shred"):
            manager.shred_tenant("victim")
        with pytest.raises(TenantShreddedError):
            manager.decryption_key("victim", 2)
        assert any(blob in _heap_bytes(admin) for blob in wrapped)  # the old row versions are still there
    finally:
        reader.rollback()
        reader.close()
    manager.finish_shred(purge_timeout_s=10)
    heap = _heap_bytes(admin)
    assert all(blob not in heap for blob in wrapped)
    assert _wrapped(admin, "bystander")[0] in heap
    assert all(blob not in _file_bytes(old_file) for blob in wrapped)  # the pre-rewrite file too


@pytest.mark.integration
def test_postgres_vacuum_statistics_catch_a_snapshot_the_horizon_check_missed(
    pg: tuple[str, Engine], local_provider: LocalKekProvider, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Defence in depth: if a snapshot holder is not visible (a standby's feedback, a setting such as
    vacuum_defer_cleanup_age), VACUUM's own report of the dead tuples it could not remove still
    keeps the shred from reporting success."""
    _url, admin = pg
    monkeypatch.setattr("tensafe.keys._purge._PG_HORIZON_BLOCKERS", text("SELECT 0"))
    manager = KeyManager(admin, local_provider, purge_timeout_s=0.3)
    wrapped = _victim(admin, manager)
    reader = admin.connect()
    try:
        reader.exec_driver_sql("SET TRANSACTION ISOLATION LEVEL REPEATABLE READ")
        assert reader.execute(text("SELECT count(*) FROM tenant_deks")).scalar_one() == 3
        with pytest.raises(ShredIncompleteError, match="dead row version"):
            manager.shred_tenant("victim")
        assert any(blob in _heap_bytes(admin) for blob in wrapped)
    finally:
        reader.rollback()
        reader.close()
    manager.finish_shred(purge_timeout_s=10)
    assert all(blob not in _heap_bytes(admin) for blob in wrapped)


@pytest.mark.integration
def test_postgres_role_that_cannot_vacuum_is_refused_before_claiming_success(
    pg: tuple[str, Engine], local_provider: LocalKekProvider
) -> None:
    """A role that does not own tenant_deks gets a skipped VACUUM (a warning, no error): refuse instead."""
    url, admin = pg
    role = f"app_{uuid.uuid4().hex[:8]}"
    with admin.connect() as conn:
        conn = conn.execution_options(isolation_level="AUTOCOMMIT")
        conn.execute(text(f'CREATE ROLE "{role}" LOGIN'))
        conn.execute(text(f'GRANT ALL ON ALL TABLES IN SCHEMA public TO "{role}"'))
        conn.execute(text(f'GRANT ALL ON ALL SEQUENCES IN SCHEMA public TO "{role}"'))
    app = create_engine_from_url(make_url(url).set(username=role).render_as_string(hide_password=False))
    try:
        manager = KeyManager(app, local_provider, purge_timeout_s=0)
        wrapped = _victim(app, manager)
        with pytest.raises(ShredIncompleteError, match="table owner") as info:
            manager.shred_tenant("victim")
        assert info.value.destroyed == 2
        with pytest.raises(TenantShreddedError):
            manager.decryption_key("victim", 1)
        assert any(blob in _heap_bytes(admin) for blob in wrapped)
    finally:
        app.dispose()
        with admin.connect() as conn:
            conn = conn.execution_options(isolation_level="AUTOCOMMIT")
            conn.execute(text("SET lock_timeout = '10s'"))
            conn.execute(text(f'DROP OWNED BY "{role}"'))
            conn.execute(text(f'DROP ROLE "{role}"'))
