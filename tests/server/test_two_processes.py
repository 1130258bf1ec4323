"""Two real ``tensafe server`` OS processes behind one PostgreSQL database.

Process A and process B are separate subprocesses on two loopback ports that share only
the database and the encrypted store (``TS_DATA_DIR``). One training run is created and
stepped through A with the official ``tinker`` SDK, then polled and continued through B
over the same wire protocol; futures submitted to one process are resolved through the
other. The database then shows every ``seq_id`` of the run executed exactly once, all
futures finished, and the steps counted in order.
"""

from __future__ import annotations

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


@pytest.fixture
def two_processes(
    tmp_path: pathlib.Path, tiny_model_dir: pathlib.Path, postgres_database_url: str
) -> Iterator[tuple[_Server, _Server, str, Any]]:
    env, key, sessions, engine = _server_env(postgres_database_url, tmp_path, tiny_model_dir)
    a = _Server(env, _port(), tmp_path / "a.log")
    b = _Server(env, _port(), tmp_path / "b.log")
    a.start()  # A first: it creates the development KEK in the shared data directory.
    try:
        b.start()
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


def _submit_forward_backward(srv: _Server, key: str, model_id: str, seq_id: int) -> str:
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
        forward_only=False,
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
        json={
            "model_id": model_id,
            "seq_id": seq_id,
            "adam_params": {"learning_rate": 5e-2},
            "type": "optim_step",
        },
        headers={"X-API-Key": key},
        timeout=30,
    )
    assert r.status_code == 200, r.text
    request_id: str = r.json()["request_id"]
    return request_id


def _retrieve(srv: _Server, key: str, request_id: str) -> httpx.Response:
    deadline = time.monotonic() + 120
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
        time.sleep(0.05)
    raise AssertionError(f"future {request_id} did not finish through {srv.url}")


def _future_id(sessions: Any, model_id: str, seq_id: int) -> str:
    deadline = time.monotonic() + 60
    while time.monotonic() < deadline:
        with sessions() as s:
            row = s.execute(
                select(FutureRow).where(FutureRow.model_id == model_id, FutureRow.seq_id == seq_id)
            ).scalar_one_or_none()
        if row is not None:
            return str(row.id)
        time.sleep(0.05)
    raise AssertionError(f"seq_id {seq_id} was never recorded")


def _epsilon(r: httpx.Response) -> float:
    body = r.json()
    assert "error" not in body, body
    return float(body["metrics"]["dp_epsilon:max"])


@pytest.mark.slow
@pytest.mark.integration
def test_two_server_processes_share_one_run_on_postgresql(
    two_processes: tuple[_Server, _Server, str, Any],
) -> None:
    a, b, key, sessions = two_processes
    service = tinker.ServiceClient(base_url=a.url, api_key=key)
    adam = tinker.types.AdamParams(learning_rate=5e-2)
    epsilons: list[float] = []
    try:
        training = service.create_lora_training_client(base_model=TINY_MODEL, rank=2).result()
        model_id = training.model_id
        # Step 1 through A with the official SDK (seq_ids 1, 2).
        training.forward_backward(_tinker_batch(), "cross_entropy").result()
        metrics = training.optim_step(adam).result().metrics
        assert metrics is not None
        epsilons.append(float(metrics["dp_epsilon:max"]))
        # Step 2 submitted to A (seq_ids 3, 4); its futures are resolved through B.
        fb = training.forward_backward(_tinker_batch(), "cross_entropy")
        opt = training.optim_step(adam)
        fb_id, opt_id = _future_id(sessions, model_id, 3), _future_id(sessions, model_id, 4)
        out = decode_forward_backward_output(_retrieve(b, key, fb_id).content)
        assert out.loss_fn_outputs and len(out.loss_fn_outputs[0]["logprobs"].data) == 5
        epsilons.append(_epsilon(_retrieve(b, key, opt_id)))
        # The SDK's own futures (polling A) agree with what B returned.
        assert fb.result().loss_fn_outputs[0]["logprobs"].data == out.loss_fn_outputs[0]["logprobs"].data
        sdk_metrics = opt.result().metrics
        assert sdk_metrics is not None and float(sdk_metrics["dp_epsilon:max"]) == epsilons[-1]

        # Step 3 continued through B (seq_ids 5, 6); resolved through A and through B.
        fb_id = _submit_forward_backward(b, key, model_id, 5)
        opt_id = _submit_optim_step(b, key, model_id, 6)
        via_a = decode_forward_backward_output(_retrieve(a, key, fb_id).content)
        via_b = decode_forward_backward_output(_retrieve(b, key, fb_id).content)
        assert via_a.loss_fn_outputs[0]["logprobs"].data == via_b.loss_fn_outputs[0]["logprobs"].data
        epsilons.append(_epsilon(_retrieve(a, key, opt_id)))
        assert _epsilon(_retrieve(b, key, opt_id)) == epsilons[-1]

        # A re-submission of seq_id 6 to the other process is the same future, not a new step.
        assert _submit_optim_step(a, key, model_id, 6) == opt_id
        # Step 4 through B then A alternating (seq_ids 7 on B, 8 on A).
        _retrieve(a, key, _submit_forward_backward(b, key, model_id, 7))
        epsilons.append(_epsilon(_retrieve(b, key, _submit_optim_step(a, key, model_id, 8))))
    finally:
        service.close("success").result()

    # Each step spent more privacy than the one before: the steps ran in order.
    assert all(x < y for x, y in itertools.pairwise(epsilons)), epsilons
    with sessions() as s:
        row = s.get(TrainingModel, model_id)
        assert row is not None and row.step == 4
        futures = list(s.execute(select(FutureRow).where(FutureRow.model_id == model_id)).scalars())
    seq_ids = sorted(f.seq_id for f in futures if f.seq_id is not None)
    assert seq_ids == sorted(set(seq_ids)), "a seq_id was recorded twice"
    assert set(range(1, 9)) <= set(seq_ids)
    assert {f.state for f in futures} == {"complete"}
    # Every operation (model creation included) ran exactly once: one attempt each.
    assert [f.attempts for f in futures] == [1] * len(futures), [(f.seq_id, f.attempts) for f in futures]
