"""Concurrent appenders (threads and separate processes) keep one valid chain without gaps."""

from __future__ import annotations

import subprocess
import sys
import textwrap
import threading
from collections import Counter
from pathlib import Path

import pytest
from audit_helpers import AuditDB
from sqlalchemy import text

from tensafe.audit import AuditLog, iter_records, list_checkpoints, verify_chain
from tensafe.crypto.signing import HybridSigningKey, HybridVerifyingKey

WORKER = textwrap.dedent(
    """
    import sys
    from tensafe.audit import AuditLog
    from tensafe.crypto.signing import HybridSigningKey
    from tensafe.db import create_engine_from_url, make_session_factory

    url, key_file, name, count = sys.argv[1], sys.argv[2], sys.argv[3], int(sys.argv[4])
    key = HybridSigningKey.from_private_bytes(open(key_file, "rb").read(), passphrase=None)
    engine = create_engine_from_url(url)
    log = AuditLog(make_session_factory(engine), signer=key, checkpoint_every=7)
    for i in range(count):
        log.append(tenant="acme", actor=name, action="test.append", details={"i": i})
    engine.dispose()
    """
)


def _check(db: AuditDB, key: HybridVerifyingKey, expected: int, every: int) -> Counter[str]:
    db.log.checkpoint(tenant="acme")
    with db.sessions.begin() as session:
        report = verify_chain(session, tenant="acme", verifying_key=key)
        records = list(iter_records(session, tenant="acme"))
        lengths = [c.length for c in list_checkpoints(session, tenant="acme")]
    assert report.length == expected == len(records)
    assert [r.seq for r in records] == list(range(expected))
    # Periodic checkpoints landed exactly at multiples of `every`, each once.
    assert [n for n in lengths if n % every == 0] == list(range(every, expected + 1, every))
    with db.engine.connect() as conn:
        assert (
            conn.execute(text("SELECT length FROM audit_chain_heads WHERE tenant_id = 'acme'")).scalar()
            == expected
        )
    return Counter(r.actor for r in records)


def test_threads_append_concurrently(
    audit_db: AuditDB, signing_key: HybridSigningKey, verifying_key: HybridVerifyingKey
) -> None:
    log = AuditLog(audit_db.sessions, signer=signing_key, checkpoint_every=7)
    errors: list[BaseException] = []
    barrier = threading.Barrier(4)

    def work(name: str) -> None:
        try:
            barrier.wait()
            for i in range(15):
                log.append(tenant="acme", actor=name, action="test.append", details={"i": i})
        except BaseException as exc:  # pragma: no cover - reported below
            errors.append(exc)

    threads = [threading.Thread(target=work, args=(f"thread-{n}",)) for n in range(4)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert not errors, errors
    actors = _check(audit_db, verifying_key, 60, 7)
    assert actors == {f"thread-{n}": 15 for n in range(4)}


@pytest.mark.slow
def test_processes_append_concurrently(
    audit_db: AuditDB, signing_key: HybridSigningKey, verifying_key: HybridVerifyingKey, tmp_path: Path
) -> None:
    key_file = tmp_path / "signing.key"
    key_file.write_bytes(signing_key.private_bytes(passphrase=None))
    procs = [
        subprocess.Popen(
            [sys.executable, "-c", WORKER, audit_db.url, str(key_file), f"proc-{n}", "15"],
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            text=True,
        )
        for n in range(3)
    ]
    # The parent appends at the same time.
    log = AuditLog(audit_db.sessions, signer=signing_key, checkpoint_every=7)
    for i in range(15):
        log.append(tenant="acme", actor="parent", action="test.append", details={"i": i})
    for proc in procs:
        _out, err = proc.communicate(timeout=300)
        assert proc.returncode == 0, err
    actors = _check(audit_db, verifying_key, 60, 7)
    assert actors == {"parent": 15, "proc-0": 15, "proc-1": 15, "proc-2": 15}
