"""The auto-checkpoint written in the background: a step is done only once its state is durable.

A step's state is serialized in the worker and written (encrypted, fsynced) by the worker's
background committer while the model's next ``forward_backward`` already runs
(:mod:`tensafe.server.durability`). These tests attack the window between the step and the
commit of its completion, against a live server driven by the official ``tinker`` SDK:

* the state write fails: the step's future fails with a ``server`` error, the run's row
  still records the previous step, no ``api.optim_step.complete`` record exists for it, the
  ``forward_backward`` that ran behind it is failed too, and the next requests run on the
  last *durable* state (its logprobs equal the probe taken before the failed step: the
  stepped copy in memory is never served);
* the worker dies with the write in flight (a second worker takes the model over once the
  lease has expired, as after a crash): the step is not reported done, it is failed as an
  interrupted non-idempotent request, and the late write of the dead worker's committer
  cannot complete it;
* pipelined requests complete in request order.

Oracles: the database rows and audit records, and the model's own outputs before the step.
"""

from __future__ import annotations

import datetime as dt
import threading
import time
from typing import Any

import numpy as np
import pytest
from sqlalchemy import select, update

from server.conftest import TINY_MODEL, LiveServer, ServerEnv
from tensafe.audit.models import AuditRecordRow
from tensafe.db import utcnow
from tensafe.server.jobs import Worker
from tensafe.server.models import FutureRow, TrainingModel
from tensafe.server.ops import ComputeOps
from tensafe.server.privacy import OperatorPrivacy

tinker = pytest.importorskip("tinker", reason="the official tinker SDK is a test dependency (tinker==0.38.0)")

LOOSE = OperatorPrivacy(
    target_epsilon=50.0,
    delta=1e-3,
    clip_norm=10.0,
    dataset_size=64,
    expected_batch_size=8,
    max_steps=40,
)
ADAM = tinker.types.AdamParams(learning_rate=5e-2)
TOKENS = [[1, 17, 23, 42, 99, 7], [1, 5, 6, 7, 8, 9], [1, 300, 301, 302, 303, 304]]


def _datum(tokens: list[int]) -> Any:
    return tinker.types.Datum(
        model_input=tinker.types.ModelInput.from_ints(tokens[:-1]),
        loss_fn_inputs={"target_tokens": tokens[1:], "weights": [1.0] * (len(tokens) - 1)},
    )


def _probe(training: Any) -> np.ndarray:
    out = training.forward([_datum(TOKENS[0])], "cross_entropy").result()
    return np.asarray(out.loss_fn_outputs[0]["logprobs"].to_numpy())


def _futures(env: ServerEnv, model_id: str) -> list[FutureRow]:
    with env.sessions() as s:
        return list(
            s.execute(
                select(FutureRow).where(FutureRow.model_id == model_id).order_by(FutureRow.seq_id)
            ).scalars()
        )


def _model(env: ServerEnv, model_id: str) -> TrainingModel:
    with env.sessions() as s:
        row = s.get(TrainingModel, model_id)
        assert row is not None
        s.expunge(row)
        return row


def _completed(env: ServerEnv, request_id: str) -> list[str]:
    with env.sessions() as s:
        rows = s.execute(select(AuditRecordRow.action, AuditRecordRow.details)).all()
    return [action for action, details in rows if request_id in str(details) and action.endswith(".complete")]


def _hold_steps_until_queued(monkeypatch: pytest.MonkeyPatch, env: ServerEnv, armed: Any) -> None:
    """While ``armed()``, an ``optim_step`` starts only once a ``forward_backward`` is queued.

    A step's state is written in the background only when the model's next request is
    already queued (else the worker writes it itself: nothing to overlap with); this makes
    the pipelined case deterministic.
    """
    from tensafe.training.runtime import LoraTrainingSession

    step_original = LoraTrainingSession.optim_step

    def optim_step(session: Any, *args: Any, **kw: Any) -> Any:
        if armed():
            for _ in range(1200):
                with env.sessions() as s:
                    queued = s.execute(
                        select(FutureRow.id).where(
                            FutureRow.request_type == "forward_backward", FutureRow.state == "queued"
                        )
                    ).first()
                if queued is not None:
                    break
                time.sleep(0.05)
        return step_original(session, *args, **kw)

    monkeypatch.setattr(LoraTrainingSession, "optim_step", optim_step)


