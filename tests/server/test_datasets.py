"""Server-side Poisson sampling through the API: register a data set, let the engine sample.

A run created with ``tensafe.dp.sampling=server_poisson`` registers its training set with
the server (stored only encrypted); ``train_step`` then has the engine draw each Poisson
batch, run ``forward_backward`` over it and apply ``optim_step``. The certificate says so,
and its ε is recomputed independently with :func:`tensafe.privacy.compute_epsilon`.
"""

from __future__ import annotations

import os
import pathlib
from typing import Any

import httpx
import numpy as np
import pytest
from sqlalchemy import MetaData, select

import tensafe.client as ts
from server.conftest import TINY_MODEL, LiveServer, ServerEnv
from tensafe.client._wire import encode_forward_backward_request
from tensafe.client.types import AdamParams, Datum, ModelInput
from tensafe.privacy import compute_epsilon
from tensafe.server.privacy import OperatorPrivacy

POLICY = OperatorPrivacy(
    target_epsilon=50.0, delta=1e-3, clip_norm=10.0, dataset_size=64, expected_batch_size=8, max_steps=40
)
N = 16
#: A token run that appears in the data set and nowhere else.
NEEDLE = [3141, 5926, 5358, 9793, 2384, 6264]
SERVER_SAMPLING = {"tensafe.dp.sampling": "server_poisson"}


def _datum(tokens: list[int]) -> Datum:
    return Datum(
        model_input=ModelInput.from_ints(tokens[:-1]),
        loss_fn_inputs={"target_tokens": tokens[1:], "weights": [1.0] * (len(tokens) - 1)},
    )


def _dataset() -> list[Datum]:
    rows = [[1, 10 + i, 20 + i, 30 + i, 40 + i, 50 + i] for i in range(N - 1)]
    return [_datum([1, *NEEDLE]), *(_datum(r) for r in rows)]


@pytest.fixture
def server(start_server: Any) -> LiveServer:
    srv: LiveServer = start_server(privacy=POLICY)
    return srv


def _service(server: LiveServer, server_env: ServerEnv, tenant: str = "acme") -> ts.ServiceClient:
    return ts.ServiceClient(base_url=server.url, api_key=server_env.tenant_key(tenant))


def test_engine_sampled_steps_have_an_honest_certificate(server: LiveServer, server_env: ServerEnv) -> None:
    service = _service(server, server_env)
    try:
        training = service.create_lora_training_client(
            base_model=TINY_MODEL, rank=2, user_metadata=SERVER_SAMPLING
        ).result()
        assert training.register_dataset(_dataset()).result().dataset_size == N
        for _ in range(3):
            out = training.train_step("cross_entropy", AdamParams(learning_rate=1e-2)).result()
            assert out.metrics is not None and out.metrics["dp_epsilon:max"] > 0
            # Only what the mechanism released: no loss, size or clipping count of the private batch.
            assert set(out.metrics) == {"grad_norm:mean", "learning_rate:mean", "dp_epsilon:max"}
        cert = training.get_certificate()
        # A client-chosen batch is refused: only the engine picks the examples of a step.
        with pytest.raises(ts.RequestFailedError, match="server_poisson"):
            training.forward_backward([_datum([1, 2, 3, 4])], "cross_entropy").result()
        # The data set is registered once per run.
        with pytest.raises(ts.RequestFailedError, match="already registered"):
            training.register_dataset(_dataset()).result()
    finally:
        service.close().result()
    assert cert["sampling_method"] == "poisson" and cert["sampled_by"] == "engine"
    assert cert["amplification"] == "poisson_subsampling" and cert["private"] is True
    assert cert["dataset_size_source"] == "registered" and cert["signature"] is not None
    assert cert["dataset_size"] == N and cert["steps"] == 3
    assert cert["sample_rate"] == pytest.approx(POLICY.expected_batch_size / N)
    expected = compute_epsilon(
        accountant=cert["accountant"],
        noise_multiplier=cert["noise_multiplier"],
        sample_rate=POLICY.expected_batch_size / N,
        steps=3,
        delta=cert["delta"],
    )
    assert cert["epsilon"] == pytest.approx(expected, rel=1e-9)


def test_client_chosen_runs_cannot_use_server_sampling(server: LiveServer, server_env: ServerEnv) -> None:
    service = _service(server, server_env)
    try:
        training = service.create_lora_training_client(base_model=TINY_MODEL, rank=2).result()
        with pytest.raises(ts.BadRequestError, match="server_poisson"):
            training.register_dataset(_dataset())
        with pytest.raises(ts.BadRequestError, match="server_poisson"):
            training.train_step("cross_entropy", AdamParams())
        # A server-sampled run without a data set fails its step with a user error.
        sampled = service.create_lora_training_client(
            base_model=TINY_MODEL, rank=2, user_metadata=SERVER_SAMPLING
        ).result()
        with pytest.raises(ts.RequestFailedError, match="register"):
            sampled.train_step("cross_entropy", AdamParams()).result()
    finally:
        service.close().result()


