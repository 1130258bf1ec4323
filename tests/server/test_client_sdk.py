"""TenSafe's own SDK (``tensafe.client``) against a live server on a loopback port.

Oracles: the server's codec (itself checked against the official SDK in test_wire.py),
the tiny model's base logprobs via the official-SDK tests' helper, the audit chain's
hash links, and :func:`tensafe.privacy.compute_epsilon` for the certificate.
"""

from __future__ import annotations

import asyncio
import concurrent.futures
import json
import math
import pickle
import subprocess
import sys
import threading
from typing import Any

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from server.conftest import TINY_MODEL, LiveServer, ServerEnv
from tensafe import client as ts
from tensafe.client import types
from tensafe.client._wire import (
    decode_forward_backward_output,
    decode_sample_response,
    encode_forward_backward_request,
)
from tensafe.protocol.wire import (
    decode_forward_backward_request,
    encode_forward_backward_output,
    encode_sample_response,
)
from tensafe.server.privacy import OperatorPrivacy

LOOSE = OperatorPrivacy(
    target_epsilon=50.0, delta=1e-3, clip_norm=10.0, dataset_size=64, expected_batch_size=8, max_steps=40
)
TOKENS = [1, 17, 23, 42, 99, 7]


def _datum(tokens: list[int], **inputs: Any) -> types.Datum:
    return types.Datum(
        model_input=types.ModelInput.from_ints(tokens[:-1]),
        loss_fn_inputs={"target_tokens": tokens[1:], **inputs},
    )


# --------------------------------------------------------------------------- offline


