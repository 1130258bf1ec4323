"""The OpenAI-compatible API mounted in ``tensafe server`` at ``/oai/api/v1``, driven by the ``openai`` SDK.

The server is the real one (``create_app`` on a migrated database, the encrypted store, API
keys, the request guard), served by uvicorn on loopback. Checkpoints are written the way the
worker writes ``sampler_weights`` (a ``training_checkpoints`` row and the PEFT files encrypted
under the tenant's DEK as ``<artifact>.0`` and ``<artifact>.1``).
"""

from __future__ import annotations

import asyncio
import datetime as dt
import json
import pathlib
import secrets
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass, replace
from typing import Any

import httpx
import openai
import pytest
from sqlalchemy import select

from server.conftest import TINY_MODEL, LiveServer, ServerEnv
from serving.api.conftest import reference_greedy
from tensafe.audit import verify_chain
from tensafe.audit.models import AuditRecordRow
from tensafe.db import utcnow
from tensafe.server import create_app
from tensafe.server.checkpoints import record_checkpoint
from tensafe.server.models import ServerSession, TrainingCheckpoint, TrainingModel
from tensafe.server.routers.openai import ADAPTER_FILES, OPENAI_MOUNT
from tensafe.serving.engine import LoraAdapter

PROMPT = "Once upon a time"


@dataclass
class Mounted:
    env: ServerEnv
    server: LiveServer
    keys: dict[str, str]

    @property
    def base_url(self) -> str:
        return f"{self.server.url}{OPENAI_MOUNT}"

    def client(self, tenant: str) -> openai.OpenAI:
        return openai.OpenAI(base_url=self.base_url, api_key=self.keys[tenant], max_retries=0, timeout=60)

    def save_sampler_weights(
        self,
        tenant: str,
        run: str,
        name: str,
        adapter: LoraAdapter,
        *,
        kind: str = "sampler_weights",
        state: str = "ready",
    ) -> str:
        """Store ``adapter`` as ``tinker://<run>/sampler_weights/<name>`` of ``tenant`` (as the worker)."""
        ref = "ckpt-" + secrets.token_hex(12)
        for i, file in enumerate(ADAPTER_FILES):
            self.env.store.put_bytes(tenant, f"{ref}.{i}", adapter.files[file], kind="checkpoint")
        now = utcnow()
        with self.env.sessions.begin() as s:
            session_id = f"sess-{run}"
            if s.get(ServerSession, session_id) is None:
                s.add(
                    ServerSession(
                        id=session_id,
                        tenant_id=tenant,
                        created_at=now,
                        last_heartbeat_at=now,
                        user_metadata="{}",
                        tags="[]",
                    )
                )
                s.add(
                    TrainingModel(
                        id=run,
                        tenant_id=tenant,
                        session_id=session_id,
                        model_seq_id=0,
                        base_model=TINY_MODEL,
                        lora_rank=4,
                        lora_config="{}",
                        optimizer_config="{}",
                        user_metadata="{}",
                        state=state,
                        created_at=now,
                        last_request_time=now,
                    )
                )
                s.flush()
            record_checkpoint(
                s,
                tenant=tenant,
                model_id=run,
                kind=kind,
                name=name,
                artifact_id=ref,
                size_bytes=sum(len(v) for v in adapter.files.values()),
                user_metadata="{}",
                ttl_seconds=None,
            )
        return f"tinker://{run}/{kind}/{name}"


@pytest.fixture
def mounted(server_env: ServerEnv, monkeypatch: pytest.MonkeyPatch) -> Iterator[Mounted]:
    monkeypatch.setenv("TS_SERVE_MAX_RESIDENT_ADAPTERS", "2")
    keys = {tenant: server_env.tenant_key(tenant) for tenant in ("acme", "globex")}
    settings = replace(server_env.settings, run_worker=False)
    server = LiveServer(create_app(settings, store=server_env.store, key_manager=server_env.keys)).start()
    try:
        yield Mounted(server_env, server, keys)
    finally:
        server.stop()


@pytest.fixture(scope="module")
def server_adapters(
    tiny_model_dir: pathlib.Path, make_lora_adapter: Callable[..., LoraAdapter]
) -> list[LoraAdapter]:
    return [
        make_lora_adapter(tiny_model_dir, rank=4, seed=101, base_model_id=TINY_MODEL),
        make_lora_adapter(tiny_model_dir, rank=8, seed=202, base_model_id=TINY_MODEL),
    ]


