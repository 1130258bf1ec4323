"""HTTP behaviour of the server: auth, errors, tenant isolation, futures, de-duplication."""

from __future__ import annotations

import datetime as dt
from collections.abc import Callable
from typing import Any

import httpx
import pytest

from server.conftest import TINY_MODEL, LiveServer, ServerEnv
from tensafe.audit import iter_records, verify_chain


def _client(server: LiveServer, key: str | None) -> httpx.Client:
    headers = {} if key is None else {"X-API-Key": key}
    return httpx.Client(base_url=server.url + "/api/v1", headers=headers, timeout=30)


def _create_model(c: httpx.Client, session_id: str, seq: int = 0, base: str = TINY_MODEL) -> httpx.Response:
    return c.post(
        "/create_model",
        json={
            "session_id": session_id,
            "model_seq_id": seq,
            "base_model": base,
            "lora_config": {"rank": 4, "train_unembed": True, "train_mlp": True, "train_attn": True},
            "optimizer_config": {"type": "adamw"},
            "user_metadata": {"renderer_name": "role_colon"},
            "type": "create_model",
        },
    )


def _session(c: httpx.Client) -> str:
    r = c.post(
        "/create_session",
        json={"tags": [], "user_metadata": {}, "sdk_version": "0.38.0", "type": "create_session"},
    )
    assert r.status_code == 200, r.text
    sid: str = r.json()["session_id"]
    return sid


def _result(c: httpx.Client, request_id: str) -> httpx.Response:
    for _ in range(20):
        r = c.post("/retrieve_future", json={"request_id": request_id, "allow_metadata_only": True})
        if r.status_code != 408:
            return r
    raise AssertionError("future never completed")


def test_health_and_readiness(live_server: LiveServer) -> None:
    assert httpx.get(live_server.url + "/healthz").json() == {"status": "ok"}
    ready = httpx.get(live_server.url + "/readyz")
    assert ready.status_code == 200 and ready.json()["status"] == "ready"
    schema = httpx.get(live_server.url + "/openapi.json").json()
    assert "/api/v1/create_model" in schema["paths"] and "/api/v1/retrieve_future" in schema["paths"]


def test_bad_missing_expired_and_revoked_keys_get_401_json(
    live_server: LiveServer, server_env: ServerEnv
) -> None:
    from tensafe.server.tenants import revoke_api_key

    good = server_env.tenant_key("acme")
    expired = server_env.tenant_key("acme", expires_in=dt.timedelta(seconds=1))
    revoked = server_env.tenant_key("acme")
    with server_env.sessions.begin() as s:
        from sqlalchemy import select

        from tensafe.server.models import ApiKey
        from tensafe.server.tenants import hash_api_key

        key_id = s.execute(select(ApiKey.id).where(ApiKey.key_hash == hash_api_key(revoked))).scalar_one()
        revoke_api_key(s, key_id)
    import time

    time.sleep(1.1)
    body = {"sdk_version": "0.38.0"}
    for key in (
        None,
        "tml-" + "A" * 43,
        "tml-short",
        expired,
        revoked,
        good[:-1] + ("B" if good[-1] != "B" else "C"),
    ):
        r = _client(live_server, key).post("/client/config", json=body)
        assert r.status_code == 401, (key, r.text)
        assert r.headers["content-type"].startswith("application/json")
        assert r.json()["error"] == "unauthenticated"
        if key:
            assert key not in r.text
    assert _client(live_server, good).post("/client/config", json=body).status_code == 200


def test_malformed_requests_get_4xx_with_body(live_server: LiveServer, server_env: ServerEnv) -> None:
    c = _client(live_server, server_env.tenant_key("acme"))
    cases: list[tuple[Callable[[], httpx.Response], int]] = [
        (
            lambda: c.post(
                "/create_session", content=b"{not json", headers={"content-type": "application/json"}
            ),
            400,
        ),
        (lambda: c.post("/create_session", json={"tags": "x", "user_metadata": {}}), 422),
        (lambda: c.post("/create_session", json={"tags": [], "unexpected": 1}), 422),
        (
            lambda: c.post("/create_model", json={"session_id": "s", "model_seq_id": -1, "base_model": "m"}),
            422,
        ),
        (lambda: c.post("/retrieve_future", json=[1, 2, 3]), 422),
        (lambda: c.post("/no_such_endpoint", json={}), 404),
        (lambda: c.get("/create_session"), 405),
        (lambda: c.get("/training_runs", params={"limit": "many"}), 422),
    ]
    for call, status in cases:
        r = call()
        assert r.status_code == status, r.text
        assert int(r.headers["content-length"]) > 0
        body = r.json()
        assert body["error"] and body["detail"]


