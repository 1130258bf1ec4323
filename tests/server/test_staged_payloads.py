"""A staged request payload lives exactly as long as its future can still run.

``stage_payload`` keeps the sensitive bytes of a request (training data, a registered data
set, sampling prompts) encrypted in the tenant's store until the worker has run it. Once the
future is complete or failed (committed), the worker deletes that copy and clears
``payload_ref``; a future left running by a crashed worker still finds its payload when it is
re-run.
"""

from __future__ import annotations

import datetime as dt
from typing import Any

import pytest
from sqlalchemy import select, update

import tensafe.client as ts
from server.conftest import TINY_MODEL, LiveServer, ServerEnv
from server.test_datasets import POLICY, SERVER_SAMPLING, N, _dataset, _needles
from server.test_jobs import Recorder, _model, _registry, _services, _submit, staged_payloads
from tensafe.client.types import AdamParams
from tensafe.db import utcnow
from tensafe.server.jobs import JobContext, JobResult, Operation, OperationRegistry, Worker, open_record
from tensafe.server.models import FutureRow, TrainingModel


def _payloads(env: ServerEnv, tenant: str = "acme") -> list[str]:
    return staged_payloads(env, tenant)


pytestmark = pytest.mark.usefixtures("payload_storage")


def test_completed_and_failed_futures_leave_no_payload(server_env: ServerEnv) -> None:
    services = _services(server_env)
    model = _model(server_env)
    ok = _submit(server_env, services, model, 1, b"secret-1")
    bad = _submit(server_env, services, model, 2, b"secret-2", fail=True)
    with server_env.sessions() as s:
        staged = sorted(r.payload_ref for r in s.execute(select(FutureRow)).scalars())
    assert _payloads(server_env) == staged and len(staged) == 2
    recorder = Recorder()
    assert Worker(services, _registry(recorder, idempotent=False)).run_pending() == 2
    assert recorder.ran == [(1, b"secret-1"), (2, b"secret-2")]
    with server_env.sessions() as s:
        rows = {r.id: r for r in s.execute(select(FutureRow)).scalars()}
    assert (rows[ok].state, rows[bad].state) == ("complete", "failed")
    assert rows[ok].payload_ref is None and rows[bad].payload_ref is None
    assert _payloads(server_env) == []
    # The result is kept (the client fetches it), and de-duplication still works without
    # the payload: the same request is answered by the same future, a different one refused.
    assert open_record(services, "acme", rows[ok].result_ref, rows[ok].result_blob) == b"result:secret-1"
    assert _submit(server_env, services, model, 1, b"secret-1") == ok
    assert _payloads(server_env) == []  # the duplicate's own staged copy was deleted too


@pytest.mark.parametrize("idempotent", [True, False])
def test_a_future_rerun_after_a_crash_still_has_its_payload(server_env: ServerEnv, idempotent: bool) -> None:
    services = _services(server_env)
    model = _model(server_env)
    stuck = _submit(server_env, services, model, 1, b"secret-a")
    # A worker claimed seq 1 and died (kill -9) before completing it: the payload must survive.
    past = utcnow() - dt.timedelta(minutes=5)
    with server_env.sessions.begin() as s:
        s.execute(update(TrainingModel).values(worker_id="w-dead", lease_until=past))
        s.execute(update(FutureRow).where(FutureRow.id == stuck).values(state="running", worker_id="w-dead"))
    assert len(_payloads(server_env)) == 1
    recorder = Recorder()
    Worker(services, _registry(recorder, idempotent=idempotent)).run_pending()
    with server_env.sessions() as s:
        row = s.get(FutureRow, stuck)
        assert row is not None
        state, ref = row.state, row.payload_ref
    if idempotent:  # re-run with its payload, then dropped
        assert recorder.ran == [(1, b"secret-a")] and state == "complete"
    else:  # failed as unsafe to repeat: the payload goes too
        assert recorder.ran == [] and state == "failed"
    assert ref is None and _payloads(server_env) == []


def test_a_future_taken_over_by_another_worker_keeps_its_payload(server_env: ServerEnv) -> None:
    services = _services(server_env)
    model = _model(server_env)
    _submit(server_env, services, model, 1, b"secret-b")
    recorder = Recorder()

    def steal(ctx: JobContext) -> JobResult:  # another worker took the future over meanwhile
        with server_env.sessions.begin() as s:
            s.execute(update(FutureRow).values(state="running", worker_id="w-other"))
        return recorder(ctx)

    registry = OperationRegistry()
    registry.register(Operation(name="echo", handler=steal, idempotent=True))
    worker = Worker(services, registry)
    worker.run_pending()
    with server_env.sessions() as s:
        row = s.execute(select(FutureRow)).scalar_one()
        assert (row.state, row.worker_id) == ("running", "w-other")
        assert row.payload_ref is not None
    # The result was discarded, so the payload the other worker needs is still there.
    assert _payloads(server_env) == [row.payload_ref]


def _holds_dataset(plaintext: bytes) -> bool:
    return any(needle in plaintext for needle in _needles())


@pytest.mark.slow
def test_register_dataset_leaves_exactly_one_copy_of_the_dataset(
    start_server: Any, server_env: ServerEnv
) -> None:
    server: LiveServer = start_server(privacy=POLICY)
    service = ts.ServiceClient(base_url=server.url, api_key=server_env.tenant_key("acme"))
    try:
        training = service.create_lora_training_client(
            base_model=TINY_MODEL, rank=2, user_metadata=SERVER_SAMPLING
        ).result()
        assert training.register_dataset(_dataset()).result().dataset_size == N
        artifacts = server_env.store.list("acme")
        holding = [a for a in artifacts if _holds_dataset(server_env.store.get_bytes("acme", a))]
        with server_env.sessions() as s:
            model = s.get(TrainingModel, training.model_id)
            assert model is not None
            state_ref = model.state_ref
            refs = [r.payload_ref for r in s.execute(select(FutureRow)).scalars()]
        # The only copy is the run's encrypted auto-checkpoint; the staged request is gone.
        assert holding == [state_ref], artifacts
        assert refs == [None] * len(refs) and _payloads(server_env) == []
        # The run still trains from that copy.
        assert training.train_step("cross_entropy", AdamParams(learning_rate=1e-2)).result().metrics
        holding = [
            a for a in server_env.store.list("acme") if _holds_dataset(server_env.store.get_bytes("acme", a))
        ]
        assert len(holding) == 1, holding
    finally:
        service.close().result()