def _prompt_ids(tiny_model_dir: pathlib.Path, prompt: str) -> list[int]:
    from transformers import AutoTokenizer

    return list(AutoTokenizer.from_pretrained(str(tiny_model_dir), local_files_only=True).encode(prompt))


def test_the_openai_sdk_serves_the_callers_checkpoint_equal_to_transformers_peft(
    mounted: Mounted, server_adapters: list[LoraAdapter], tiny_model_dir: pathlib.Path
) -> None:
    path = mounted.save_sampler_weights("acme", "run-acme", "step-1", server_adapters[0])
    client = mounted.client("acme")
    assert [m.id for m in client.models.list()] == [TINY_MODEL, path]
    assert client.models.retrieve(path).id == path  # a tinker:// id, slashes and all
    ref = reference_greedy(
        tiny_model_dir, server_adapters[0], _prompt_ids(tiny_model_dir, PROMPT), 10, stop_at_eos=False
    )
    answer = client.completions.create(
        model=path, prompt=PROMPT, max_tokens=10, temperature=0, extra_body={"ignore_eos": True}
    )
    assert answer.choices[0].text == ref.text and answer.model == path
    stream = client.completions.create(
        model=path, prompt=PROMPT, max_tokens=10, temperature=0, stream=True, extra_body={"ignore_eos": True}
    )
    assert "".join(c.choices[0].text for c in stream if c.choices) == ref.text
    base = client.completions.create(
        model=TINY_MODEL, prompt=PROMPT, max_tokens=10, temperature=0, extra_body={"ignore_eos": True}
    )
    assert (
        base.choices[0].text
        == reference_greedy(
            tiny_model_dir, None, _prompt_ids(tiny_model_dir, PROMPT), 10, stop_at_eos=False
        ).text
    )
    chat = client.chat.completions.create(
        model=path, messages=[{"role": "user", "content": "hi"}], max_tokens=4
    )
    assert chat.choices[0].message.role == "assistant"


def test_another_tenants_checkpoint_is_the_same_404_as_an_unknown_one_and_both_tenants_are_served(
    mounted: Mounted, server_adapters: list[LoraAdapter], tiny_model_dir: pathlib.Path
) -> None:
    mine = mounted.save_sampler_weights("acme", "run-acme", "a", server_adapters[0])
    theirs = mounted.save_sampler_weights("globex", "run-globex", "g", server_adapters[1])
    acme = mounted.client("acme")
    answers = []
    for model in (theirs, "tinker://run-nope/sampler_weights/g", "tinker://not a path", "gpt-4o"):
        with pytest.raises(openai.NotFoundError) as info:
            acme.completions.create(model=model, prompt=PROMPT, max_tokens=2)
        body: Any = info.value.body
        answers.append((body["message"].replace(model, "M"), body["type"], body["code"], body["param"]))
    assert len(set(answers)) == 1, answers
    assert theirs not in [m.id for m in acme.models.list()]
    # Both tenants' adapters served at the same time, each with its own weights.
    ids = _prompt_ids(tiny_model_dir, PROMPT)
    expected = [reference_greedy(tiny_model_dir, a, ids, 8, stop_at_eos=False).text for a in server_adapters]

    async def both() -> list[str]:
        clients = [
            openai.AsyncOpenAI(base_url=mounted.base_url, api_key=mounted.keys[t], max_retries=0)
            for t in ("acme", "globex")
        ]
        results = await asyncio.gather(
            *(
                c.completions.create(
                    model=m, prompt=PROMPT, max_tokens=8, temperature=0, extra_body={"ignore_eos": True}
                )
                for c, m in ((clients[0], mine), (clients[1], theirs)) * 2
            )
        )
        return [r.choices[0].text for r in results]

    assert asyncio.run(both()) == expected * 2


