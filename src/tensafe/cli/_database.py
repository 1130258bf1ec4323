"""The embedded default's schema, created on first use by the commands that need it.

``tensafe server``, ``tensafe admin``, ``tensafe train`` and ``tensafe demo`` call
:func:`prepare_embedded_database` before they open the database. On the embedded default
(a SQLite file in development mode; :func:`tensafe.db.is_embedded_default`) it upgrades the
schema to the newest revision, by the code path of ``tensafe db upgrade``, and says so on
standard error. Every other database (PostgreSQL, or any database in production mode) is left
alone: the command then refuses an unmigrated schema with its usual message, which says to run
``tensafe db upgrade``.
"""

from __future__ import annotations

import sys

__all__ = ["development_mode", "prepare_embedded_database"]


def development_mode() -> bool:
    """Whether ``TS_ENVIRONMENT`` selects development (unset or ``development``).

    Raises:
        ConfigurationError: ``TS_ENVIRONMENT`` is neither ``development`` nor ``production``.
    """
    from tensafe.config import environment

    return environment() == "development"


def prepare_embedded_database(url: str) -> None:
    """Create or upgrade the schema of ``url`` when it is the embedded default.

    Raises:
        ConfigurationError: ``TS_ENVIRONMENT`` is invalid.
        DatabaseError: The embedded database cannot be migrated.
    """
    from tensafe.db import head_revision, prepare_embedded_schema, safe_url

    before = prepare_embedded_schema(url, development=development_mode())
    if before is not None:
        what = "created the schema of" if before == "" else f"upgraded the schema (from {before}) of"
        print(
            f"tensafe: {what} {safe_url(url)} to revision {head_revision()} (embedded default: SQLite "
            "in development mode; PostgreSQL and production need 'tensafe db upgrade')",
            file=sys.stderr,
        )
