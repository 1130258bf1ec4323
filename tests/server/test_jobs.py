"""The durable job machinery: ordering, de-duplication, encrypted payloads, crash recovery.

These tests drive :class:`tensafe.server.jobs.Worker` directly with a small registered
operation that records the order it ran in (not a fake of training: it exercises the
queue, the leases and the store exactly as compute operations will).
"""

from __future__ import annotations

import datetime as dt
import json
import threading

import pytest
from sqlalchemy import select, update

from server.conftest import ServerEnv
from tensafe.db import ensure_tenant, utcnow
from tensafe.server.errors import BadRequestError
from tensafe.server.jobs import (
    JobContext,
    JobResult,
    Operation,
    OperationRegistry,
    Services,
    Worker,
    open_record,
    stage_payload,
    submit_future,
)
from tensafe.server.models import FutureRow, ServerSession, TrainingModel


def _services(env: ServerEnv) -> Services:
    return Services(sessions=env.sessions, store=env.store, signer=None, checkpoint_every=None)


def _model(env: ServerEnv, tenant: str = "acme", model_id: str = "s1:train:0") -> str:
    now = utcnow()
    with env.sessions.begin() as s:
        ensure_tenant(s, tenant)
        s.add(
            ServerSession(
                id=model_id.split(":")[0],
                tenant_id=tenant,
                created_at=now,
                last_heartbeat_at=now,
                user_metadata="{}",
                tags="[]",
            )
        )
        s.flush()
        s.add(
            TrainingModel(
                id=model_id,
                tenant_id=tenant,
                session_id=model_id.split(":")[0],
                model_seq_id=0,
                base_model="m",
                lora_rank=1,
                lora_config="{}",
                optimizer_config="{}",
                user_metadata="{}",
                state="ready",
                created_at=now,
                last_request_time=now,
            )
        )
    return model_id


class Recorder:
    def __init__(self) -> None:
        self.ran: list[tuple[int | None, bytes | None]] = []
        self.lock = threading.Lock()

    def __call__(self, ctx: JobContext) -> JobResult:
        with self.lock:
            self.ran.append((ctx.seq_id, ctx.payload_bytes))
        if ctx.payload.get("fail"):
            raise BadRequestError("asked to fail")
        return JobResult(data=b"result:" + (ctx.payload_bytes or b""), content_type="application/x-protobuf")


def _registry(recorder: Recorder, *, idempotent: bool) -> OperationRegistry:
    registry = OperationRegistry()
    registry.register(Operation(name="echo", handler=recorder, idempotent=idempotent))
    return registry


def _submit(
    env: ServerEnv, services: Services, model_id: str, seq: int, data: bytes, **payload: object
) -> str:
    staged = stage_payload(services, "acme", data)
    with env.sessions.begin() as s:
        row, _ = submit_future(
            services,
            s,
            tenant="acme",
            actor="apikey:k",
            request_type="echo",
            model_id=model_id,
            seq_id=seq,
            payload=dict(payload),
            payload_bytes=data,
            staged=staged,
        )
        return row.id


def test_per_model_order_follows_seq_id_and_payloads_are_encrypted(server_env: ServerEnv) -> None:
    services = _services(server_env)
    model = _model(server_env)
    recorder = Recorder()
    ids = {
        seq: _submit(server_env, services, model, seq, f"secret-datum-{seq}".encode()) for seq in (3, 1, 2)
    }
    worker = Worker(services, _registry(recorder, idempotent=False))
    assert worker.run_pending() == 3
    assert [seq for seq, _ in recorder.ran] == [1, 2, 3]
    assert recorder.ran[0][1] == b"secret-datum-1"
    with server_env.sessions() as s:
        rows = {r.seq_id: r for r in s.execute(select(FutureRow)).scalars()}
    for seq, rid in ids.items():
        row = rows[seq]
        assert row.id == rid and row.state == "complete" and row.result_json is None
        assert row.result_ref is not None
        result = open_record(services, "acme", row.result_ref, row.result_blob)
        assert result == f"result:secret-datum-{seq}".encode()
    # Neither the database nor the blob files hold the plaintext.
    raw_db = json.dumps(
        [[str(getattr(r, c.name)) for c in FutureRow.__table__.columns] for r in rows.values()]
    )
    assert "secret-datum" not in raw_db
    for path in (server_env.settings.data_dir / "artifacts").rglob("*"):
        if path.is_file():
            assert b"secret-datum" not in path.read_bytes()