class _FailingStateWrites:
    """Training-state writes fail while ``armed``, once the next ``forward_backward`` runs.

    The failing write waits until the second ``forward_backward`` staged after arming (the
    one queued behind the step) is running on the stepped session, so that the test
    exercises the overlap deterministically.
    """

    def __init__(self, store: Any, monkeypatch: pytest.MonkeyPatch, env: ServerEnv) -> None:
        from tensafe.training.runtime import LoraTrainingSession

        self.armed = False
        self.failed = 0
        self.staged = 0
        self.overlapped = threading.Event()
        put_original = store.put
        stage_original = LoraTrainingSession.stage_forward_backward

        def put(tenant: str, ref: str, src: Any, *, kind: str, **kw: Any) -> Any:
            if kind == "training-state" and self.armed:
                self.failed += 1
                assert self.overlapped.wait(60), "the next forward_backward did not overlap the write"
                raise OSError("disk full (injected)")
            return put_original(tenant, ref, src, kind=kind, **kw)

        def stage(session: Any, *args: Any, **kw: Any) -> Any:
            staged = stage_original(session, *args, **kw)
            if self.armed:
                self.staged += 1
                if self.staged == 2:
                    self.overlapped.set()
            return staged

        monkeypatch.setattr(store, "put", put)
        monkeypatch.setattr(LoraTrainingSession, "stage_forward_backward", stage)
        _hold_steps_until_queued(monkeypatch, env, lambda: self.armed and self.staged == 1)


def test_a_step_whose_state_write_fails_is_not_done_and_nothing_of_it_is_served(
    start_server: Any, server_env: ServerEnv, monkeypatch: pytest.MonkeyPatch
) -> None:
    fault = _FailingStateWrites(server_env.store, monkeypatch, server_env)
    server: LiveServer = start_server(privacy=LOOSE)
    service = tinker.ServiceClient(base_url=server.url, api_key=server_env.tenant_key("acme"))
    try:
        run = service.create_lora_training_client(base_model=TINY_MODEL, rank=2).result()
        run.forward_backward([_datum(TOKENS[0])], "cross_entropy").result()
        run.optim_step(ADAM).result()
        durable = _model(server_env, run.model_id)
        assert durable.step == 1 and durable.state_ref is not None
        before = _probe(run)

        fault.armed = True
        fb = run.forward_backward([_datum(TOKENS[1])], "cross_entropy")
        step = run.optim_step(ADAM)
        behind = run.forward_backward([_datum(TOKENS[2])], "cross_entropy")  # queued behind the step
        with pytest.raises(tinker.RequestFailedError, match="could not save the state"):
            step.result()
        fb.result()  # it completed before the step
        with pytest.raises(tinker.RequestFailedError, match="could not be saved"):
            behind.result()  # it ran on the stepped copy, whose state never became durable
        fault.armed = False
        assert fault.failed == 1

        rows = {f.request_type + str(f.seq_id): f for f in _futures(server_env, run.model_id)}
        failed_step = next(f for f in rows.values() if f.request_type == "optim_step" and f.state == "failed")
        assert failed_step.error_category == "server"
        assert _completed(server_env, failed_step.id) == []
        after = _model(server_env, run.model_id)
        assert (after.step, after.state_ref) == (durable.step, durable.state_ref)
        # The stepped copy in memory is not served: the model answers as at the durable step.
        np.testing.assert_array_equal(_probe(run), before)

        # The run goes on from its durable state: the client resubmits the step's
        # forward_backward and the step, which trains on that batch only.
        run.forward_backward([_datum(TOKENS[1])], "cross_entropy").result()
        metrics = run.optim_step(ADAM).result().metrics
        assert metrics is not None and metrics["examples:sum"] == 1.0
        assert _model(server_env, run.model_id).step == 2
        assert not np.array_equal(_probe(run), before)
    finally:
        service.close("success").result()


