"""A model's lease handed over between two ``tensafe server`` processes on one PostgreSQL.

Process A creates a training run and steps it (its worker holds the model's lease), then is
killed with SIGKILL right after a completed step, while that lease is still live. Process B,
which shares only the database and the encrypted store (``TS_DATA_DIR``), gets the next
requests of the run: its worker may take the model only once A's lease has expired, then
reloads the run from its encrypted auto-checkpoint and continues it. The step counter goes
on from where A left it (no step lost, none counted twice), every ``seq_id`` runs exactly
once, and the futures submitted to B complete.
"""

from __future__ import annotations

import datetime as dt
import itertools
import pathlib
import time
from collections.abc import Iterator
from typing import Any

import httpx
import pytest
from sqlalchemy import select

from server.conftest import TINY_MODEL
from server.test_crash_recovery import _port, _Server, _server_env
from tensafe.client._wire import decode_forward_backward_output, encode_forward_backward_request
from tensafe.client.types import Datum, ModelInput
from tensafe.server.models import FutureRow, TrainingModel

tinker = pytest.importorskip("tinker", reason="the official tinker SDK is a test dependency (tinker==0.38.0)")

TOKENS = [1, 17, 23, 42, 99, 7]
#: Long enough that A's lease is certainly still live when it is killed, short for the test.
LEASE_S = 4.0


@pytest.fixture
def processes(
    tmp_path: pathlib.Path, tiny_model_dir: pathlib.Path, postgres_database_url: str
) -> Iterator[tuple[_Server, _Server, str, Any]]:
    env, key, sessions, engine = _server_env(postgres_database_url, tmp_path, tiny_model_dir)
    env = env | {"TS_SERVER_LEASE_S": str(LEASE_S)}
    a = _Server(env, _port(), tmp_path / "a.log")
    b = _Server(env, _port(), tmp_path / "b.log")
    try:
        yield a, b, key, sessions
    finally:
        b.stop()
        a.stop()
        engine.dispose()


def _tinker_batch() -> list[Any]:
    return [
        tinker.types.Datum(
            model_input=tinker.types.ModelInput.from_ints(TOKENS[:-1]),
            loss_fn_inputs={"target_tokens": TOKENS[1:], "weights": [1.0] * 5},
        )
    ]


def _submit_forward(srv: _Server, key: str, model_id: str, seq_id: int, *, backward: bool) -> str:
    body = encode_forward_backward_request(
        model_id=model_id,
        seq_id=seq_id,
        data=[
            Datum(
                model_input=ModelInput.from_ints(TOKENS[:-1]),
                loss_fn_inputs={"target_tokens": TOKENS[1:], "weights": [1.0] * 5},
            )
        ],
        loss_fn="cross_entropy",
        loss_fn_config=None,
        forward_only=not backward,
    )
    r = httpx.post(
        srv.url + "/api/v1/forward_backward",
        content=body,
        headers={"X-API-Key": key, "Content-Type": "application/x-protobuf"},
        timeout=30,
    )
    assert r.status_code == 200, r.text
    request_id: str = r.json()["request_id"]
    return request_id


def _submit_optim_step(srv: _Server, key: str, model_id: str, seq_id: int) -> str:
    r = httpx.post(
        srv.url + "/api/v1/optim_step",
        json={"model_id": model_id, "seq_id": seq_id, "adam_params": {"learning_rate": 5e-2}},
        headers={"X-API-Key": key},
        timeout=30,
    )
    assert r.status_code == 200, r.text
    request_id: str = r.json()["request_id"]
    return request_id


def _retrieve(srv: _Server, key: str, request_id: str) -> httpx.Response:
    deadline = time.monotonic() + 180
    while time.monotonic() < deadline:
        r = httpx.post(
            srv.url + "/api/v1/retrieve_future",
            json={"request_id": request_id},
            headers={"X-API-Key": key},
            timeout=30,
        )
        if r.status_code != 408:
            assert r.status_code == 200, r.text
            return r
    raise AssertionError(f"future {request_id} did not finish through {srv.url}")


def _logprobs(r: httpx.Response) -> list[float]:
    out = decode_forward_backward_output(r.content)
    return list(out.loss_fn_outputs[0]["logprobs"].data)


def _epsilon(r: httpx.Response) -> float:
    body = r.json()
    assert "error" not in body, body
    return float(body["metrics"]["dp_epsilon:max"])


def _model(sessions: Any, model_id: str) -> TrainingModel:
    with sessions() as s:
        row = s.get(TrainingModel, model_id)
        assert row is not None
        s.expunge(row)
        return row


