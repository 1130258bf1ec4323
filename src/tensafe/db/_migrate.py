"""Programmatic Alembic: the migrations ship inside the package, no alembic.ini needed."""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

from alembic import command
from alembic.config import Config
from alembic.runtime.migration import MigrationContext
from alembic.script import ScriptDirectory
from alembic.util import CommandError
from sqlalchemy import Connection
from sqlalchemy.engine import make_url
from sqlalchemy.exc import ArgumentError, SQLAlchemyError

from tensafe.db._engine import create_engine_from_url, safe_url
from tensafe.db.errors import DatabaseError

__all__ = [
    "SCRIPT_LOCATION",
    "alembic_config",
    "current_revision",
    "head_revision",
    "is_embedded_default",
    "prepare_embedded_schema",
    "upgrade",
]

#: Alembic's "package:path" form, resolved wherever the package is installed.
SCRIPT_LOCATION = "tensafe.db:migrations"


def alembic_config(connection: Connection | None = None) -> Config:
    """Build an Alembic configuration in code.

    Args:
        connection: When given, ``env.py`` runs the migrations on this connection
            (inside the caller's transaction) instead of opening its own.

    Returns:
        A configuration whose ``script_location`` is the packaged migrations folder.
    """
    config = Config()
    config.set_main_option("script_location", SCRIPT_LOCATION)
    if connection is not None:
        config.attributes["connection"] = connection
    return config


def head_revision() -> str:
    """Return the newest revision id shipped with this version of TenSafe."""
    heads = ScriptDirectory.from_config(alembic_config()).get_heads()
    if len(heads) != 1:
        raise DatabaseError(f"the packaged migrations have {len(heads)} heads; expected exactly one")
    return heads[0]


@contextmanager
def _transaction(url: str) -> Iterator[Connection]:
    engine = create_engine_from_url(url)
    try:
        with engine.begin() as connection:
            yield connection
    except SQLAlchemyError as exc:
        raise DatabaseError(f"database error on {safe_url(url)}: {_short(exc)}") from exc
    finally:
        engine.dispose()


def _short(exc: SQLAlchemyError) -> str:
    orig = getattr(exc, "orig", None)
    text = str(orig if orig is not None else exc).strip().splitlines()
    return text[0] if text else type(exc).__name__


def upgrade(url: str, revision: str = "head") -> str | None:
    """Migrate the database at ``url`` to ``revision`` (default: the newest) in one transaction.

    Args:
        url: The database URL.
        revision: Target revision id, or ``"head"``.

    Returns:
        The revision the database is at afterwards.

    Raises:
        DatabaseError: The database cannot be reached or a migration failed (nothing is
            half-applied: the whole upgrade is one transaction on both backends).
    """
    try:
        with _transaction(url) as connection:
            command.upgrade(alembic_config(connection), revision)
            return MigrationContext.configure(connection).get_current_revision()
    except CommandError as exc:
        raise DatabaseError(f"cannot migrate {safe_url(url)} to {revision!r}: {exc}") from exc


def current_revision(url: str) -> str | None:
    """Return the revision the database at ``url`` is at, or None when it was never migrated.

    A SQLite URL naming a file that does not exist gives None without creating the file.
    """
    try:
        parsed = make_url(url)
    except (ArgumentError, ValueError):
        parsed = None
    if parsed is not None and parsed.get_backend_name() == "sqlite":
        if parsed.database not in (None, "", ":memory:") and not Path(parsed.database).exists():
            return None
    with _transaction(url) as connection:
        return MigrationContext.configure(connection).get_current_revision()


def is_embedded_default(url: str, *, development: bool) -> bool:
    """Whether ``url`` is TenSafe's embedded default, whose schema commands may create themselves.

    The embedded default is a **SQLite file** (any ``sqlite:///PATH`` URL; the default
    ``sqlite:///./tensafe.db`` among them) used in **development** mode (``TS_ENVIRONMENT``
    unset or ``development``). PostgreSQL, and any database in production mode, is never
    migrated implicitly: its operator runs ``tensafe db upgrade`` (a deployment upgrades its
    schema deliberately, with a backup, once, not from whichever process starts first).

    Args:
        url: The database URL.
        development: Whether the deployment runs in development mode.

    Returns:
        True for a SQLite file URL in development mode; False otherwise (also for an
        in-memory database, which no other process could share, and for a malformed URL,
        which the engine reports later).
    """
    if not development:
        return False
    try:
        parsed = make_url(url)
    except (ArgumentError, ValueError):
        return False
    return parsed.get_backend_name() == "sqlite" and parsed.database not in (None, "", ":memory:")


def prepare_embedded_schema(url: str, *, development: bool) -> str | None:
    """Create or upgrade the schema of the embedded default; leave every other database alone.

    For a URL that :func:`is_embedded_default` accepts and whose schema is not at the newest
    revision, this runs :func:`upgrade` to ``head`` (the code path of ``tensafe db upgrade``:
    one transaction, so a failed migration leaves the file as it was; a second process that
    starts at the same time waits for the SQLite write lock and then finds nothing to do).

    Args:
        url: The database URL.
        development: Whether the deployment runs in development mode.

    Returns:
        The revision the schema was upgraded from (``""`` when the database was new), or
        None when nothing was done (not the embedded default, or already current).

    Raises:
        DatabaseError: The database cannot be opened or migrated (for instance a schema
            written by a newer TenSafe).
    """
    if not is_embedded_default(url, development=development):
        return None
    before = current_revision(url)
    if before == head_revision():
        return None
    upgrade(url)
    return before or ""