def staged_payloads(env: ServerEnv, tenant: str = "acme") -> list[str]:
    """Every staged payload still held: store files plus records sealed in futures rows."""
    with env.sessions() as s:
        inline = [
            r.payload_ref
            for r in s.execute(select(FutureRow).where(FutureRow.payload_blob.is_not(None))).scalars()
        ]
    files = [a for a in env.store.list(tenant) if a.startswith("payload-")]
    return sorted(files + [r for r in inline if r is not None])


@pytest.mark.usefixtures("payload_storage")
def test_resubmission_is_idempotent_and_a_different_body_is_refused(server_env: ServerEnv) -> None:
    services = _services(server_env)
    model = _model(server_env)
    first = _submit(server_env, services, model, 1, b"x")
    assert _submit(server_env, services, model, 1, b"x") == first
    with pytest.raises(BadRequestError, match="already used"):
        _submit(server_env, services, model, 1, b"y")
    # The duplicates' staged payloads were deleted; only the first one remains.
    with server_env.sessions() as s:
        kept = s.get(FutureRow, first).payload_ref
    assert staged_payloads(server_env) == [kept]


def test_failed_job_fails_its_future_and_later_jobs_still_run(server_env: ServerEnv) -> None:
    services = _services(server_env)
    model = _model(server_env)
    bad = _submit(server_env, services, model, 1, b"a", fail=True)
    good = _submit(server_env, services, model, 2, b"b")
    Worker(services, _registry(Recorder(), idempotent=False)).run_pending()
    with server_env.sessions() as s:
        assert (s.get(FutureRow, bad).state, s.get(FutureRow, bad).error_category) == ("failed", "user")
        assert s.get(FutureRow, good).state == "complete"


@pytest.mark.parametrize("idempotent", [True, False])
def test_restart_recovers_jobs_left_running(server_env: ServerEnv, idempotent: bool) -> None:
    services = _services(server_env)
    model = _model(server_env)
    stuck = _submit(server_env, services, model, 1, b"a")
    queued = _submit(server_env, services, model, 2, b"b")
    # A worker claimed the model and started seq 1, then the process died (kill -9).
    past = utcnow() - dt.timedelta(minutes=5)
    with server_env.sessions.begin() as s:
        s.execute(update(TrainingModel).values(worker_id="w-dead", lease_until=past))
        s.execute(update(FutureRow).where(FutureRow.id == stuck).values(state="running", worker_id="w-dead"))
    recorder = Recorder()
    live = Worker(services, _registry(recorder, idempotent=idempotent))
    assert live.run_pending() == (2 if idempotent else 1)
    with server_env.sessions() as s:
        first, second = s.get(FutureRow, stuck), s.get(FutureRow, queued)
        assert second.state == "complete"
        if idempotent:
            assert first.state == "complete" and [seq for seq, _ in recorder.ran] == [1, 2]
        else:
            assert first.state == "failed" and first.error_category == "server"
            assert "server stopped" in first.error and [seq for seq, _ in recorder.ran] == [2]


def test_a_live_lease_keeps_other_workers_off_the_model(server_env: ServerEnv) -> None:
    services = _services(server_env)
    model = _model(server_env)
    _submit(server_env, services, model, 1, b"a")
    with server_env.sessions.begin() as s:
        s.execute(
            update(TrainingModel).values(worker_id="w-other", lease_until=utcnow() + dt.timedelta(minutes=5))
        )
    recorder = Recorder()
    assert Worker(services, _registry(recorder, idempotent=True)).run_pending() == 0
    assert recorder.ran == []