def test_the_key_goes_as_bearer_or_x_api_key_and_refusals_have_openais_shape(mounted: Mounted) -> None:
    body = {"model": TINY_MODEL, "prompt": "x", "max_tokens": 1}
    url = f"{mounted.base_url}/completions"
    ok = httpx.post(url, json=body, headers={"X-API-Key": mounted.keys["acme"]}, timeout=60)
    assert ok.status_code == 200, ok.text
    for headers in ({}, {"Authorization": "Bearer tml-wrong"}, {"X-API-Key": "nope"}):
        refused = httpx.post(url, json=body, headers=headers, timeout=60)
        assert refused.status_code == 401
        assert set(refused.json()["error"]) == {"message", "type", "param", "code"}
        assert refused.json()["error"]["code"] == "invalid_api_key"
    two = httpx.post(
        url,
        json=body,
        headers={"X-API-Key": mounted.keys["acme"], "Authorization": f"Bearer {mounted.keys['globex']}"},
    )
    assert two.status_code == 401  # two different keys: refused, never one of them guessed
    with pytest.raises(openai.AuthenticationError):
        openai.OpenAI(base_url=mounted.base_url, api_key="tml-wrong", max_retries=0).models.list()
    bad_json = httpx.post(
        url,
        content=b"{",
        headers={"Authorization": f"Bearer {mounted.keys['acme']}", "Content-Type": "application/json"},
    )
    assert bad_json.status_code == 400 and bad_json.json()["error"]["code"] == "invalid_json"
    unknown = httpx.get(
        f"{mounted.base_url}/nope", headers={"Authorization": f"Bearer {mounted.keys['acme']}"}
    )
    assert unknown.status_code == 404 and "error" in unknown.json() and "message" in unknown.json()["error"]
    # Bearer is only for the OpenAI mount: the training API still wants X-API-Key.
    training = httpx.get(
        f"{mounted.server.url}/api/v1/training_runs",
        headers={"Authorization": f"Bearer {mounted.keys['acme']}"},
    )
    assert training.status_code == 401


def test_deleted_expired_and_resaved_checkpoints_are_never_served_from_memory(
    mounted: Mounted, server_adapters: list[LoraAdapter], tiny_model_dir: pathlib.Path
) -> None:
    client = mounted.client("acme")
    path = mounted.save_sampler_weights("acme", "run-acme", "s", server_adapters[0])
    first = client.completions.create(
        model=path, prompt=PROMPT, max_tokens=8, temperature=0, extra_body={"ignore_eos": True}
    )
    # Saved again under the same path with other weights: the new weights, at once.
    mounted.save_sampler_weights("acme", "run-acme", "s", server_adapters[1])
    second = client.completions.create(
        model=path, prompt=PROMPT, max_tokens=8, temperature=0, extra_body={"ignore_eos": True}
    )
    ids = _prompt_ids(tiny_model_dir, PROMPT)
    assert (
        first.choices[0].text
        == reference_greedy(tiny_model_dir, server_adapters[0], ids, 8, stop_at_eos=False).text
    )
    assert (
        second.choices[0].text
        == reference_greedy(tiny_model_dir, server_adapters[1], ids, 8, stop_at_eos=False).text
    )
    # Expired: a 404 although its weights are resident.
    with mounted.env.sessions.begin() as s:
        row = s.execute(select(TrainingCheckpoint).where(TrainingCheckpoint.name == "s")).scalar_one()
        row.expires_at = utcnow() - dt.timedelta(seconds=1)
    with pytest.raises(openai.NotFoundError):
        client.completions.create(model=path, prompt=PROMPT, max_tokens=2)
    # Deleted through the REST API: a 404 too.
    other = mounted.save_sampler_weights("acme", "run-acme", "t", server_adapters[0])
    client.completions.create(model=other, prompt=PROMPT, max_tokens=2)
    deleted = httpx.delete(
        f"{mounted.server.url}/api/v1/training_runs/run-acme/checkpoints/sampler_weights/t",
        headers={"X-API-Key": mounted.keys["acme"]},
    )
    assert deleted.status_code == 200, deleted.text
    with pytest.raises(openai.NotFoundError):
        client.completions.create(model=other, prompt=PROMPT, max_tokens=2)
    # The sweep unloads what may no longer be served.
    registry = mounted.server.app.state.openai.registry
    asyncio.run(registry.sweep())
    assert [r.name for r in registry.resident()] == []


