"""Packaged Alembic migrations run programmatically and match the models exactly."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest
from alembic import command
from alembic.autogenerate import compare_metadata
from alembic.runtime.migration import MigrationContext
from sqlalchemy import inspect

import tensafe.audit.models  # noqa: F401  (registers the audit tables on Base.metadata)
from tensafe.db import Base, DatabaseError, create_engine_from_url, current_revision, head_revision, upgrade
from tensafe.db._migrate import alembic_config

#: Tables created by 0001_audit and the models that describe them.
OWN_TABLES = {"tenants", "audit_chain_heads", "audit_records", "audit_checkpoints"}


def test_upgrade_creates_the_tables(database_url: str) -> None:
    assert current_revision(database_url) is None
    assert upgrade(database_url, "0001_audit") == "0001_audit"
    assert current_revision(database_url) == "0001_audit"
    engine = create_engine_from_url(database_url)
    assert OWN_TABLES <= set(inspect(engine).get_table_names())
    engine.dispose()
    # Upgrading to head is idempotent.
    head = upgrade(database_url)
    assert head == head_revision() == upgrade(database_url)


def test_models_match_the_hand_written_migration(database_url: str) -> None:
    upgrade(database_url, "0001_audit")
    engine = create_engine_from_url(database_url)

    def own(obj: object, name: str | None, type_: str, reflected: bool, compare_to: object) -> bool:
        if type_ == "table":
            return name in OWN_TABLES
        table = getattr(obj, "table", None)
        return table is None or table.name in OWN_TABLES

    with engine.connect() as conn:
        context = MigrationContext.configure(
            conn, opts={"compare_type": True, "include_object": own, "target_metadata": Base.metadata}
        )
        diff = compare_metadata(context, Base.metadata)
    engine.dispose()
    assert diff == []


def test_downgrade_to_base_and_up_again(database_url: str) -> None:
    upgrade(database_url, "0001_audit")
    engine = create_engine_from_url(database_url)
    with engine.begin() as conn:
        command.downgrade(alembic_config(conn), "base")
    assert not OWN_TABLES & set(inspect(engine).get_table_names())
    engine.dispose()
    assert upgrade(database_url, "0001_audit") == "0001_audit"


def test_unknown_revision_is_a_clear_error(tmp_path: Path) -> None:
    with pytest.raises(DatabaseError, match="no-such-revision"):
        upgrade(f"sqlite:///{tmp_path / 'x.db'}", "no-such-revision")


def test_unreachable_database_is_a_clear_error() -> None:
    with pytest.raises(DatabaseError, match="database error"):
        current_revision("postgresql+psycopg://nobody:secretpw@127.0.0.1:1/none")


def test_cli_db_upgrade_and_current(tmp_path: Path) -> None:
    url = f"sqlite:///{tmp_path / 'cli.db'}"
    run = [sys.executable, "-m", "tensafe.cli.main", "db"]
    out = subprocess.run([*run, "current", "--database-url", url], capture_output=True, text=True)
    assert out.returncode == 0 and "(none)" in out.stdout and "needs" in out.stdout
    assert not (tmp_path / "cli.db").exists()  # asking does not create the file
    out = subprocess.run([*run, "upgrade", "--database-url", url], capture_output=True, text=True)
    assert out.returncode == 0, out.stderr
    assert head_revision() in out.stdout
    out = subprocess.run([*run, "current", "--database-url", url], capture_output=True, text=True)
    assert "up to date" in out.stdout
    bad = subprocess.run([*run, "upgrade", "--database-url", "mysql://x@y/z"], capture_output=True, text=True)
    assert bad.returncode != 0
    assert bad.stderr.startswith("tensafe: error:") and "Traceback" not in bad.stderr


def test_failed_upgrade_leaves_the_database_unchanged(database_url: str) -> None:
    engine = create_engine_from_url(database_url)
    with engine.begin() as conn:  # makes the third CREATE TABLE of 0001_audit fail
        conn.exec_driver_sql("CREATE TABLE audit_records (x INTEGER)")
    with pytest.raises(DatabaseError):
        upgrade(database_url)
    tables = set(inspect(engine).get_table_names())
    engine.dispose()
    assert "tenants" not in tables and "audit_chain_heads" not in tables
    assert current_revision(database_url) is None
