"""tensafe.db.testing: the throw-away PostgreSQL server used by tests and benchmarks."""

from __future__ import annotations

import tempfile
from pathlib import Path

import pytest
from sqlalchemy import text

import tensafe.db.testing as pgtesting
from tensafe.db import DatabaseError, create_engine_from_url


def test_missing_binaries_are_a_clear_error(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    monkeypatch.setenv("TENSAFE_PG_BIN", "/nonexistent")
    monkeypatch.setattr(pgtesting, "DEFAULT_PG_BIN", "/nonexistent")
    monkeypatch.setenv("PATH", "/nonexistent")
    with pytest.raises(DatabaseError, match="TENSAFE_PG_BIN"):
        pgtesting.find_pg_bin()


@pytest.mark.slow
@pytest.mark.integration
def test_start_and_stop_cleans_up() -> None:
    base = Path(tempfile.mkdtemp(prefix="tensafe-pg-probe-"))
    base.chmod(0o755)  # the postgres user must be able to traverse it when we run as root
    try:
        url, stop = pgtesting.start_postgres(base, durable=False, database="probe")
    except DatabaseError as exc:  # pragma: no cover - depends on the machine
        base.rmdir()
        pytest.skip(str(exc))
    assert len(list(base.iterdir())) == 1
    assert url.startswith("postgresql+psycopg://postgres@127.0.0.1:") and url.endswith("/probe")
    engine = create_engine_from_url(url)
    with engine.connect() as conn:
        assert conn.execute(text("SHOW fsync")).scalar() == "off"
        assert conn.execute(text("SELECT current_database()")).scalar() == "probe"
        assert conn.execute(text("SHOW listen_addresses")).scalar() == "127.0.0.1"
    engine.dispose()
    stop()
    stop()  # idempotent
    assert list(base.iterdir()) == []  # data directory, socket and log are gone
    base.rmdir()
    with pytest.raises(Exception):
        with create_engine_from_url(url).connect():
            pass