def test_adapter_events_are_audited_in_the_signed_chain_without_prompts(
    mounted: Mounted, server_adapters: list[LoraAdapter]
) -> None:
    canary = "CANARY-5d1e the merger closes on friday"
    path = mounted.save_sampler_weights("acme", "run-acme", "a", server_adapters[0])
    theirs = mounted.save_sampler_weights("globex", "run-globex", "g", server_adapters[1])
    client = mounted.client("acme")
    client.completions.create(model=path, prompt=canary, max_tokens=4)
    with pytest.raises(openai.NotFoundError):
        client.completions.create(model=theirs, prompt=canary, max_tokens=4)
    with mounted.env.sessions() as s:
        rows = s.execute(
            select(
                AuditRecordRow.tenant_id,
                AuditRecordRow.action,
                AuditRecordRow.resource,
                AuditRecordRow.details,
            )
        ).all()
        report = verify_chain(
            s,
            tenant="acme",
            verifying_key=mounted.env.keys.deployment_signing_key().verifying_key(),
            checkpoint_every=mounted.env.settings.audit_checkpoint_every,
            allow_unsigned_tail=True,
        )
    serving = [(t, a, r) for t, a, r, _ in rows if a.startswith("serving.")]
    assert ("acme", "serving.adapter.loaded", f"adapter/{path}") in serving
    assert ("acme", "serving.adapter.refused", f"adapter/{theirs}") in serving
    assert not [
        row for row in serving if row[0] == "globex"
    ]  # the owner's chain does not learn of the attempt
    assert "CANARY" not in json.dumps([list(map(str, r)) for r in rows])
    assert report.length >= 2


def test_a_trained_checkpoint_is_served_as_the_training_servers_own_sampler_samples_it(
    start_server: Callable[..., LiveServer], server_env: ServerEnv, tiny_model_dir: pathlib.Path
) -> None:
    """End to end: train one step, save_weights_for_sampler, then the same greedy tokens from Tinker's sampler
    (an independent implementation in tensafe.training.runtime) and from the OpenAI mount."""
    from server.conftest import LOOSE
    from tensafe import client as ts
    from tensafe.client import types

    server = start_server(privacy=LOOSE)
    key = server_env.tenant_key("acme")
    service = ts.ServiceClient(base_url=server.url, api_key=key)
    try:
        # train_unembed=False: the transformers engine serves attention and MLP adapters only; an
        # adapter of lm_head (Tinker's default) is refused with a 403 that says so (tested below).
        training = service.create_lora_training_client(
            base_model=TINY_MODEL, rank=4, seed=3, train_unembed=False
        ).result(120)
        with_unembed = service.create_lora_training_client(base_model=TINY_MODEL, rank=4, seed=3).result(120)
        unembed_path = with_unembed.save_weights_for_sampler("u1").result(120).path
        tokens = [1, 17, 23, 42, 99, 7]
        datum = types.Datum(
            model_input=types.ModelInput.from_ints(tokens[:-1]), loss_fn_inputs={"target_tokens": tokens[1:]}
        )
        training.forward_backward([datum], "cross_entropy").result(120)
        training.optim_step(types.AdamParams(learning_rate=5e-2)).result(120)
        path = training.save_weights_for_sampler("w1").result(120).path
        assert path is not None
        prompt = _prompt_ids(tiny_model_dir, PROMPT)
        sampler = service.create_sampling_client(model_path=path).result(120)
        params = types.SamplingParams(max_tokens=8, temperature=0.0, stop=[])
        (seq,) = sampler.sample(types.ModelInput.from_ints(prompt), 1, params).result(timeout=120).sequences
    finally:
        service.close()
    client = openai.OpenAI(base_url=f"{server.url}{OPENAI_MOUNT}", api_key=key, max_retries=0, timeout=60)
    answer = client.completions.create(model=path, prompt=prompt, max_tokens=8, temperature=0, logprobs=0)
    choice = answer.choices[0]
    assert choice.logprobs is not None and choice.logprobs.token_logprobs is not None
    n = min(len(seq.tokens), len(choice.logprobs.token_logprobs))
    assert n >= 1
    tok: Any = __import__("transformers").AutoTokenizer.from_pretrained(
        str(tiny_model_dir), local_files_only=True
    )
    assert choice.logprobs.tokens[:n] == [tok.decode([t]) for t in seq.tokens[:n]]
    assert seq.logprobs is not None
    assert choice.logprobs.token_logprobs[:n] == pytest.approx(list(seq.logprobs[:n]), abs=1e-3)
    with pytest.raises(openai.PermissionDeniedError, match="lm_head"):
        client.completions.create(model=str(unembed_path), prompt=prompt, max_tokens=2)
    # The base model answers differently: the trained adapter is applied.
    base = client.completions.create(model=TINY_MODEL, prompt=prompt, max_tokens=8, temperature=0, logprobs=0)
    assert base.choices[0].logprobs is not None
    assert base.choices[0].logprobs.token_logprobs != choice.logprobs.token_logprobs