def test_a_worker_dying_before_the_commit_leaves_the_step_undone_and_recoverable(
    start_server: Any, server_env: ServerEnv, monkeypatch: pytest.MonkeyPatch
) -> None:
    server: LiveServer = start_server(privacy=LOOSE)
    service = tinker.ServiceClient(base_url=server.url, api_key=server_env.tenant_key("acme"))
    store = server_env.store
    original = store.put
    entered, release = threading.Event(), threading.Event()
    hold = {"on": False}

    def put(tenant: str, ref: str, src: Any, *, kind: str, **kw: Any) -> Any:
        if kind == "training-state" and hold["on"]:
            entered.set()
            release.wait(60)  # the write is "in flight" until the test lets it go
        return original(tenant, ref, src, kind=kind, **kw)

    monkeypatch.setattr(store, "put", put)
    try:
        run = service.create_lora_training_client(base_model=TINY_MODEL, rank=2).result()
        run.forward_backward([_datum(TOKENS[0])], "cross_entropy").result()
        run.optim_step(ADAM).result()
        durable = _model(server_env, run.model_id)
        before = _probe(run)

        hold["on"] = True
        run.forward_backward([_datum(TOKENS[1])], "cross_entropy").result()
        step = run.optim_step(ADAM)
        assert entered.wait(60), "the step's state write never started"
        # The step ran, its state is being written: it is not done, and the row is unchanged.
        pending = [f for f in _futures(server_env, run.model_id) if f.request_type == "optim_step"][-1]
        assert pending.state == "running"
        assert _model(server_env, run.model_id).step == durable.step

        # The worker "dies" here: its lease expires and another worker takes the model over.
        dead: Worker = server.app.state.worker
        with server_env.sessions.begin() as s:
            s.execute(
                update(TrainingModel)
                .where(TrainingModel.id == run.model_id)
                .values(lease_until=utcnow() - dt.timedelta(seconds=1))
            )
        dead._held.clear()
        heir = Worker(server.app.state.services, ComputeOps().registry(), worker_id="w-heir")
        heir.run_pending()
        with pytest.raises(tinker.RequestFailedError, match="server stopped"):
            step.result()
        # The dead worker wakes up late: its write cannot complete the step.
        release.set()
        hold["on"] = False
        for _ in range(1200):  # until the dead worker's late commit was refused (its copy is stale)
            loaded = server.app.state.compute._training.get(run.model_id)
            if loaded is None or loaded.stale:
                break
            time.sleep(0.05)
        assert loaded is None or loaded.stale
        row = next(f for f in _futures(server_env, run.model_id) if f.id == pending.id)
        assert row.state == "failed" and row.error_category == "server"
        assert _completed(server_env, pending.id) == []
        after = _model(server_env, run.model_id)
        assert (after.step, after.state_ref) == (durable.step, durable.state_ref)

        # The heir serves the durable state and continues the run.
        probe = run.forward([_datum(TOKENS[0])], "cross_entropy")
        for _ in range(600):  # until the probe has been submitted and the heir ran it
            if heir.run_pending():
                break
            time.sleep(0.05)
        np.testing.assert_array_equal(
            np.asarray(probe.result().loss_fn_outputs[0]["logprobs"].to_numpy()), before
        )
    finally:
        release.set()
        service.close("success").result()


def test_pipelined_requests_complete_in_request_order(start_server: Any, server_env: ServerEnv) -> None:
    server: LiveServer = start_server(privacy=LOOSE)
    service = tinker.ServiceClient(base_url=server.url, api_key=server_env.tenant_key("acme"))
    try:
        run = service.create_lora_training_client(base_model=TINY_MODEL, rank=2).result()
        futures = []
        for tokens in TOKENS:  # each step's write overlaps the next forward_backward
            futures.append(run.forward_backward([_datum(tokens)], "cross_entropy"))
            futures.append(run.optim_step(ADAM))
        for future in futures:
            future.result()
        rows = [
            f
            for f in _futures(server_env, run.model_id)
            if f.request_type in ("forward_backward", "optim_step")
        ]
        assert [f.state for f in rows] == ["complete"] * 6
        finished = [f.finished_at for f in rows if f.finished_at is not None]
        assert len(finished) == 6 and finished == sorted(finished)
        assert _model(server_env, run.model_id).step == 3
    finally:
        service.close("success").result()


def test_a_step_committed_while_the_next_request_reads_the_row_is_not_a_stale_session(
    start_server: Any, server_env: ServerEnv, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The race of the overlap: the step commits between the next request's row read and its check.

    The row read just before the commit still shows the previous step, whose state artifact
    the commit deletes: taking the session for stale would reload a deleted state.
    """
    server: LiveServer = start_server(privacy=LOOSE)
    worker: Worker = server.app.state.worker
    store = server_env.store
    put_original = store.put
    seqs_original = ComputeOps._finished_seqs
    armed, reached = threading.Event(), threading.Event()

    def put(tenant: str, ref: str, src: Any, *, kind: str, **kw: Any) -> Any:
        if kind == "training-state" and armed.is_set():
            assert reached.wait(60), "the next forward_backward did not run during the write"
        return put_original(tenant, ref, src, kind=kind, **kw)

    def finished_seqs(ops: ComputeOps, ctx: Any) -> tuple[int, list[int]]:
        out = seqs_original(ops, ctx)
        if armed.is_set() and ctx.request_type == "forward_backward":
            reached.set()
            worker._committer.wait(ctx.model_id)  # the step commits here, after the row read
        return out

    monkeypatch.setattr(store, "put", put)
    monkeypatch.setattr(ComputeOps, "_finished_seqs", finished_seqs)
    _hold_steps_until_queued(monkeypatch, server_env, armed.is_set)
    service = tinker.ServiceClient(base_url=server.url, api_key=server_env.tenant_key("acme"))
    try:
        run = service.create_lora_training_client(base_model=TINY_MODEL, rank=2).result()
        run.forward_backward([_datum(TOKENS[0])], "cross_entropy").result()
        armed.set()
        step = run.optim_step(ADAM)
        nxt = run.forward_backward([_datum(TOKENS[1])], "cross_entropy")
        step.result()
        nxt.result()
        armed.clear()
        assert reached.is_set()
        metrics = run.optim_step(ADAM).result().metrics
        assert metrics is not None and metrics["examples:sum"] == 1.0  # nxt's gradients were kept
        assert _model(server_env, run.model_id).step == 2
    finally:
        service.close("success").result()
