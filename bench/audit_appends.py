"""Audit log appends per second vs raw INSERTs of the same rows, SQLite and PostgreSQL.

For each backend: ``n`` records are appended with :meth:`tensafe.audit.AuditLog.append`
(one transaction per record: lock the chain head, hash, insert, update the head; a signed
hybrid checkpoint every 1000 records), then the baseline inserts the very same rows
with a plain SQLAlchemy Core ``INSERT``, one transaction per row, into a table of the
same shape, on the same engine (same durability: SQLite WAL + synchronous=FULL;
PostgreSQL with its default fsync). The ratio is audit rate / baseline rate (1.0 would
mean the chain costs nothing). PostgreSQL is started like the test fixture (initdb +
pg_ctl on loopback, see ``tensafe.db.testing.start_postgres``). The last line printed
is one JSON object.

Usage::

    python bench/audit_appends.py              # 1000 records per backend
    python bench/audit_appends.py --n 300 --backend sqlite
"""

from __future__ import annotations

import argparse
import json
import shutil
import tempfile
import time
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from sqlalchemy import BigInteger, Column, MetaData, String, Table, Text, insert, select

from tensafe.audit import AuditLog
from tensafe.audit.models import AuditRecordRow
from tensafe.crypto.signing import HybridSigningKey
from tensafe.db import create_engine_from_url, ensure_tenant, make_session_factory, upgrade
from tensafe.db.testing import start_postgres

_baseline_meta = MetaData()
BASELINE = Table(
    "bench_raw_records",
    _baseline_meta,
    Column("tenant_id", String(64), primary_key=True),
    Column("seq", BigInteger, primary_key=True, autoincrement=False),
    Column("format", String(32), nullable=False),
    Column("timestamp", String(32), nullable=False),
    Column("actor", String(256), nullable=False),
    Column("action", String(128), nullable=False),
    Column("resource", String(512), nullable=False),
    Column("details", Text, nullable=False),
    Column("prev_hash", String(64), nullable=False),
    Column("record_hash", String(64), nullable=False),
)


def _measure(url: str, n: int, key: HybridSigningKey) -> dict[str, Any]:
    upgrade(url)
    engine = create_engine_from_url(url)
    sessions = make_session_factory(engine)
    with sessions.begin() as session:
        ensure_tenant(session, "bench")
    _baseline_meta.create_all(engine)
    log = AuditLog(sessions, signer=key, checkpoint_every=1000)

    wall, cpu = time.perf_counter(), time.process_time()
    for i in range(n):
        log.append(
            tenant="bench",
            actor="svc:trainer",
            action="privacy.spend",
            resource=f"job/{i // 100}",
            details={"step": i, "epsilon_spent": f"{i * 0.001:.3f}", "batch_sha256": f"{i:064x}"},
        )
    audit_wall, audit_cpu = time.perf_counter() - wall, time.process_time() - cpu

    with engine.connect() as conn:
        rows = [dict(r._mapping) for r in conn.execute(select(AuditRecordRow.__table__))]
    wall, cpu = time.perf_counter(), time.process_time()
    for row in rows:
        with engine.begin() as conn:
            conn.execute(insert(BASELINE).values(**row))
    raw_wall, raw_cpu = time.perf_counter() - wall, time.process_time() - cpu
    engine.dispose()
    return {
        "audit_appends_per_s": round(n / audit_wall, 1),
        "raw_inserts_per_s": round(n / raw_wall, 1),
        "ratio": round(raw_wall / audit_wall, 3),
        "audit_cpu_ms_per_append": round(1000 * audit_cpu / n, 3),
        "raw_cpu_ms_per_insert": round(1000 * raw_cpu / n, 3),
    }


def run(n: int = 1000, backends: Sequence[str] = ("sqlite", "postgresql")) -> dict[str, Any]:
    """Measure every backend; return the figures (also what ``main`` prints as JSON)."""
    key = HybridSigningKey.generate()
    results: dict[str, Any] = {"n": n}
    for backend in backends:
        if backend == "sqlite":
            tmp = Path(tempfile.mkdtemp(prefix="tensafe-bench-"))
            try:
                results["sqlite"] = _measure(f"sqlite:///{tmp / 'bench.db'}", n, key)
            finally:
                shutil.rmtree(tmp, ignore_errors=True)
        elif backend == "postgresql":
            url, stop = start_postgres(durable=True, database="tensafe_bench")
            try:
                results["postgresql"] = _measure(url, n, key)
            finally:
                stop()
        else:
            raise SystemExit(f"unknown backend {backend!r}")
        print(f"{backend}: {json.dumps(results[backend])}", flush=True)
    return results


def main(argv: Sequence[str] | None = None) -> None:
    """Command-line entry point."""
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--n", type=int, default=1000, help="records per backend (default 1000)")
    parser.add_argument(
        "--backend", action="append", choices=["sqlite", "postgresql"], help="repeatable; default both"
    )
    args = parser.parse_args(argv)
    print(json.dumps(run(args.n, args.backend or ("sqlite", "postgresql"))))


if __name__ == "__main__":
    main()
