"""Result retention and the orphaned-artifact sweep (``tensafe.server.retention``).

Futures are run by a real :class:`~tensafe.server.jobs.Worker` with a small registered
operation (as in ``test_jobs.py``); time is moved by passing ``now=`` to the sweeps or by
back-dating ``finished_at``, never by sleeping.
"""

from __future__ import annotations

import contextlib
import datetime as dt
import json
from collections.abc import Callable, Iterator
from typing import BinaryIO

import httpx
import pytest
from sqlalchemy import select, update

from server.conftest import LiveServer, ServerEnv
from server.test_jobs import Recorder, _model, _registry, _services
from tensafe.audit.models import AuditRecordRow
from tensafe.db import ensure_tenant, utcnow
from tensafe.server import ServerSettings
from tensafe.server.errors import BadRequestError, ServerConfigurationError
from tensafe.server.jobs import Services, Worker, open_record, stage_payload, submit_future
from tensafe.server.models import FutureRow
from tensafe.server.retention import (
    RESULT_EXPIRED,
    sweep_expired_results,
    sweep_orphan_artifacts,
)
from tensafe.storage import BlobBackend, EncryptedArtifactStore, LocalFilesystemBackend


def _submit(
    env: ServerEnv, services: Services, tenant: str, model_id: str, seq: int, data: bytes, **payload: object
) -> str:
    staged = stage_payload(services, tenant, data)
    with env.sessions.begin() as s:
        row, _ = submit_future(
            services,
            s,
            tenant=tenant,
            actor="apikey:k",
            request_type="echo",
            model_id=model_id,
            seq_id=seq,
            payload=dict(payload),
            payload_bytes=data,
            staged=staged,
        )
        return row.id


def _rows(env: ServerEnv) -> dict[str, FutureRow]:
    with env.sessions() as s:
        return {r.id: r for r in s.execute(select(FutureRow)).scalars()}


def _audited(env: ServerEnv, action: str) -> list[tuple[str, dict[str, object]]]:
    with env.sessions() as s:
        rows = s.execute(
            select(AuditRecordRow.tenant_id, AuditRecordRow.details)
            .where(AuditRecordRow.action == action)
            .order_by(AuditRecordRow.tenant_id, AuditRecordRow.seq)
        ).all()
    return [(tenant, json.loads(details)) for tenant, details in rows]


def _retrieve(server: LiveServer, key: str, request_id: str) -> httpx.Response:
    return httpx.post(
        f"{server.url}/api/v1/retrieve_future",
        json={"request_id": request_id},
        headers={"X-API-Key": key},
        timeout=30,
    )