def test_other_tenants_get_404(server: LiveServer, server_env: ServerEnv) -> None:
    service = _service(server, server_env)
    try:
        training = service.create_lora_training_client(
            base_model=TINY_MODEL, rank=2, user_metadata=SERVER_SAMPLING
        ).result()
        other = {"X-API-Key": server_env.tenant_key("globex")}
        body = encode_forward_backward_request(
            model_id=training.model_id,
            seq_id=1,
            data=_dataset(),
            loss_fn="cross_entropy",
            loss_fn_config=None,
            forward_only=True,
        )
        r = httpx.post(
            server.url + "/api/v1/tensafe/register_dataset",
            content=body,
            headers={**other, "Content-Type": "application/x-protobuf"},
        )
        assert r.status_code == 404, r.text
        r = httpx.post(
            server.url + "/api/v1/tensafe/train_step",
            json={
                "model_id": training.model_id,
                "seq_id": 1,
                "loss_fn": "cross_entropy",
                "adam_params": {"learning_rate": 1e-2},
            },
            headers=other,
        )
        assert r.status_code == 404, r.text
        # The owner's run is untouched: its first request still gets seq_id 1.
        assert training.register_dataset(_dataset()).result().dataset_size == N
    finally:
        service.close().result()


def _needles() -> list[bytes]:
    return [
        np.asarray(NEEDLE, dtype=np.int64).tobytes(),
        np.asarray(NEEDLE, dtype=np.int32).tobytes(),
        ", ".join(map(str, NEEDLE)).encode(),
        ",".join(map(str, NEEDLE)).encode(),
    ]


def _database_bytes(server_env: ServerEnv) -> bytes:
    meta = MetaData()
    meta.reflect(server_env.engine)
    out = bytearray()
    with server_env.engine.connect() as conn:
        for table in meta.sorted_tables:
            for row in conn.execute(select(table)):
                for value in row:
                    out += value if isinstance(value, bytes | memoryview) else str(value).encode()
                    out += b"\x00"
    return bytes(out)


def test_dataset_is_never_stored_in_plaintext(
    server: LiveServer, server_env: ServerEnv, tmp_path: pathlib.Path
) -> None:
    # The needle is what a plaintext copy of the request would contain.
    body = encode_forward_backward_request(
        model_id="m:train:0", seq_id=1, data=_dataset(), loss_fn="cross_entropy", loss_fn_config=None
    )
    assert any(n in body for n in _needles())
    service = _service(server, server_env)
    try:
        training = service.create_lora_training_client(
            base_model=TINY_MODEL, rank=2, user_metadata=SERVER_SAMPLING
        ).result()
        training.register_dataset(_dataset()).result()
        training.train_step("cross_entropy", AdamParams(learning_rate=1e-2)).result()
    finally:
        service.close().result()
    database = _database_bytes(server_env)
    assert b"register_dataset" in database  # the audit trail and the futures are there
    files = [pathlib.Path(d) / f for d, _, fs in os.walk(tmp_path) for f in fs]
    assert files
    for needle in _needles():
        assert needle not in database
        for path in files:
            assert needle not in path.read_bytes(), path


def test_registered_dataset_survives_a_server_restart(start_server: Any, server_env: ServerEnv) -> None:
    first: LiveServer = start_server(privacy=POLICY)
    key = server_env.tenant_key("acme")
    service = ts.ServiceClient(base_url=first.url, api_key=key)
    training = service.create_lora_training_client(
        base_model=TINY_MODEL, rank=2, user_metadata=SERVER_SAMPLING
    ).result()
    model_id = training.model_id
    training.register_dataset(_dataset()).result()
    training.train_step("cross_entropy", AdamParams(learning_rate=1e-2)).result()
    service.close().result()
    first.stop()  # releases the run's lease; the weights and the data set leave memory
    second: LiveServer = start_server(privacy=POLICY)
    # The next request of the same run, through the new server, in seq_id order (3).
    r = httpx.post(
        second.url + "/api/v1/tensafe/train_step",
        json={"model_id": model_id, "seq_id": 3, "loss_fn": "cross_entropy", "adam_params": {}},
        headers={"X-API-Key": key},
    )
    assert r.status_code == 200, r.text
    future = r.json()["request_id"]
    for _ in range(12):  # 12 long polls of at most 5 s
        got = httpx.post(
            second.url + "/api/v1/retrieve_future",
            json={"request_id": future},
            headers={"X-API-Key": key},
            timeout=30,
        )
        if got.status_code != 408:
            break
    assert got.status_code == 200 and "error" not in got.json(), got.text
    report = httpx.get(
        second.url + f"/api/v1/tensafe/training_runs/{model_id}/certificate", headers={"X-API-Key": key}
    ).json()
    assert report["steps"] == 2 and report["dataset_size"] == N
    assert report["sampling_method"] == "poisson" and report["sampled_by"] == "engine"
    assert second.app.state.compute.loaded_models() == [model_id]
