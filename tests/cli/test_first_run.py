"""First run: the embedded default creates its schema; PostgreSQL and production never do.

The embedded default is a SQLite file in development mode (``tensafe.db.is_embedded_default``).
There ``tensafe admin`` and ``tensafe server`` create or upgrade the schema themselves, by the
code path of ``tensafe db upgrade``. Everywhere else they refuse, as before, with a message that
says to run ``tensafe db upgrade``, and leave the database untouched: the attack is an operator
(or a stray process) that would otherwise migrate a production database implicitly.
"""

from __future__ import annotations

from pathlib import Path

import pytest
from sqlalchemy import inspect

from tensafe.cli.main import main
from tensafe.db import (
    create_engine_from_url,
    current_revision,
    head_revision,
    is_embedded_default,
    upgrade,
)

pytestmark = pytest.mark.usefixtures("isolated")


def _tables(url: str) -> set[str]:
    engine = create_engine_from_url(url)
    try:
        return set(inspect(engine).get_table_names())
    finally:
        engine.dispose()


@pytest.fixture
def no_uvicorn(monkeypatch: pytest.MonkeyPatch) -> None:
    """``tensafe server`` must stop before it listens; fail the test if it gets that far."""
    import uvicorn

    def _refuse(*_args: object, **_kwargs: object) -> None:
        raise AssertionError("the server started on a database it should have refused")

    monkeypatch.setattr(uvicorn, "run", _refuse)


@pytest.mark.parametrize(
    ("url", "development", "expected"),
    [
        ("sqlite:///./tensafe.db", True, True),
        ("sqlite:////var/lib/tensafe/t.db", True, True),
        ("sqlite:///./tensafe.db", False, False),
        ("sqlite://", True, False),
        ("sqlite:///:memory:", True, False),
        ("postgresql+psycopg://u@localhost/db", True, False),
        ("postgresql://u@localhost/db", False, False),
        ("not a url", True, False),
    ],
)
def test_embedded_default_is_a_sqlite_file_in_development(
    url: str, development: bool, expected: bool
) -> None:
    assert is_embedded_default(url, development=development) is expected


def test_admin_creates_the_schema_of_a_new_sqlite_file(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    assert not (tmp_path / "tensafe.db").exists()
    assert main(["admin", "create-tenant", "acme"]) == 0  # default URL sqlite:///./tensafe.db
    out, err = capsys.readouterr()
    assert "created tenant acme" in out
    assert "created the schema of sqlite:///./tensafe.db" in err and err.count("\n") == 1
    assert current_revision("sqlite:///./tensafe.db") == head_revision()
    # The second command finds the schema current and says nothing about it.
    assert main(["admin", "list-tenants"]) == 0
    out, err = capsys.readouterr()
    assert "acme" in out and err == ""


def test_admin_upgrades_an_old_embedded_schema(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    url = f"sqlite:///{tmp_path / 'old.db'}"
    assert upgrade(url, "0001_audit") == "0001_audit"
    assert "api_keys" not in _tables(url)
    assert main(["admin", "list-tenants", "--database-url", url]) == 0
    assert "upgraded the schema (from 0001_audit)" in capsys.readouterr().err
    assert current_revision(url) == head_revision()


def test_admin_refuses_an_unmigrated_sqlite_file_in_production(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    monkeypatch.setenv("TS_ENVIRONMENT", "production")
    url = f"sqlite:///{tmp_path / 'prod.db'}"
    assert main(["admin", "list-tenants", "--database-url", url]) == 2
    err = capsys.readouterr().err
    assert err.startswith("tensafe: error:") and "run 'tensafe db upgrade' first" in err
    assert err.count("\n") == 1
    assert current_revision(url) is None and "api_keys" not in _tables(url)


@pytest.mark.usefixtures("no_uvicorn")
def test_server_refuses_an_unmigrated_sqlite_file_in_production(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    url = f"sqlite:///{tmp_path / 'prod.db'}"
    monkeypatch.setenv("TS_ENVIRONMENT", "production")
    monkeypatch.setenv("DATABASE_URL", url)
    assert main(["server", "--no-worker"]) == 2
    err = capsys.readouterr().err
    assert "is at schema (none)" in err and "run 'tensafe db upgrade' first" in err
    assert current_revision(url) is None


@pytest.mark.usefixtures("no_uvicorn")
def test_server_refuses_an_old_sqlite_schema_in_production(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    url = f"sqlite:///{tmp_path / 'prod.db'}"
    upgrade(url, "0001_audit")
    monkeypatch.setenv("TS_ENVIRONMENT", "production")
    monkeypatch.setenv("DATABASE_URL", url)
    assert main(["server"]) == 2
    assert f"is at schema 0001_audit, not {head_revision()}" in capsys.readouterr().err
    assert current_revision(url) == "0001_audit"


def test_an_invalid_environment_is_one_line(
    monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    monkeypatch.setenv("TS_ENVIRONMENT", "staging")
    assert main(["admin", "list-tenants"]) == 2
    err = capsys.readouterr().err
    assert "TS_ENVIRONMENT" in err and err.count("\n") == 1
    assert not Path("tensafe.db").exists()


@pytest.mark.integration
def test_admin_refuses_an_unmigrated_postgresql_database_in_development(
    postgres_database_url: str, capsys: pytest.CaptureFixture[str]
) -> None:
    assert main(["admin", "list-tenants", "--database-url", postgres_database_url]) == 2
    assert "run 'tensafe db upgrade' first" in capsys.readouterr().err
    assert current_revision(postgres_database_url) is None and _tables(postgres_database_url) == set()


@pytest.mark.integration
@pytest.mark.usefixtures("no_uvicorn")
def test_server_refuses_an_unmigrated_postgresql_database_in_development(
    postgres_database_url: str, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    monkeypatch.setenv("DATABASE_URL", postgres_database_url)
    assert main(["server", "--no-worker"]) == 2
    assert "run 'tensafe db upgrade' first" in capsys.readouterr().err
    assert _tables(postgres_database_url) == set()
