"""Engine and session creation, including the SQLite settings concurrent writers need."""

from __future__ import annotations

from typing import Any

from sqlalchemy import Engine, event
from sqlalchemy import create_engine as _sa_create_engine
from sqlalchemy.engine import URL, make_url
from sqlalchemy.exc import ArgumentError, NoSuchModuleError
from sqlalchemy.orm import Session, sessionmaker

from tensafe.config import DEFAULT_DATABASE_URL, database_url
from tensafe.db.errors import DatabaseError

__all__ = [
    "DEFAULT_DATABASE_URL",
    "SQLITE_BUSY_TIMEOUT_MS",
    "create_engine_from_url",
    "get_database_url",
    "make_read_session_factory",
    "make_session_factory",
    "safe_url",
]

#: How long a SQLite connection waits for another writer before failing (milliseconds).
SQLITE_BUSY_TIMEOUT_MS = 30_000

_SQLITE_BEGIN_MODES = frozenset({"DEFERRED", "IMMEDIATE", "EXCLUSIVE"})


def get_database_url() -> str:
    """Return ``DATABASE_URL``, or :data:`DEFAULT_DATABASE_URL` (parsed by :mod:`tensafe.config`)."""
    return database_url()


def _parse(url: str | URL) -> URL:
    try:
        parsed = make_url(url)
    except (ArgumentError, ValueError) as exc:
        raise DatabaseError(
            "invalid database URL: expected e.g. sqlite:///path/to/tensafe.db or "
            "postgresql+psycopg://user@host:5432/dbname"
        ) from exc
    # SQLAlchemy's default PostgreSQL driver is psycopg2; TenSafe ships psycopg 3.
    if parsed.drivername in ("postgresql", "postgres"):
        parsed = parsed.set(drivername="postgresql+psycopg")
    return parsed


def safe_url(url: str | URL) -> str:
    """Render a database URL for messages and logs, with any password masked."""
    try:
        return make_url(url).render_as_string(hide_password=True)
    except (ArgumentError, ValueError):
        return "<invalid database URL>"


def create_engine_from_url(
    url: str | URL,
    *,
    sqlite_begin: str = "IMMEDIATE",
    echo: bool = False,
    **kwargs: Any,
) -> Engine:
    """Create an engine for a SQLite or PostgreSQL URL with TenSafe's settings.

    For SQLite every connection gets ``foreign_keys=ON``, ``busy_timeout`` (30 s),
    ``synchronous=FULL`` and, for file databases, ``journal_mode=WAL`` so readers never
    block the writer. Transactions start with ``BEGIN IMMEDIATE`` by default: the write
    lock is taken at the start, so two read-then-write transactions wait for each other
    (``busy_timeout``) instead of failing with "database is locked" on lock upgrade. A
    connection may ask for another mode with the execution option
    ``tensafe_sqlite_begin="DEFERRED"`` (useful for long read-only reports).

    Args:
        url: The database URL (``postgresql://`` means ``postgresql+psycopg://``).
        sqlite_begin: Default SQLite ``BEGIN`` mode: DEFERRED, IMMEDIATE or EXCLUSIVE.
        echo: Log every SQL statement.
        **kwargs: Passed on to :func:`sqlalchemy.create_engine`.

    Returns:
        The engine.

    Raises:
        DatabaseError: The URL is malformed, names an unsupported backend, or its driver
            is not installed.
    """
    parsed = _parse(url)
    backend = parsed.get_backend_name()
    if backend not in ("sqlite", "postgresql"):
        raise DatabaseError(
            f"unsupported database backend {backend!r} in {safe_url(parsed)}: use sqlite or postgresql"
        )
    mode = sqlite_begin.upper()
    if mode not in _SQLITE_BEGIN_MODES:
        raise DatabaseError(f"sqlite_begin must be one of {sorted(_SQLITE_BEGIN_MODES)}")
    try:
        engine = _sa_create_engine(parsed, echo=echo, **kwargs)
    except (NoSuchModuleError, ModuleNotFoundError) as exc:
        raise DatabaseError(
            f"the driver for {parsed.drivername} is not installed: pip install 'tensafe[postgres]'"
        ) from exc
    if backend == "sqlite":
        _configure_sqlite(engine, default_begin=mode, in_memory=parsed.database in (None, "", ":memory:"))
    return engine


def _configure_sqlite(engine: Engine, *, default_begin: str, in_memory: bool) -> None:
    @event.listens_for(engine, "connect")
    def _on_connect(dbapi_connection: Any, _record: Any) -> None:
        # Take transaction control away from the sqlite3 module (it would not BEGIN
        # before SELECTs); SQLAlchemy's "begin" hook below emits BEGIN itself.
        dbapi_connection.isolation_level = None
        cursor = dbapi_connection.cursor()
        try:
            cursor.execute(f"PRAGMA busy_timeout = {SQLITE_BUSY_TIMEOUT_MS}")
            cursor.execute("PRAGMA foreign_keys = ON")
            if not in_memory:
                cursor.execute("PRAGMA journal_mode = WAL")
                mode = cursor.fetchone()
                if mode is None or str(mode[0]).lower() != "wal":
                    raise DatabaseError(
                        "SQLite refused write-ahead logging (journal_mode=WAL); the database file "
                        "must be on a local file system"
                    )
            cursor.execute("PRAGMA synchronous = FULL")
        finally:
            cursor.close()

    @event.listens_for(engine, "begin")
    def _on_begin(connection: Any) -> None:
        options = connection.get_execution_options()
        if options.get("isolation_level") == "AUTOCOMMIT":
            return
        mode = str(options.get("tensafe_sqlite_begin", default_begin)).upper()
        if mode not in _SQLITE_BEGIN_MODES:
            raise DatabaseError(f"tensafe_sqlite_begin must be one of {sorted(_SQLITE_BEGIN_MODES)}")
        connection.exec_driver_sql(f"BEGIN {mode}")


def make_session_factory(engine: Engine) -> sessionmaker[Session]:
    """Return a session factory bound to ``engine`` (objects stay usable after commit)."""
    return sessionmaker(bind=engine, expire_on_commit=False)


def make_read_session_factory(engine: Engine) -> sessionmaker[Session]:
    """Return a factory of read-only sessions bound to ``engine``.

    On SQLite their transactions ``BEGIN DEFERRED``: with write-ahead logging a reader
    sees a consistent snapshot and neither waits for nor holds the write lock, so hot
    read paths (authentication, polling, queue scans) do not queue behind commits. A
    read-then-write transaction must not use them (on SQLite its lock upgrade could fail
    with "database is locked"), so any write in such a session raises
    :class:`DatabaseError` before reaching the database. On PostgreSQL they behave like
    ordinary sessions, with the same write guard.
    """
    factory = sessionmaker(
        bind=engine.execution_options(tensafe_sqlite_begin="DEFERRED"), expire_on_commit=False
    )

    @event.listens_for(factory, "before_flush")
    def _no_flush(session: Session, _context: Any, _instances: Any) -> None:
        if session.new or session.dirty or session.deleted:
            raise DatabaseError("internal error: a write was attempted in a read-only session")

    @event.listens_for(factory, "do_orm_execute")
    def _no_dml(state: Any) -> None:
        if state.is_insert or state.is_update or state.is_delete:
            raise DatabaseError("internal error: a write was attempted in a read-only session")

    return factory