def test_importing_the_sdk_does_not_import_torch_or_the_server() -> None:
    code = (
        "import json, sys, tensafe.client, tensafe.client.types; "
        "print(json.dumps(sorted(m for m in sys.modules if m.split('.')[0] in "
        "('torch', 'transformers', 'sqlalchemy', 'fastapi', 'uvicorn') or m.startswith("
        "('tensafe.server', 'tensafe.crypto', 'tensafe.training', 'tensafe.keys')))))"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert json.loads(out.stdout.strip().splitlines()[-1]) == []


@pytest.mark.parametrize(
    ("status", "cls"),
    [
        (400, ts.BadRequestError),
        (401, ts.AuthenticationError),
        (403, ts.PermissionDeniedError),
        (404, ts.NotFoundError),
        (409, ts.ConflictError),
        (410, ts.GoneError),
        (413, ts.RequestTooLargeError),
        (422, ts.UnprocessableEntityError),
        (429, ts.RateLimitError),
        (503, ts.InternalServerError),
        (418, ts.APIStatusError),
    ],
)
def test_status_errors_map_and_pickle(status: int, cls: type[ts.APIStatusError]) -> None:
    from tensafe.client._exceptions import status_error

    body = {"error": "not_found", "detail": "unknown model 'x'", "category": "user"}
    err = status_error(status, body)
    assert type(err) is cls and isinstance(err, ts.APIStatusError) and isinstance(err, ts.TensafeClientError)
    copy = pickle.loads(pickle.dumps(err))
    assert type(copy) is cls
    assert (copy.status_code, copy.body, copy.detail, copy.category, str(copy)) == (
        status,
        body,
        "unknown model 'x'",
        "user",
        str(err),
    )


def test_request_failed_and_connection_errors_pickle() -> None:
    err = ts.RequestFailedError("loss_fn 'nope' is unknown", request_id="req-1", category="user")
    copy = pickle.loads(pickle.dumps(err))
    assert (copy.message, copy.request_id, copy.category, str(copy)) == (
        err.message,
        "req-1",
        "user",
        str(err),
    )
    for other in (ts.APIConnectionError("down"), ts.ClientConfigurationError("no key")):
        again = pickle.loads(pickle.dumps(other))
        assert type(again) is type(other) and str(again) == str(other)


def test_configuration_from_arguments_and_environment(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv("TENSAFE_API_KEY", raising=False)
    monkeypatch.delenv("TENSAFE_BASE_URL", raising=False)
    with pytest.raises(ts.ClientConfigurationError, match="TENSAFE_API_KEY"):
        ts.ServiceClient()
    with pytest.raises(ts.ClientConfigurationError, match="tml-"):
        ts.ServiceClient(api_key="sk-not-a-tensafe-key")
    with pytest.raises(ts.ClientConfigurationError, match="http"):
        ts.RestClient(base_url="ftp://x", api_key="tml-abc")
    secret = "tml-" + "s" * 43
    monkeypatch.setenv("TENSAFE_API_KEY", secret)
    monkeypatch.setenv("TENSAFE_BASE_URL", "http://127.0.0.1:9/")
    service = ts.ServiceClient()
    assert repr(service) == "ServiceClient(base_url='http://127.0.0.1:9')"
    assert secret not in repr(service) and secret not in repr(service.create_rest_client())
    with pytest.raises(TypeError):
        pickle.dumps(service)
    service.close().result()


def test_unreachable_server_is_a_connection_error_after_retries() -> None:
    rest = ts.RestClient(base_url="http://127.0.0.1:9", api_key="tml-abc", max_retries=1)
    with pytest.raises(ts.APIConnectionError, match="cannot reach"):
        rest.list_training_runs().result(timeout=30)
    rest.close()


def test_forward_backward_body_decodes_with_the_server_codec() -> None:
    data = [
        _datum([5, 6, 7, 8], weights=[0.0, 1.0, 0.5]),
        _datum([9, 10, 11], advantages=np.array([1.5, -2.0], dtype=np.float32), logprobs=[-1.0, -2.0]),
    ]
    body = encode_forward_backward_request(
        model_id="sess-1:train:0",
        seq_id=3,
        data=data,
        loss_fn="ppo",
        loss_fn_config={"clip_low_threshold": 0.7, "note": "x"},
    )
    req = decode_forward_backward_request(body)
    assert (req.model_id, req.seq_id, req.loss_fn, req.forward_only) == ("sess-1:train:0", 3, "ppo", False)
    assert dict(req.loss_fn_config) == {"clip_low_threshold": pytest.approx(0.7), "note": "x"}
    assert [d.tokens.tolist() for d in req.data] == [[5, 6, 7], [9, 10]]
    first, second = req.data
    assert first.loss_fn_inputs["target_tokens"].dtype == np.int64
    assert first.loss_fn_inputs["target_tokens"].tolist() == [6, 7, 8]
    assert first.loss_fn_inputs["weights"].tolist() == [0.0, 1.0, 0.5]
    assert second.loss_fn_inputs["advantages"].dtype == np.float32
    assert second.loss_fn_inputs["logprobs"].tolist() == [-1.0, -2.0]


@settings(max_examples=50, deadline=None)
@given(
    rows=st.lists(
        st.lists(st.integers(0, 2**31 - 1), min_size=2, max_size=12).flatmap(
            lambda toks: st.tuples(
                st.just(toks),
                st.lists(
                    st.floats(-1e6, 1e6, allow_nan=False, width=32),
                    min_size=len(toks) - 1,
                    max_size=len(toks) - 1,
                ),
            )
        ),
        min_size=1,
        max_size=4,
    ),
    seq_id=st.integers(1, 2**31 - 1),
    forward_only=st.booleans(),
)
def test_any_batch_round_trips_through_the_server_codec(
    rows: list[tuple[list[int], list[float]]], seq_id: int, forward_only: bool
) -> None:
    data = [_datum(toks, weights=w) for toks, w in rows]
    req = decode_forward_backward_request(
        encode_forward_backward_request(
            model_id="m:train:0", seq_id=seq_id, data=data, loss_fn="cross_entropy", forward_only=forward_only
        )
    )
    assert (req.seq_id, req.forward_only) == (seq_id, forward_only)
    for (toks, weights), got in zip(rows, req.data, strict=True):
        assert got.tokens.tolist() == toks[:-1]
        assert got.loss_fn_inputs["target_tokens"].tolist() == toks[1:]
        assert got.loss_fn_inputs["weights"].tolist() == weights


def test_results_encoded_by_the_server_decode_in_the_sdk() -> None:
    outputs = [{"logprobs": np.array([-0.5, -1.25], dtype=np.float32)}, {"logprobs": np.array([-3.0])}]
    fb = decode_forward_backward_output(encode_forward_backward_output(outputs, {"loss:sum": 4.75}))
    assert fb.metrics == {"loss:sum": 4.75}
    assert [o["logprobs"].tolist() for o in fb.loss_fn_outputs] == [[-0.5, -1.25], [-3.0]]
    sample = decode_sample_response(
        encode_sample_response(
            [([4, 5], [-0.1, -0.2], "length"), ([6], [-0.3], "stop")], prompt_logprobs=[None, -2.5]
        ),
        ["a", "b"],
    )
    assert [(s.tokens, s.stop_reason, s.sequence_id) for s in sample.sequences] == [
        ([4, 5], "length", "a"),
        ([6], "stop", "b"),
    ]
    assert sample.sequences[0].logprobs == pytest.approx([-0.1, -0.2])
    assert sample.prompt_logprobs == [None, -2.5]
    with pytest.raises(ts.APIResponseValidationError):
        decode_forward_backward_output(b"\xff\xff\xff")


def test_future_status_cancel_timeout_and_async() -> None:
    pool = concurrent.futures.ThreadPoolExecutor(2)
    gate = threading.Event()

    def slow(cancelled: threading.Event) -> int:
        gate.wait(10)
        return 7

    pending = ts.APIFuture(pool, slow)
    assert pending.status() == "pending"
    with pytest.raises(TimeoutError):
        pending.result(timeout=0.05)
    assert pending.cancel() and pending.status() == "cancelled"
    with pytest.raises(concurrent.futures.CancelledError):
        pending.result()
    done = ts.APIFuture(pool, lambda _c: 42)
    assert done.result(timeout=5) == 42 and done.status() == "done"
    failing = ts.APIFuture(
        pool, lambda _c: (_ for _ in ()).throw(ts.RequestFailedError("boom", category="user"))
    )
    with pytest.raises(ts.RequestFailedError, match="boom"):
        failing.result(timeout=5)
    assert failing.status() == "failed"

    async def main() -> tuple[int, int]:
        later = ts.APIFuture(pool, slow)
        with pytest.raises(TimeoutError):
            await later.result_async(timeout=0.05)
        assert later.status() == "pending"  # a timeout does not cancel the operation
        gate.set()
        return await later, await ts.APIFuture(pool, lambda _c: 1).result_async()

    assert asyncio.run(main()) == (7, 1)
    pool.shutdown()


# --------------------------------------------------------------------------- live server


def test_sdk_session_model_rest_audit_and_artifacts(live_server: LiveServer, server_env: ServerEnv) -> None:
    key = server_env.tenant_key("acme")
    with ts.ServiceClient(base_url=live_server.url, api_key=key, user_metadata={"recipe": "t"}) as service:
        caps = service.get_server_capabilities()
        assert [m.model_name for m in caps.supported_models] == [TINY_MODEL]
        future = service.create_lora_training_client(
            base_model=TINY_MODEL, rank=4, user_metadata={"renderer_name": "role_colon"}
        )
        assert future.request_id is not None
        training = future.result(timeout=60)
        assert future.status() == "done"
        model_id = training.model_id
        assert model_id.endswith(":train:0")
        info = training.get_info()
        assert (info.model_data.model_name, info.lora_rank) == (TINY_MODEL, 4)
        tokenizer = training.get_tokenizer()
        assert (
            tokenizer.decode(tokenizer.encode("Hello TenSafe", add_special_tokens=False)) == "Hello TenSafe"
        )
        second = asyncio.run(service.create_lora_training_client_async(TINY_MODEL, rank=2))
        session_id = model_id.split(":train:")[0]
        assert second.model_id == f"{session_id}:train:1"
        with pytest.raises(ts.BadRequestError, match="unknown base model") as bad:
            service.create_lora_training_client(base_model="Qwen/Qwen3-8B", rank=4)
        assert bad.value.status_code == 400 and bad.value.category == "user"

        with service.create_rest_client() as rest:
            runs = rest.list_training_runs().result()
            assert {r.training_run_id for r in runs.training_runs} == {model_id, second.model_id}
            assert runs.cursor.total_count == 2
            run = rest.get_training_run(model_id).result()
            assert run.base_model == TINY_MODEL and run.user_metadata == {"renderer_name": "role_colon"}
            assert rest.list_checkpoints(model_id).result().checkpoints == []
            assert asyncio.run(rest.get_training_run_async(second.model_id)).lora_rank == 2
            assert session_id in rest.list_sessions().result().sessions
            assert rest.get_session(session_id).result().training_run_ids == [model_id, second.model_id]

            audit = rest.list_audit_records(limit=1000).result()
            actions = [r.action for r in audit.records]
            assert actions[0] == "api.create_session"  # the fixture's admin calls are not audited
            assert actions.count("api.create_model") == 2 and "api.create_model.complete" in actions
            assert audit.total_count == len(audit.records)
            assert [r.seq for r in audit.records] == list(range(len(audit.records)))
            for before, after in zip(audit.records, audit.records[1:], strict=False):
                assert after.prev_hash == before.record_hash
            assert key not in json.dumps([r.model_dump() for r in audit.records])
            assert [r.seq for r in rest.list_audit_records(limit=2).result().records] == [
                len(actions) - 2,
                len(actions) - 1,
            ]
            verdict = rest.verify_audit().result()
            assert verdict.verified and verdict.length == len(audit.records)
            assert verdict.head_hash == audit.records[-1].record_hash
            listed = rest.list_artifacts().result()
            assert listed.total_count == len(listed.artifacts)
            assert {a.training_run_id for a in listed.artifacts} <= {model_id, second.model_id}


def test_bad_key_and_other_tenants_resources(live_server: LiveServer, server_env: ServerEnv) -> None:
    with pytest.raises(ts.AuthenticationError) as err:
        ts.ServiceClient(base_url=live_server.url, api_key="tml-" + "x" * 43).create_lora_training_client(
            base_model=TINY_MODEL, rank=2
        )
    assert err.value.status_code == 401 and "x" * 43 not in str(err.value)
    assert isinstance(pickle.loads(pickle.dumps(err.value)), ts.AuthenticationError)
    with pytest.raises(ts.AuthenticationError):
        ts.RestClient(base_url=live_server.url, api_key="tml-" + "y" * 43).list_audit_records().result()

    alice, bob = server_env.tenant_key("alice"), server_env.tenant_key("bob")
    with ts.ServiceClient(base_url=live_server.url, api_key=alice) as service:
        model_id = service.create_lora_training_client(base_model=TINY_MODEL, rank=2).result().model_id
    with (
        ts.ServiceClient(base_url=live_server.url, api_key=bob) as intruder,
        intruder.create_rest_client() as rest,
    ):
        for call in (
            lambda: rest.get_training_run(model_id).result(),
            lambda: rest.list_checkpoints(model_id).result(),
            lambda: rest.get_privacy(model_id).result(),
            lambda: rest.get_session(model_id.split(":train:")[0]).result(),
        ):
            with pytest.raises(ts.NotFoundError) as missing:
                call()
            assert missing.value.status_code == 404
        stolen = ts.TrainingClient(intruder._holder, model_id)
        with pytest.raises(ts.NotFoundError):
            stolen.get_info()
        with pytest.raises(ts.NotFoundError):
            stolen.get_certificate()
        with pytest.raises(ts.NotFoundError):
            stolen.forward_backward([_datum(TOKENS, weights=[1.0] * 5)], "cross_entropy")
        assert rest.list_training_runs().result().training_runs == []
        assert all(
            r.action.startswith(("admin.", "api.create_session", "api.finish_session"))
            for r in rest.list_audit_records().result().records
        )
        assert rest.list_artifacts().result().total_count == 0


@pytest.mark.slow
def test_sdk_trains_saves_samples_and_reports_privacy(start_server: Any, server_env: ServerEnv) -> None:
    from tensafe.privacy import compute_epsilon

    server: LiveServer = start_server(privacy=LOOSE)
    key = server_env.tenant_key("acme")
    service = ts.ServiceClient(base_url=server.url, api_key=key)
    try:
        training = service.create_lora_training_client(base_model=TINY_MODEL, rank=4, seed=3).result()
        privacy = training.get_privacy()
        assert privacy.dp_enabled and privacy.steps == 0
        assert (privacy.target_epsilon, privacy.delta, privacy.max_grad_norm) == (50.0, 1e-3, 10.0)
        assert training.get_certificate()["steps"] == 0
        batch = [_datum(TOKENS, weights=[0.0, 1.0, 1.0, 1.0, 1.0])]
        losses = []
        for _ in range(3):
            fwd = training.forward_backward(batch, "cross_entropy")
            opt = training.optim_step(types.AdamParams(learning_rate=5e-2))
            out = fwd.result(timeout=120)
            lp = out.loss_fn_outputs[0]["logprobs"].to_numpy()
            assert lp.shape == (5,) and out.metrics["loss:sum"] == pytest.approx(
                -float(lp[1:].sum()), rel=1e-4
            )
            losses.append(out.metrics["loss:sum"])
            assert opt.result(timeout=120).metrics is not None
        assert all(math.isfinite(v) for v in losses)

        with pytest.raises(ts.RequestFailedError) as failed:
            training.forward_backward(batch, "no_such_loss").result(timeout=60)
        assert failed.value.category == "user" and failed.value.request_id

        privacy = training.get_privacy()
        assert privacy.steps == 3 and privacy.accountant is not None
        assert privacy.epsilon_spent is not None and 0 < privacy.epsilon_spent <= privacy.target_epsilon
        cert = training.get_certificate()
        assert cert["dp_enabled"] is True and cert["steps"] == 3
        oracle = compute_epsilon(
            accountant=cert["accountant"],
            noise_multiplier=cert["noise_multiplier"],
            sample_rate=cert["sample_rate"],
            steps=3,
            delta=cert["delta"],
        )
        assert cert["epsilon"] == pytest.approx(oracle) and privacy.epsilon_spent == pytest.approx(
            oracle, rel=1e-6
        )

        path = training.save_state("s1").result(timeout=120).path
        assert path == f"tinker://{training.model_id}/weights/s1"
        restored = service.create_training_client_from_state_with_optimizer(path).result(timeout=120)
        probe = [_datum(TOKENS, weights=[1.0] * 5)]
        a = (
            training.forward(probe, "cross_entropy")
            .result(timeout=120)
            .loss_fn_outputs[0]["logprobs"]
            .to_numpy()
        )
        b = (
            restored.forward(probe, "cross_entropy")
            .result(timeout=120)
            .loss_fn_outputs[0]["logprobs"]
            .to_numpy()
        )
        np.testing.assert_array_equal(a, b)

        sampler = training.save_weights_and_get_sampling_client().result(timeout=120)
        prompt = types.ModelInput.from_ints(TOKENS)
        params = types.SamplingParams(max_tokens=3, seed=11, stop=[])
        res = sampler.sample(prompt, 2, params).result(timeout=120)
        assert len(res.sequences) == 2 and all(len(s.tokens) == 3 for s in res.sequences)
        assert all(s.sequence_id for s in res.sequences)
        again = asyncio.run(sampler.sample_async(prompt, 2, params))
        assert [s.tokens for s in again.sequences] == [s.tokens for s in res.sequences]
        lps = sampler.compute_logprobs(prompt).result(timeout=120)
        assert lps[0] is None
        np.testing.assert_allclose(np.asarray(lps[1:], dtype=np.float64), a, rtol=1e-4, atol=1e-4)

        with service.create_rest_client() as rest:
            roles = {x.role for x in rest.list_artifacts(limit=1000).result().artifacts}
            assert {"result", "checkpoint"} <= roles
            assert "request_payload" not in roles  # staged payloads are deleted on completion
            assert rest.verify_audit().result().verified
            assert rest.get_privacy(training.model_id).result().steps == 3
    finally:
        service.close("success").result()
