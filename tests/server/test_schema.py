"""The hand-written server migrations (0003_server onwards) match tensafe.server.models exactly."""

from __future__ import annotations

from alembic import command
from alembic.autogenerate import compare_metadata
from alembic.runtime.migration import MigrationContext
from sqlalchemy import inspect

import tensafe.server.models  # noqa: F401  (registers the server tables)
from tensafe.db import Base, create_engine_from_url, head_revision, upgrade
from tensafe.db._migrate import alembic_config

SERVER_TABLES = {"api_keys", "server_sessions", "training_models", "futures", "training_checkpoints"}
PRIVACY_TABLES = {"privacy_policies", "sampling_sessions", "privacy_ledgers", "privacy_spends"}
DOWNLOAD_TABLES = {"download_tokens"}


def test_schema_matches_models(migrated_database_url: str) -> None:
    engine = create_engine_from_url(migrated_database_url)
    try:
        assert SERVER_TABLES | DOWNLOAD_TABLES <= set(inspect(engine).get_table_names())
        with engine.connect() as conn:
            diff = compare_metadata(
                MigrationContext.configure(conn, opts={"compare_type": True}), Base.metadata
            )
    finally:
        engine.dispose()
    mine = [d for d in diff if any(t in repr(d) for t in SERVER_TABLES | PRIVACY_TABLES | DOWNLOAD_TABLES)]
    assert mine == []


def test_downgrade_to_0002_and_up_again(migrated_database_url: str) -> None:
    engine = create_engine_from_url(migrated_database_url)
    try:
        with engine.begin() as conn:
            command.downgrade(alembic_config(conn), "0002_keys")
        assert not SERVER_TABLES & set(inspect(engine).get_table_names())
    finally:
        engine.dispose()
    assert upgrade(migrated_database_url) == head_revision()


def test_downgrade_to_0003_keeps_server_tables(migrated_database_url: str) -> None:
    engine = create_engine_from_url(migrated_database_url)
    try:
        with engine.begin() as conn:
            command.downgrade(alembic_config(conn), "0003_server")
        names = set(inspect(engine).get_table_names())
        assert SERVER_TABLES <= names and not (PRIVACY_TABLES | DOWNLOAD_TABLES) & names
        assert "step" not in {c["name"] for c in inspect(engine).get_columns("training_models")}
    finally:
        engine.dispose()
    assert upgrade(migrated_database_url) == head_revision()