def test_an_oversized_body_is_refused_before_it_is_read_in_openais_shape(mounted: Mounted) -> None:
    import socket

    with socket.create_connection(("127.0.0.1", mounted.server.port), timeout=30) as sock:
        sock.sendall(
            (
                f"POST {OPENAI_MOUNT}/completions HTTP/1.1\r\nHost: 127.0.0.1\r\n"
                f"Authorization: Bearer {mounted.keys['acme']}\r\nContent-Type: application/json\r\n"
                "Content-Length: 999999999\r\n\r\n"
            ).encode()
        )
        raw = b""
        while b"\r\n\r\n" not in raw or not raw.rstrip().endswith(b"}"):
            data = sock.recv(65536)
            if not data:
                break
            raw += data
    head, _, payload = raw.partition(b"\r\n\r\n")
    assert head.startswith(b"HTTP/1.1 413")
    assert json.loads(payload)["error"]["code"] == "payload_too_large"


def test_a_stream_dropped_by_the_client_ends_the_adapters_use_through_the_guard(
    mounted: Mounted, server_adapters: list[LoraAdapter]
) -> None:
    path = mounted.save_sampler_weights("acme", "run-acme", "s", server_adapters[0])
    body = {"model": path, "prompt": PROMPT, "max_tokens": 400, "stream": True, "ignore_eos": True}
    headers = {"Authorization": f"Bearer {mounted.keys['acme']}"}
    registry = mounted.server.app.state.openai.registry
    with httpx.Client(timeout=60) as client:
        with client.stream("POST", f"{mounted.base_url}/completions", json=body, headers=headers) as response:
            assert response.status_code == 200
            lines = response.iter_lines()
            assert next(line for line in lines if line.startswith("data: "))
    deadline = time.monotonic() + 20
    while registry.resident()[0].in_use and time.monotonic() < deadline:
        time.sleep(0.05)
    assert [r.in_use for r in registry.resident()] == [0]
    # The server keeps serving.
    again = mounted.client("acme").completions.create(model=path, prompt=PROMPT, max_tokens=2)
    assert again.choices[0].text is not None


def test_an_uploaded_adapter_is_served_and_other_checkpoint_kinds_are_a_400(
    mounted: Mounted, server_adapters: list[LoraAdapter], tiny_model_dir: pathlib.Path
) -> None:
    client = mounted.client("acme")
    uploaded = mounted.save_sampler_weights(
        "acme", "run-up", "byo", server_adapters[1], kind="external_weights", state="uploaded"
    )
    answer = client.completions.create(
        model=uploaded, prompt=PROMPT, max_tokens=6, temperature=0, extra_body={"ignore_eos": True}
    )
    ids = _prompt_ids(tiny_model_dir, PROMPT)
    assert (
        answer.choices[0].text
        == reference_greedy(tiny_model_dir, server_adapters[1], ids, 6, stop_at_eos=False).text
    )
    for kind in ("weights", "external_weights"):  # a training state, an export: not servable adapters
        path = mounted.save_sampler_weights("acme", "run-acme", f"x-{kind}", server_adapters[0], kind=kind)
        with pytest.raises(openai.BadRequestError) as info:
            client.completions.create(model=path, prompt=PROMPT, max_tokens=2)
        body: Any = info.value.body
        assert body["param"] == "model" and "sampler_weights" in body["message"]


def test_the_mount_alone_authenticates_the_same_keys_itself(server_env: ServerEnv) -> None:
    from serving.api.conftest import Uvicorn
    from tensafe.server.routers.openai import build_openai_mount
    from tensafe.server.services import Services

    key = server_env.tenant_key("acme")
    services = Services(
        sessions=server_env.sessions,
        store=server_env.store,
        signer=None,
        checkpoint_every=None,
        catalog=server_env.settings.catalog,
    )
    mount = build_openai_mount(services, server_env.settings.catalog, max_resident=1)
    with Uvicorn(mount.app) as server:
        for headers in ({"Authorization": f"Bearer {key}"}, {"X-API-Key": key}):
            listed = httpx.get(f"{server.url}/models", headers=headers, timeout=30)
            assert listed.status_code == 200 and [m["id"] for m in listed.json()["data"]] == [TINY_MODEL]
        for headers in ({}, {"Authorization": "Bearer tml-wrong"}):
            refused = httpx.get(f"{server.url}/models", headers=headers, timeout=30)
            assert refused.status_code == 401 and refused.json()["error"]["code"] == "invalid_api_key"
    asyncio.run(mount.aclose())