def test_unknown_base_model_is_a_400_with_the_served_list(
    live_server: LiveServer, server_env: ServerEnv
) -> None:
    c = _client(live_server, server_env.tenant_key("acme"))
    r = _create_model(c, _session(c), base="Qwen/Qwen3-8B")
    assert r.status_code == 400
    assert TINY_MODEL in r.json()["detail"]


def test_create_model_future_dedupe_and_info(live_server: LiveServer, server_env: ServerEnv) -> None:
    c = _client(live_server, server_env.tenant_key("acme"))
    sid = _session(c)
    first = _create_model(c, sid)
    assert first.status_code == 200, first.text
    again = _create_model(c, sid)  # a re-POST after a lost response
    assert again.json() == first.json()
    assert first.json()["model_id"] == f"{sid}:train:0"
    # The same (model_id, seq_id) with a different body is refused.
    r = c.post(
        "/create_model",
        json={"session_id": sid, "model_seq_id": 0, "base_model": TINY_MODEL, "lora_config": {"rank": 8}},
    )
    assert r.status_code == 400 and "already used" in r.json()["detail"]
    done = _result(c, first.json()["request_id"])
    assert done.status_code == 200 and done.json() == {"model_id": f"{sid}:train:0", "type": "create_model"}
    info = c.post("/get_info", json={"model_id": f"{sid}:train:0", "type": "get_info"}).json()
    assert info["model_data"]["model_name"] == TINY_MODEL and info["model_data"]["arch"] == "llama"
    assert info["lora_rank"] == 4 and info["is_lora"] is True
    run = c.get(f"/training_runs/{sid}:train:0").json()
    assert run["user_metadata"] == {"renderer_name": "role_colon"} and run["model_owner"] == "acme"
    # Every operation left a verifiable trace in the tenant's audit chain.
    verifying_key = server_env.keys.deployment_verifying_key()
    with server_env.sessions() as s:
        actions = [r.action for r in iter_records(s, tenant="acme")]
        report = verify_chain(s, tenant="acme", verifying_key=verifying_key, allow_unsigned_tail=True)
    # (The tenant's DEK is created when the model's first auto-checkpoint is encrypted.)
    api = [a for a in actions if a.startswith("api.")]
    assert api[-3:] == ["api.create_session", "api.create_model", "api.create_model.complete"], actions
    assert "keys.dek.created" in actions
    assert report.length == len(actions)


def test_pending_future_answers_408_try_again(
    start_server: Callable[..., LiveServer], server_env: ServerEnv
) -> None:
    server = start_server(run_worker=False, long_poll_seconds=0.3)
    c = _client(server, server_env.tenant_key("acme"))
    rid = _create_model(c, _session(c)).json()["request_id"]
    r = c.post("/retrieve_future", json={"request_id": rid, "allow_metadata_only": True})
    assert r.status_code == 408
    assert r.json() == {"type": "try_again", "request_id": rid, "queue_state": "active"}


def test_tenants_cannot_see_each_other(live_server: LiveServer, server_env: ServerEnv) -> None:
    a = _client(live_server, server_env.tenant_key("acme"))
    b = _client(live_server, server_env.tenant_key("globex"))
    sid = _session(a)
    created = _create_model(a, sid).json()
    model_id, rid = created["model_id"], created["request_id"]
    assert _result(a, rid).status_code == 200
    probes: list[Callable[[], httpx.Response]] = [
        lambda: b.post("/retrieve_future", json={"request_id": rid}),
        lambda: b.post("/get_info", json={"model_id": model_id}),
        lambda: b.post("/session_heartbeat", json={"session_id": sid}),
        lambda: b.post(f"/sessions/{sid}/finish", json={"reason": {"type": "success"}, "detail": None}),
        lambda: b.get(f"/training_runs/{model_id}"),
        lambda: b.get(f"/training_runs/{model_id}/checkpoints"),
        lambda: b.get(f"/sessions/{sid}"),
        lambda: _create_model(b, sid, seq=1),
    ]
    for probe in probes:
        r = probe()
        assert r.status_code == 404, r.text
    # Existence does not leak: an unknown id gets the same answer.
    assert b.post("/get_info", json={"model_id": "nope:train:0"}).json()["error"] == "not_found"
    assert b.get("/training_runs").json()["training_runs"] == []
    assert b.get("/sessions").json()["sessions"] == []
    assert a.get("/sessions").json()["sessions"] == [sid]
    # Tenant A's session still works.
    assert (
        a.post("/session_heartbeat", json={"session_id": sid, "type": "session_heartbeat"}).status_code == 200
    )