def _futures(sessions: Any, model_id: str) -> dict[int, FutureRow]:
    with sessions() as s:
        rows = list(s.execute(select(FutureRow).where(FutureRow.model_id == model_id)).scalars())
        for row in rows:
            s.expunge(row)
    assert all(r.seq_id is not None for r in rows)
    by_seq = {int(r.seq_id): r for r in rows if r.seq_id is not None}
    assert len(by_seq) == len(rows), "a seq_id was recorded twice"
    return by_seq


def _aware(value: dt.datetime) -> dt.datetime:
    return value if value.tzinfo is not None else value.replace(tzinfo=dt.UTC)


@pytest.mark.slow
@pytest.mark.integration
def test_a_killed_process_hands_its_model_over_once_the_lease_expires(
    processes: tuple[_Server, _Server, str, Any],
) -> None:
    a, b, key, sessions = processes
    a.start()  # A alone first: it creates the development KEK and runs the whole first part.
    service = tinker.ServiceClient(base_url=a.url, api_key=key)
    adam = tinker.types.AdamParams(learning_rate=5e-2)
    epsilons: list[float] = []
    try:
        training = service.create_lora_training_client(base_model=TINY_MODEL, rank=2).result()
        model_id = training.model_id
        # Two steps through A with the official SDK (seq_ids 1-4).
        for _ in range(2):
            training.forward_backward(_tinker_batch(), "cross_entropy").result()
            metrics = training.optim_step(adam).result().metrics
            assert metrics is not None
            epsilons.append(float(metrics["dp_epsilon:max"]))
        worker_a = _model(sessions, model_id).worker_id
        assert worker_a is not None
        assert {f.worker_id for f in _futures(sessions, model_id).values()} == {worker_a}

        b.start()  # B is up (idle: nothing of the run is queued) before A dies.
        # Step 3 and a forward-only probe through A (seq_ids 5-7), then SIGKILL at once.
        _retrieve(a, key, _submit_forward(a, key, model_id, 5, backward=True))
        epsilons.append(_epsilon(_retrieve(a, key, _submit_optim_step(a, key, model_id, 6))))
        probe_a = _logprobs(_retrieve(a, key, _submit_forward(a, key, model_id, 7, backward=False)))
        a.kill9()
        killed_at = dt.datetime.now(dt.UTC)
        held = _model(sessions, model_id)
        # A died holding a live lease on the model, after completing step 3.
        assert held.worker_id == worker_a and held.step == 3
        assert held.lease_until is not None
        lease_until = _aware(held.lease_until)
        assert lease_until > killed_at, (lease_until, killed_at)

        # The run continues through B (seq_ids 8-10): B waits out A's lease, then takes over.
        probe_id = _submit_forward(b, key, model_id, 8, backward=False)
        probe_b = _logprobs(_retrieve(b, key, probe_id))
        # B reloaded exactly the state A saved at step 3 (auto-checkpoint), bit for bit.
        assert probe_b == probe_a
        _retrieve(b, key, _submit_forward(b, key, model_id, 9, backward=True))
        opt_id = _submit_optim_step(b, key, model_id, 10)
        epsilons.append(_epsilon(_retrieve(b, key, opt_id)))
        # A re-submission of seq_id 10 is the same future, not a fifth step.
        assert _submit_optim_step(b, key, model_id, 10) == opt_id
        taken = _model(sessions, model_id)  # B's lease (B releases it when it stops)
    finally:
        b.stop()

    # Each step spent more privacy than the one before: the steps ran in order, once each.
    assert all(x < y for x, y in itertools.pairwise(epsilons)), epsilons
    model = _model(sessions, model_id)
    futures = _futures(sessions, model_id)
    worker_b = futures[8].worker_id
    assert worker_b is not None and worker_b != worker_a
    assert model.step == 4 and taken.step == 4 and taken.worker_id == worker_b
    assert sorted(futures) == list(range(11))  # seq 0 is the model's creation
    assert {f.state for f in futures.values()} == {"complete"}
    # Every request ran exactly once (A's completed work was not repeated by B).
    assert [f.attempts for f in futures.values()] == [1] * len(futures)
    assert {s for s, f in futures.items() if f.worker_id == worker_a} == set(range(8))
    assert {s for s, f in futures.items() if f.worker_id == worker_b} == {8, 9, 10}
    # B started on the model only after A's lease had expired.
    started = futures[8].started_at
    assert started is not None and _aware(started) >= lease_until, (started, lease_until)
