"""Alembic environment for TenSafe.

Run through :func:`tensafe.db.upgrade`, which passes an open connection in
``config.attributes["connection"]``; the plain ``alembic`` command also works when the
configuration names ``sqlalchemy.url`` (or ``DATABASE_URL`` is set). Migrations are
hand-written ``op.create_table`` calls, so this file needs only the shared metadata for
autogenerate comparisons and never imports higher layers' model modules.
"""

from __future__ import annotations

from alembic import context
from sqlalchemy import Connection, text

import tensafe.db.models  # noqa: F401  (registers the tenants table on Base.metadata)
from tensafe.db._engine import create_engine_from_url, get_database_url
from tensafe.db.base import Base

#: Any constant; PostgreSQL serialises concurrent upgrades on this advisory lock.
_PG_MIGRATION_LOCK = 0x7E5AFE01

config = context.config
target_metadata = Base.metadata


def _run(connection: Connection) -> None:
    context.configure(
        connection=connection,
        target_metadata=target_metadata,
        render_as_batch=connection.dialect.name == "sqlite",
        compare_type=True,
    )
    with context.begin_transaction():
        if connection.dialect.name == "postgresql":
            connection.execute(text("SELECT pg_advisory_xact_lock(:k)"), {"k": _PG_MIGRATION_LOCK})
        context.run_migrations()


def run_migrations_offline() -> None:
    """Emit SQL to stdout instead of running it (``alembic upgrade --sql``)."""
    context.configure(
        url=config.get_main_option("sqlalchemy.url") or get_database_url(),
        target_metadata=target_metadata,
        literal_binds=True,
        dialect_opts={"paramstyle": "named"},
    )
    with context.begin_transaction():
        context.run_migrations()


def run_migrations_online() -> None:
    """Run the migrations on the given connection, or on a new one to the configured URL."""
    connection = config.attributes.get("connection")
    if connection is not None:
        _run(connection)
        return
    engine = create_engine_from_url(config.get_main_option("sqlalchemy.url") or get_database_url())
    try:
        with engine.connect() as conn:
            _run(conn)
            conn.commit()
    finally:
        engine.dispose()


if context.is_offline_mode():
    run_migrations_offline()
else:
    run_migrations_online()