@pytest.mark.usefixtures("payload_storage")
def test_expired_results_answer_410_fresh_ones_are_kept_and_dedup_still_works(
    server_env: ServerEnv, start_server: Callable[..., LiveServer], payload_storage: str
) -> None:
    services = _services(server_env)  # default retention: 7 days
    acme = _model(server_env)
    globex = _model(server_env, "globex", "s2:train:0")
    old = _submit(server_env, services, "acme", acme, 1, b"secret-old")
    fresh = _submit(server_env, services, "acme", acme, 2, b"secret-fresh")
    failed = _submit(server_env, services, "acme", acme, 3, b"secret-bad", fail=True)
    other = _submit(server_env, services, "globex", globex, 1, b"secret-globex")
    assert Worker(services, _registry(Recorder(), idempotent=True)).run_pending() == 4
    before = _rows(server_env)
    assert [before[f].state for f in (old, fresh, failed, other)] == [
        "complete",
        "complete",
        "failed",
        "complete",
    ]
    in_store = payload_storage == "store"  # results too: INLINE_MAX_BYTES applies to both
    assert (f"{old}.result" in server_env.store.list("acme")) is in_store
    assert (f"{fresh}.result" in server_env.store.list("acme")) is in_store

    # Three of them finished 8 days ago; nothing is due before that.
    long_ago = utcnow() - dt.timedelta(days=8)
    with server_env.sessions.begin() as s:
        s.execute(
            update(FutureRow).where(FutureRow.id.in_((old, failed, other))).values(finished_at=long_ago)
        )
    assert sweep_expired_results(services, now=long_ago + dt.timedelta(days=6)) == {}
    assert sweep_expired_results(services) == {"acme": 2, "globex": 1}
    assert sweep_expired_results(services) == {}  # done once, audited once

    rows = _rows(server_env)
    for future_id in (old, failed, other):
        row = rows[future_id]
        assert row.result_content_type == RESULT_EXPIRED
        assert (row.result_json, row.result_blob, row.result_ref, row.error) == (None, None, None, None)
        assert row.request_sha256 == before[future_id].request_sha256
    assert (rows[old].state, rows[failed].state) == ("complete", "failed")
    assert f"{old}.result" not in server_env.store.list("acme")
    assert f"{other}.result" not in server_env.store.list("globex")
    # The fresh result is untouched.
    ref = rows[fresh].result_ref
    assert ref is not None and rows[fresh].result_content_type != RESULT_EXPIRED
    assert open_record(services, "acme", ref, rows[fresh].result_blob) == b"result:secret-fresh"

    # One summary record per tenant: a count, nothing of the results.
    audited = _audited(server_env, "system.results_expired")
    assert [(tenant, details["count"]) for tenant, details in audited] == [("acme", 2), ("globex", 1)]
    assert "secret" not in json.dumps(audited)

    # Through the live server: 410 result_expired for the expired ones, the result for the fresh one.
    server = start_server(run_worker=False, result_ttl_seconds=3600)
    key = server_env.tenant_key("acme")
    for future_id in (old, failed):
        response = _retrieve(server, key, future_id)
        assert response.status_code == 410, response.text
        body = response.json()
        assert body["error"] == "result_expired"
        assert future_id in body["detail"] and "3600 s" in body["detail"]
    response = _retrieve(server, key, fresh)
    assert response.status_code == 200 and response.content == b"result:secret-fresh"
    assert _retrieve(server, key, other).status_code == 404  # another tenant's future stays invisible

    # De-duplication by (model_id, seq_id) still works: same request, same future; another is refused.
    assert _submit(server_env, services, "acme", acme, 1, b"secret-old") == old
    with pytest.raises(BadRequestError, match="already used by a different request"):
        _submit(server_env, services, "acme", acme, 1, b"something else")

    # Later still, the fresh one expires too.
    assert sweep_expired_results(services, now=utcnow() + dt.timedelta(days=7, minutes=1)) == {"acme": 1}
    assert f"{fresh}.result" not in server_env.store.list("acme")
    assert _retrieve(server, key, fresh).status_code == 410


def test_result_ttl_setting() -> None:
    env = {"DATABASE_URL": "sqlite:///unused.db", "TS_SERVER_MODELS": "m=/models/m"}
    assert ServerSettings.from_environment(env).result_ttl_seconds == 7 * 86400
    assert ServerSettings.from_environment(env | {"TS_SERVER_RESULT_TTL_S": "60"}).result_ttl_seconds == 60
    for bad in ("59", "0", "-5", "nan", "inf", "a week"):
        with pytest.raises(ServerConfigurationError, match="TS_SERVER_RESULT_TTL_S"):
            ServerSettings.from_environment(env | {"TS_SERVER_RESULT_TTL_S": bad})


class _Delegating(BlobBackend):
    """A backend that is not a LocalFilesystemBackend: ages come from the verified headers."""

    def __init__(self, inner: LocalFilesystemBackend) -> None:
        self.inner = inner

    def put_stream(self, key: str, src: BinaryIO) -> int:
        return self.inner.put_stream(key, src)

    def get_stream(self, key: str) -> contextlib.AbstractContextManager[BinaryIO]:
        return self.inner.get_stream(key)

    def delete(self, key: str) -> bool:
        return self.inner.delete(key)

    def exists(self, key: str) -> bool:
        return self.inner.exists(key)

    def list(self, prefix: str = "") -> Iterator[str]:
        return self.inner.list(prefix)


