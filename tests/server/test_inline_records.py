"""Small request payloads and results are sealed into the futures row, not written as files.

The sealed record is a TSAF v1 blob under the tenant's DEK, bound to the tenant and to its
record id: tampering with it, or moving it to another row, fails the request closed.
"""

from __future__ import annotations

import pytest
from sqlalchemy import select, update

import tensafe.server.jobs
from server.conftest import ServerEnv
from server.test_jobs import Recorder, _model, _registry, _services, _submit
from tensafe.server.jobs import INLINE_MAX_BYTES, Worker, open_record
from tensafe.server.models import FutureRow


def _files(env: ServerEnv) -> list[str]:
    return sorted(env.store.list("acme"))


def test_small_payload_and_result_live_sealed_in_the_row(server_env: ServerEnv) -> None:
    services = _services(server_env)
    model = _model(server_env)
    fid = _submit(server_env, services, model, 1, b"secret-inline-datum")
    assert _files(server_env) == []  # no file, no fsync: the row holds the record
    with server_env.sessions() as s:
        row = s.get(FutureRow, fid)
        assert row is not None and row.payload_ref is not None and row.payload_blob is not None
        assert b"secret-inline-datum" not in row.payload_blob
        assert open_record(services, "acme", row.payload_ref, row.payload_blob) == b"secret-inline-datum"
    recorder = Recorder()
    assert Worker(services, _registry(recorder, idempotent=False)).run_pending() == 1
    assert recorder.ran == [(1, b"secret-inline-datum")]
    with server_env.sessions() as s:
        row = s.get(FutureRow, fid)
        assert row is not None and row.state == "complete"
        assert row.payload_ref is None and row.payload_blob is None  # cleared with the completion
        assert row.result_ref == f"{fid}.result" and row.result_blob is not None
        assert b"result:secret-inline-datum" not in row.result_blob
        assert open_record(services, "acme", row.result_ref, row.result_blob) == b"result:secret-inline-datum"
    assert _files(server_env) == []


def test_payloads_over_the_limit_go_to_the_store(
    server_env: ServerEnv, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(tensafe.server.jobs, "INLINE_MAX_BYTES", 8)
    services = _services(server_env)
    model = _model(server_env)
    fid = _submit(server_env, services, model, 1, b"more than eight bytes")
    with server_env.sessions() as s:
        row = s.get(FutureRow, fid)
        assert row is not None and row.payload_blob is None and row.payload_ref in _files(server_env)
    Worker(services, _registry(Recorder(), idempotent=False)).run_pending()
    with server_env.sessions() as s:
        row = s.get(FutureRow, fid)
        assert row is not None and row.result_blob is None and row.result_ref is not None
    assert _files(server_env) == [row.result_ref]  # the payload file was deleted, the result kept
    assert server_env.store.get_bytes("acme", row.result_ref) == b"result:more than eight bytes"


def test_the_default_limit_is_one_mebibyte() -> None:
    assert INLINE_MAX_BYTES == 1 << 20


def _run_and_get(server_env: ServerEnv, fid: str) -> FutureRow:
    Worker(_services(server_env), _registry(Recorder(), idempotent=False)).run_pending()
    with server_env.sessions() as s:
        row = s.get(FutureRow, fid)
        assert row is not None
        return row


def test_a_tampered_sealed_payload_fails_the_request_closed(server_env: ServerEnv) -> None:
    services = _services(server_env)
    model = _model(server_env)
    fid = _submit(server_env, services, model, 1, b"secret-payload-x")
    with server_env.sessions.begin() as s:
        row = s.get(FutureRow, fid)
        assert row is not None and row.payload_blob is not None
        bad = bytearray(row.payload_blob)
        bad[len(bad) // 2] ^= 1
        row.payload_blob = bytes(bad)
    recorder = Recorder()
    Worker(services, _registry(recorder, idempotent=False)).run_pending()
    assert recorder.ran == []  # never handed to the operation
    row = _run_and_get(server_env, fid)
    assert row.state == "failed" and row.error_category == "server"
    assert "secret" not in (row.error or "")


def test_a_sealed_payload_moved_to_another_row_is_refused(server_env: ServerEnv) -> None:
    services = _services(server_env)
    model = _model(server_env)
    first = _submit(server_env, services, model, 1, b"tenant data one")
    second = _submit(server_env, services, model, 2, b"tenant data two")
    with server_env.sessions.begin() as s:
        rows = {r.id: r for r in s.execute(select(FutureRow)).scalars()}
        s.execute(
            update(FutureRow).where(FutureRow.id == second).values(payload_blob=rows[first].payload_blob)
        )
    recorder = Recorder()
    Worker(services, _registry(recorder, idempotent=False)).run_pending()
    assert recorder.ran == [(1, b"tenant data one")]  # the swapped record never decrypts as seq 2
    with server_env.sessions() as s:
        assert s.get(FutureRow, second).state == "failed"  # type: ignore[union-attr]