def test_finished_session_heartbeat_is_410(live_server: LiveServer, server_env: ServerEnv) -> None:
    c = _client(live_server, server_env.tenant_key("acme"))
    sid = _session(c)
    assert (
        c.post(f"/sessions/{sid}/finish", json={"reason": {"type": "success"}, "detail": None}).status_code
        == 200
    )
    r = c.post("/session_heartbeat", json={"session_id": sid, "type": "session_heartbeat"})
    assert r.status_code == 410 and r.json()["error"] == "session_finished"


def test_telemetry_is_accepted(live_server: LiveServer, server_env: ServerEnv) -> None:
    c = _client(live_server, server_env.tenant_key("acme"))
    body: dict[str, Any] = {
        "events": [
            {
                "event": "SESSION_START",
                "event_id": "e",
                "event_session_index": 0,
                "severity": "INFO",
                "timestamp": "2026-11-29T13:13:21.12Z",
            }
        ],
        "platform": "Linux",
        "sdk_version": "0.38.0",
        "session_id": "sessionless-x",
        "process_uuid": "u",
    }
    assert c.post("/telemetry", json=body).json() == {"status": "accepted"}


@pytest.mark.parametrize("limit", [1, 2])
def test_training_runs_pagination(live_server: LiveServer, server_env: ServerEnv, limit: int) -> None:
    c = _client(live_server, server_env.tenant_key("acme"))
    sid = _session(c)
    for seq in range(3):
        assert _create_model(c, sid, seq=seq).status_code == 200
    page = c.get("/training_runs", params={"limit": limit, "offset": 1, "access_scope": "owned"}).json()
    assert page["cursor"] == {"offset": 1, "limit": limit, "total_count": 3}
    assert len(page["training_runs"]) == min(limit, 2)


def test_queued_futures_survive_a_restart(
    start_server: Callable[..., LiveServer], server_env: ServerEnv
) -> None:
    # The first server process only accepts requests (no worker) and is stopped.
    first = start_server(run_worker=False, long_poll_seconds=0.2)
    key = server_env.tenant_key("acme")
    c = _client(first, key)
    created = _create_model(c, _session(c)).json()
    assert c.post("/retrieve_future", json={"request_id": created["request_id"]}).status_code == 408
    first.stop()
    # A fresh process over the same database picks the queued job up.
    second = start_server()
    done = _result(_client(second, key), created["request_id"])
    assert done.status_code == 200 and done.json()["model_id"] == created["model_id"]


def test_forward_backward_body_errors_are_400_with_body(
    live_server: LiveServer, server_env: ServerEnv
) -> None:
    c = _client(live_server, server_env.tenant_key("acme"))
    sid = _session(c)
    model_id = _create_model(c, sid).json()["model_id"]
    proto = {"content-type": "application/x-protobuf"}
    cases = [
        c.post("/forward_backward", content=b"\xff\xff\xff", headers=proto),
        c.post("/forward_backward", json={"model_id": model_id}),
        c.post("/forward_backward", content=b"x", headers=proto | {"content-encoding": "zstd"}),
        c.post("/optim_step", json={"model_id": model_id, "seq_id": 0, "adam_params": {}}),
        c.post("/optim_step", json={"model_id": model_id, "seq_id": 1, "adam_params": {"beta1": 2}}),
    ]
    assert [r.status_code for r in cases] == [400, 400, 400, 400, 422]
    assert all(r.json()["detail"] for r in cases)
    # Another tenant's model is invisible.
    other = _client(live_server, server_env.tenant_key("globex"))
    r = other.post("/optim_step", json={"model_id": model_id, "seq_id": 1, "adam_params": {}})
    assert r.status_code == 404