@pytest.mark.parametrize("backend", ["local", "other"])
def test_orphaned_request_artifacts_are_deleted_only_when_old_and_unreferenced(
    server_env: ServerEnv, monkeypatch: pytest.MonkeyPatch, backend: str
) -> None:
    import tensafe.server.jobs

    monkeypatch.setattr(tensafe.server.jobs, "INLINE_MAX_BYTES", -1)  # every payload and result is a file
    store = server_env.store
    if backend == "other":
        root = server_env.settings.data_dir / "artifacts"
        store = EncryptedArtifactStore(_Delegating(LocalFilesystemBackend(root)), server_env.keys)
    services = Services(sessions=server_env.sessions, store=store, signer=None, checkpoint_every=None)
    model = _model(server_env)
    _model(server_env, "globex", "s2:train:0")
    with server_env.sessions.begin() as s:
        ensure_tenant(s, "initech")  # a tenant with no artifacts at all
    recorder = Recorder()
    worker = Worker(services, _registry(recorder, idempotent=True))

    done = _submit(server_env, services, "acme", model, 1, b"secret-1")
    assert worker.run_pending() == 1
    queued = _submit(server_env, services, "acme", model, 2, b"secret-2")  # its payload is referenced
    rows = _rows(server_env)
    done_result, queued_payload = rows[done].result_ref, rows[queued].payload_ref
    assert done_result == f"{done}.result" and queued_payload is not None
    # Left behind by processes that died between a commit and a file delete:
    lost_payload = stage_payload(services, "acme", b"secret-lost").ref
    store.put_bytes("acme", "req-0123456789abcdef01234567.result", b"lost result", kind="request-result")
    globex_lost = stage_payload(services, "globex", b"secret-globex").ref
    # Not a request artifact: never the orphan sweep's business.
    store.put_bytes("acme", "state-unrelated", b"state", kind="training-state")
    everything = sorted(store.list("acme"))
    assert everything == sorted(
        [done_result, queued_payload, lost_payload, "req-0123456789abcdef01234567.result", "state-unrelated"]
    )

    # Young orphans are kept (a payload is staged before its row commits).
    assert sweep_orphan_artifacts(services) == {}
    assert sweep_orphan_artifacts(services, now=utcnow() + dt.timedelta(minutes=50)) == {}
    assert sorted(store.list("acme")) == everything and store.list("globex") == [globex_lost]

    # Old ones go; referenced artifacts and other artifacts stay.
    later = utcnow() + dt.timedelta(hours=2)
    assert sweep_orphan_artifacts(services, now=later) == {"acme": 2, "globex": 1}
    assert sorted(store.list("acme")) == sorted([done_result, queued_payload, "state-unrelated"])
    assert store.list("globex") == []
    assert sweep_orphan_artifacts(services, now=later) == {}

    # The queued future still runs with its payload, and the kept result still opens.
    assert worker.run_pending() == 1
    assert recorder.ran == [(1, b"secret-1"), (2, b"secret-2")]
    assert open_record(services, "acme", done_result, None) == b"result:secret-1"


def test_the_worker_loop_sweep_runs_the_retention_sweeps(server_env: ServerEnv) -> None:
    from tensafe.server.retention import SWEEP_INTERVAL_SECONDS, sweep_when_due

    services = Services(
        sessions=server_env.sessions,
        store=server_env.store,
        signer=None,
        checkpoint_every=None,
        result_ttl_seconds=60,
    )
    model = _model(server_env)
    done = _submit(server_env, services, "acme", model, 1, b"secret-1")
    assert Worker(services, _registry(Recorder(), idempotent=True)).run_pending() == 1
    with server_env.sessions.begin() as s:
        s.execute(update(FutureRow).values(finished_at=utcnow() - dt.timedelta(seconds=61)))
    assert sweep_when_due(services, due=float("inf")) == float("inf")  # not due: nothing runs
    assert _rows(server_env)[done].result_content_type != RESULT_EXPIRED
    assert sweep_when_due(services, due=0.0) >= SWEEP_INTERVAL_SECONDS
    assert _rows(server_env)[done].result_content_type == RESULT_EXPIRED
