"""The OpenAI-compatible API driven by the pinned ``openai`` SDK against the bare router.

Greedy outputs are compared with an independent reference (transformers + PEFT with the same
adapter files, one full forward pass per token, ``conftest.reference_greedy``); logprobs agree
to 1e-3. Every test runs against each engine kind of ``conftest.ENGINE_KINDS``.
"""

from __future__ import annotations

import asyncio
import json
import logging
import pathlib
import threading
import time
from collections.abc import AsyncIterator
from typing import Any

import httpx
import openai
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from sqlalchemy import text

from serving.api.conftest import MODEL, Api, reference_greedy
from tensafe.db import create_engine_from_url
from tensafe.serving.api import openai_error_response
from tensafe.serving.engine import Engine, GenerationChunk, GenerationRequest, LoraAdapter
from tensafe.serving.errors import ServingOverloadedError

PROMPT = "The quick brown fox"
MESSAGES = [
    {"role": "system", "content": "You are terse."},
    {"role": "user", "content": "Name three colours."},
]


def _prompt_ids(engine: Engine, prompt: str) -> list[int]:
    return list(engine.tokenizer().encode(prompt))  # type: ignore[attr-defined]


def _chat_ids(engine: Engine, messages: list[dict[str, str]]) -> list[int]:
    tok: Any = engine.tokenizer()
    rendered = tok.apply_chat_template(messages, tokenize=False, add_generation_prompt=True)
    return list(tok.encode(rendered, add_special_tokens=False))


# --------------------------------------------------------------------------- models


def test_models_lists_the_base_model_and_only_the_callers_adapters(api: Api) -> None:
    acme = [m.id for m in api.client("acme").models.list()]
    globex = [m.id for m in api.client("globex").models.list()]
    assert acme == [MODEL, "acme-a", "acme-b"]
    assert globex == [MODEL, "globex-c"]
    client = api.client("acme")
    assert client.models.retrieve("acme-a").root == MODEL
    assert client.models.retrieve(MODEL).id == MODEL
    for hidden in ("globex-c", "no-such-model"):
        with pytest.raises(openai.NotFoundError):
            client.models.retrieve(hidden)


# --------------------------------------------------------------------------- greedy = reference


@pytest.mark.parametrize("model", [MODEL, "acme-a", "acme-b"])
def test_greedy_completion_equals_transformers_peft(
    api: Api, adapters: dict[str, LoraAdapter], model_dir: pathlib.Path, model: str
) -> None:
    ref = reference_greedy(
        model_dir, adapters.get(model), _prompt_ids(api.engine, PROMPT), 12, stop_at_eos=False
    )
    client = api.client("acme")
    answer = client.completions.create(
        model=model, prompt=PROMPT, max_tokens=12, temperature=0, extra_body={"ignore_eos": True}
    )
    assert answer.choices[0].text == ref.text
    assert answer.choices[0].finish_reason == "length"
    assert answer.model == model
    assert answer.usage is not None
    assert (answer.usage.prompt_tokens, answer.usage.completion_tokens) == (
        len(_prompt_ids(api.engine, PROMPT)),
        12,
    )
    streamed = client.completions.create(
        model=model, prompt=PROMPT, max_tokens=12, temperature=0, stream=True, extra_body={"ignore_eos": True}
    )
    chunks = list(streamed)
    assert "".join(c.choices[0].text for c in chunks if c.choices) == ref.text
    assert chunks[-1].choices[0].finish_reason == "length"


def test_a_token_id_prompt_equals_the_string_prompt(api: Api) -> None:
    client = api.client("acme")
    ids = _prompt_ids(api.engine, PROMPT)
    by_text = client.completions.create(model="acme-a", prompt=PROMPT, max_tokens=8, temperature=0)
    by_ids = client.completions.create(model="acme-a", prompt=ids, max_tokens=8, temperature=0)
    assert by_ids.choices[0].text == by_text.choices[0].text


@pytest.mark.parametrize("model", [MODEL, "acme-b"])
def test_greedy_chat_equals_transformers_peft_with_the_chat_template(
    api: Api, adapters: dict[str, LoraAdapter], model_dir: pathlib.Path, model: str
) -> None:
    ref = reference_greedy(model_dir, adapters.get(model), _chat_ids(api.engine, MESSAGES), 10)
    client = api.client("acme")
    answer = client.chat.completions.create(
        model=model, messages=MESSAGES, max_completion_tokens=10, temperature=0
    )  # type: ignore[arg-type]
    assert answer.choices[0].message.content == ref.text
    assert answer.choices[0].message.role == "assistant"
    assert answer.usage is not None and answer.usage.prompt_tokens == len(_chat_ids(api.engine, MESSAGES))
    stream = client.chat.completions.create(
        model=model,
        messages=MESSAGES,  # type: ignore[arg-type]
        max_tokens=10,
        temperature=0,
        stream=True,
        stream_options={"include_usage": True},
    )
    chunks = list(stream)
    assert chunks[0].choices[0].delta.role == "assistant"
    assert "".join(c.choices[0].delta.content or "" for c in chunks if c.choices) == ref.text
    # include_usage: a last chunk with usage and no choices; no usage before it.
    assert chunks[-1].choices == [] and chunks[-1].usage is not None
    assert chunks[-1].usage.completion_tokens == answer.usage.completion_tokens
    assert all(c.usage is None for c in chunks[:-1])


# --------------------------------------------------------------------------- logprobs


def test_completion_logprobs_agree_with_the_reference(
    api: Api, adapters: dict[str, LoraAdapter], model_dir: pathlib.Path
) -> None:
    ids = _prompt_ids(api.engine, PROMPT)
    ref = reference_greedy(model_dir, adapters["acme-a"], ids, 8, stop_at_eos=False, k=3)
    tok: Any = api.engine.tokenizer()
    for stream in (False, True):
        answer: Any = api.client("acme").completions.create(
            model="acme-a",
            prompt=PROMPT,
            max_tokens=8,
            temperature=0,
            logprobs=3,
            stream=stream,
            extra_body={"ignore_eos": True},
        )
        choices = [c.choices[0] for c in answer if c.choices] if stream else [answer.choices[0]]
        token_logprobs = [lp for c in choices if c.logprobs for lp in c.logprobs.token_logprobs]
        tokens = [t for c in choices if c.logprobs for t in c.logprobs.tokens]
        tops = [t for c in choices if c.logprobs for t in c.logprobs.top_logprobs]
        assert token_logprobs == pytest.approx(ref.logprobs, abs=1e-3)
        assert tokens == [tok.decode([t]) for t in ref.token_ids]
        for top, expected in zip(tops, ref.top, strict=True):
            want = {tok.decode([t]): lp for t, lp in expected.items()}
            assert set(top) == set(want)
            assert [top[t] for t in want] == pytest.approx(list(want.values()), abs=1e-3)


def test_chat_logprobs_and_top_logprobs_agree_with_the_reference(
    api: Api, adapters: dict[str, LoraAdapter], model_dir: pathlib.Path
) -> None:
    ref = reference_greedy(
        model_dir, adapters["acme-b"], _chat_ids(api.engine, MESSAGES), 6, stop_at_eos=False, k=2
    )
    tok: Any = api.engine.tokenizer()
    for stream in (False, True):
        answer: Any = api.client("acme").chat.completions.create(
            model="acme-b",
            messages=MESSAGES,  # type: ignore[arg-type]
            max_tokens=6,
            temperature=0,
            logprobs=True,
            top_logprobs=2,
            stream=stream,
            extra_body={"ignore_eos": True},
        )
        if stream:
            content = [
                e
                for c in answer
                if c.choices and c.choices[0].logprobs
                for e in c.choices[0].logprobs.content
            ]
        else:
            content = answer.choices[0].logprobs.content
        assert [c.logprob for c in content] == pytest.approx(ref.logprobs, abs=1e-3)
        assert [c.token for c in content] == [tok.decode([t]) for t in ref.token_ids]
        for entry, expected in zip(content, ref.top, strict=True):
            assert [t.logprob for t in entry.top_logprobs] == pytest.approx(
                sorted(expected.values(), reverse=True), abs=1e-3
            )
            assert entry.bytes == list(entry.token.encode())


# --------------------------------------------------------------------------- tenants and batches


def test_another_tenants_adapter_is_the_same_404_as_an_unknown_model(api: Api) -> None:
    client = api.client("acme")
    errors = []
    for model in ("globex-c", "no-such-adapter"):
        with pytest.raises(openai.NotFoundError) as info:
            client.completions.create(model=model, prompt=PROMPT, max_tokens=2)
        body: Any = info.value.body
        errors.append(
            (info.value.status_code, body["message"].replace(model, "M"), body["code"], body["param"])
        )
    assert errors[0] == errors[1] == (404, errors[0][1], "model_not_found", "model")
    assert api.registry.resident() == []  # nothing of globex was loaded for acme


def test_mixed_adapters_in_one_batch_each_get_their_own_output(
    api: Api, adapters: dict[str, LoraAdapter], model_dir: pathlib.Path
) -> None:
    ids = _prompt_ids(api.engine, PROMPT)
    jobs = [("acme", "acme-a"), ("acme", "acme-b"), ("globex", "globex-c"), ("acme", MODEL)] * 2
    expected = {
        model: reference_greedy(model_dir, adapters.get(model), ids, 10, stop_at_eos=False).text
        for _, model in jobs
    }
    assert len(set(expected.values())) == 4  # the adapters really differ

    async def run() -> list[str]:
        clients = {
            t: openai.AsyncOpenAI(base_url=f"{api.url}/v1", api_key=f"key-{t}", max_retries=0)
            for t in ("acme", "globex")
        }
        answers = await asyncio.gather(
            *(
                clients[tenant].completions.create(
                    model=model, prompt=PROMPT, max_tokens=10, temperature=0, extra_body={"ignore_eos": True}
                )
                for tenant, model in jobs
            )
        )
        return [a.choices[0].text for a in answers]

    assert asyncio.run(run()) == [expected[model] for _, model in jobs]


# --------------------------------------------------------------------------- sampling parameters


def test_n_and_seed_fan_out_reproducibly(api: Api) -> None:
    client = api.client("acme")
    kwargs: dict[str, Any] = {
        "model": "acme-a",
        "prompt": PROMPT,
        "max_tokens": 12,
        "temperature": 1.0,
        "n": 3,
        "seed": 7,
    }
    first = client.completions.create(**kwargs)
    again = client.completions.create(**kwargs)
    texts = [c.text for c in sorted(first.choices, key=lambda c: c.index)]
    assert [c.index for c in sorted(first.choices, key=lambda c: c.index)] == [0, 1, 2]
    assert texts == [c.text for c in sorted(again.choices, key=lambda c: c.index)]
    assert len(set(texts)) > 1  # seed + i per choice, not one seed for all
    assert first.usage is not None and first.usage.prompt_tokens == len(_prompt_ids(api.engine, PROMPT))
    streamed = client.completions.create(**kwargs, stream=True)
    by_index: dict[int, str] = {}
    for chunk in streamed:
        for choice in chunk.choices:
            by_index[choice.index] = by_index.get(choice.index, "") + choice.text
    assert [by_index[i] for i in range(3)] == texts


def test_stop_string_cuts_the_text_before_it(api: Api) -> None:
    client = api.client("acme")
    full = client.completions.create(
        model=MODEL, prompt=PROMPT, max_tokens=16, temperature=0, extra_body={"ignore_eos": True}
    )
    text = full.choices[0].text
    stop = text[len(text) // 2 : len(text) // 2 + 2]
    assert stop.strip()
    cut = client.completions.create(
        model=MODEL, prompt=PROMPT, max_tokens=16, temperature=0, stop=[stop], extra_body={"ignore_eos": True}
    )
    assert cut.choices[0].text == text[: text.index(stop)]
    assert cut.choices[0].finish_reason == "stop"


class RecordingEngine:
    """Delegates to the real engine and keeps every request it was given."""

    def __init__(self, engine: Engine) -> None:
        self._engine = engine
        self.requests: list[GenerationRequest] = []

    def __getattr__(self, name: str) -> Any:
        return getattr(self._engine, name)

    def generate(self, request: GenerationRequest) -> AsyncIterator[GenerationChunk]:
        self.requests.append(request)
        return self._engine.generate(request)


def test_every_sampling_parameter_reaches_the_engine(api: Api) -> None:
    spy = RecordingEngine(api.engine)
    api.engine_for[0] = spy  # type: ignore[assignment]
    try:
        answer = api.client("acme").completions.create(
            model="acme-a",
            prompt=PROMPT,
            max_tokens=8,
            temperature=0.8,
            top_p=0.9,
            presence_penalty=0.5,
            frequency_penalty=-0.5,
            stop=["zz", "yy"],
            seed=5,
            n=2,
            logprobs=2,
            extra_body={
                "top_k": 20,
                "min_p": 0.05,
                "repetition_penalty": 1.2,
                "stop_token_ids": [7],
                "ignore_eos": True,
            },
        )
        chat = api.client("acme").chat.completions.create(
            model=MODEL,
            messages=[{"role": "user", "content": "hi"}],
            max_completion_tokens=3,
            logprobs=True,
            top_logprobs=4,
            extra_body={"top_k": 0},
        )
    finally:
        api.engine_for[0] = api.engine
    assert len(answer.choices) == 2 and chat.choices[0].finish_reason in ("stop", "length")
    first, second, chat_request = spy.requests
    assert first.adapter_id == api.registry.resident()[-1].adapter_id and chat_request.adapter_id is None
    expected = {
        "max_tokens": 8,
        "temperature": 0.8,
        "top_p": 0.9,
        "top_k": 20,
        "min_p": 0.05,
        "repetition_penalty": 1.2,
        "presence_penalty": 0.5,
        "frequency_penalty": -0.5,
        "stop": ("zz", "yy"),
        "stop_token_ids": (7,),
        "ignore_eos": True,
        "logprobs": 2,
    }
    for name, value in expected.items():
        assert getattr(first.params, name) == getattr(second.params, name) == value, name
    assert (first.params.seed, second.params.seed) == (5, 6)  # seed + i per choice
    # Chat defaults: OpenAI's temperature 1, top_k 0 means no filter, top_logprobs -> k.
    assert (chat_request.params.temperature, chat_request.params.top_k, chat_request.params.logprobs) == (
        1.0,
        -1,
        4,
    )
    assert chat_request.params.max_tokens == 3 and chat_request.params.seed is None


# --------------------------------------------------------------------------- bad input


def _raw(
    api: Api, path: str, body: Any, *, key: str | None = "key-acme", raw: bytes | None = None
) -> httpx.Response:
    headers = {"Content-Type": "application/json"}
    if key is not None:
        headers["Authorization"] = f"Bearer {key}"
    content = raw if raw is not None else json.dumps(body).encode()
    return httpx.post(f"{api.url}/v1{path}", content=content, headers=headers, timeout=60)


def _assert_error(
    response: httpx.Response, status: int, *, param: str | None = None, code: str | None = None
) -> dict[str, Any]:
    assert response.status_code == status, response.text
    body = response.json()
    assert set(body) == {"error"} and set(body["error"]) == {"message", "type", "param", "code"}
    assert body["error"]["message"]
    if param is not None:
        assert body["error"]["param"] == param, body
    if code is not None:
        assert body["error"]["code"] == code, body
    return dict(body["error"])


def test_malformed_json_is_a_400_in_openais_shape(api: Api) -> None:
    _assert_error(_raw(api, "/completions", None, raw=b'{"model": "x", "prompt": '), 400, code="invalid_json")
    _assert_error(_raw(api, "/chat/completions", [1, 2]), 400, code="invalid_json")


@pytest.mark.parametrize(
    ("path", "body", "param"),
    [
        ("/completions", {"model": MODEL, "prompt": "x", "frobnicate": 1}, "frobnicate"),
        ("/completions", {"model": MODEL, "prompt": "x", "temperature": 3}, "temperature"),
        ("/completions", {"model": MODEL, "prompt": "x", "n": 0}, "n"),
        ("/completions", {"model": MODEL, "prompt": "x", "logprobs": 21}, "logprobs"),
        ("/completions", {"model": MODEL, "prompt": "x", "echo": True}, "echo"),
        ("/completions", {"model": MODEL, "prompt": "x", "suffix": "y"}, "suffix"),
        ("/completions", {"model": MODEL, "prompt": "x", "best_of": 3}, "best_of"),
        ("/completions", {"model": MODEL, "prompt": "x", "logit_bias": {"5": 1}}, "logit_bias"),
        ("/completions", {"model": MODEL, "prompt": [10**9]}, "prompt"),
        ("/completions", {"model": MODEL, "prompt": ""}, "prompt"),
        ("/completions", {"model": MODEL}, "prompt"),
        (
            "/completions",
            {"model": MODEL, "prompt": "x", "stream_options": {"include_usage": True}},
            "stream_options",
        ),
        (
            "/chat/completions",
            {"model": MODEL, "messages": [{"role": "user", "content": "x"}], "tools": [{"type": "function"}]},
            "tools",
        ),
        (
            "/chat/completions",
            {
                "model": MODEL,
                "messages": [{"role": "user", "content": "x"}],
                "response_format": {"type": "json_object"},
            },
            "response_format",
        ),
        (
            "/chat/completions",
            {"model": MODEL, "messages": [{"role": "user", "content": "x"}], "top_logprobs": 2},
            "top_logprobs",
        ),
        ("/chat/completions", {"model": MODEL, "messages": []}, "messages"),
        (
            "/chat/completions",
            {
                "model": MODEL,
                "messages": [{"role": "user", "content": [{"type": "image_url", "image_url": {"url": "x"}}]}],
            },
            "messages[0].content",
        ),
    ],
)
def test_bad_parameters_are_a_400_naming_the_parameter(
    api: Api, path: str, body: dict[str, Any], param: str
) -> None:
    error = _assert_error(_raw(api, path, body), 400, param=param)
    assert error["type"] == "invalid_request_error"


def test_an_unsupported_parameter_says_which(api: Api) -> None:
    with pytest.raises(openai.BadRequestError) as info:
        api.client("acme").chat.completions.create(
            model=MODEL,
            messages=[{"role": "user", "content": "hi"}],
            tools=[{"type": "function", "function": {"name": "f", "parameters": {}}}],
        )
    assert "'tools' is not supported" in info.value.message


def test_prompt_too_long_and_max_tokens_beyond_the_context_are_400s(api: Api) -> None:
    limit = api.engine.max_model_len
    long_prompt = [5] * limit
    _assert_error(
        _raw(api, "/completions", {"model": MODEL, "prompt": long_prompt}),
        400,
        param="prompt",
        code="context_length_exceeded",
    )
    _assert_error(
        _raw(api, "/completions", {"model": MODEL, "prompt": [5] * 10, "max_tokens": limit}),
        400,
        param="max_tokens",
        code="context_length_exceeded",
    )
    chat = {"model": MODEL, "messages": [{"role": "user", "content": "hi"}], "max_completion_tokens": limit}
    _assert_error(
        _raw(api, "/chat/completions", chat),
        400,
        param="max_completion_tokens",
        code="context_length_exceeded",
    )
    # Without max_tokens a chat completion may use the rest of the context.
    ok = _raw(
        api,
        "/chat/completions",
        {"model": MODEL, "messages": [{"role": "user", "content": "hi"}], "temperature": 0, "max_tokens": 2},
    )
    assert ok.status_code == 200


def test_missing_or_wrong_keys_are_401_and_unknown_models_404(api: Api) -> None:
    _assert_error(
        _raw(api, "/completions", {"model": MODEL, "prompt": "x"}, key=None), 401, code="invalid_api_key"
    )
    with pytest.raises(openai.AuthenticationError):
        openai.OpenAI(base_url=f"{api.url}/v1", api_key="wrong", max_retries=0).models.list()
    _assert_error(
        _raw(api, "/completions", {"model": "gpt-4o", "prompt": "x"}),
        404,
        param="model",
        code="model_not_found",
    )
    _assert_error(_raw(api, "/nope", {}), 404)
    wrong_method = httpx.get(f"{api.url}/v1/completions", headers={"Authorization": "Bearer key-acme"})
    _assert_error(wrong_method, 405)


def test_serving_errors_map_to_their_status() -> None:
    response = openai_error_response(ServingOverloadedError("busy"))
    assert response.status_code == 429
    assert json.loads(bytes(response.body))["error"]["type"] == "rate_limit_error"
    response = openai_error_response(RuntimeError("secret detail"))
    assert response.status_code == 500 and b"secret detail" not in bytes(response.body)


def test_a_dead_engine_is_a_503_and_the_server_keeps_serving(
    api: Api, model_dir: pathlib.Path, engine_kind: str, request: pytest.FixtureRequest
) -> None:
    from serving.api.conftest import ENGINE_STARTERS

    dead = ENGINE_STARTERS[engine_kind](request, model_dir)
    asyncio.run(dead.close())
    api.engine_for[0] = dead
    try:
        for stream in (False, True):
            body = {"model": MODEL, "prompt": "x", "max_tokens": 2, "stream": stream}
            _assert_error(_raw(api, "/completions", body), 503, code="engine_unavailable")
        chat = {"model": MODEL, "messages": [{"role": "user", "content": "x"}], "stream": True}
        _assert_error(_raw(api, "/chat/completions", chat), 503, code="engine_unavailable")
    finally:
        api.engine_for[0] = api.engine
    assert _raw(api, "/completions", {"model": MODEL, "prompt": "x", "max_tokens": 2}).status_code == 200


# --------------------------------------------------------------------------- disconnects


class CancelSpy:
    """Delegates to the real engine and records how each request's stream ended."""

    def __init__(self, engine: Engine) -> None:
        self._engine = engine
        self.ended: dict[str, str] = {}
        self.started = threading.Event()

    def __getattr__(self, name: str) -> Any:
        return getattr(self._engine, name)

    def generate(self, request: GenerationRequest) -> AsyncIterator[GenerationChunk]:
        return self._run(request)

    async def _run(self, request: GenerationRequest) -> AsyncIterator[GenerationChunk]:
        how = "closed early"
        try:
            async for chunk in self._engine.generate(request):
                self.started.set()
                yield chunk
                if chunk.finish_reason is not None:
                    how = chunk.finish_reason
        except asyncio.CancelledError:
            how = "cancelled"
            raise
        finally:
            self.ended[request.request_id] = how


@pytest.mark.parametrize("stream", [True, False])
def test_a_client_disconnect_cancels_the_engine_requests(api: Api, stream: bool) -> None:
    spy = CancelSpy(api.engine)
    api.engine_for[0] = spy  # type: ignore[assignment]
    body = {
        "model": "acme-a",
        "prompt": PROMPT,
        "max_tokens": 200,
        "n": 2,
        "stream": stream,
        "extra_body": None,
    }
    body.pop("extra_body")
    body["ignore_eos"] = True
    try:
        with httpx.Client(timeout=60) as client:
            if stream:
                with client.stream(
                    "POST",
                    f"{api.url}/v1/completions",
                    json=body,
                    headers={"Authorization": "Bearer key-acme"},
                ) as response:
                    lines = response.iter_lines()
                    assert next(line for line in lines if line.startswith("data: "))
            else:
                with pytest.raises(httpx.ReadTimeout):
                    client.post(
                        f"{api.url}/v1/completions",
                        json=body,
                        headers={"Authorization": "Bearer key-acme"},
                        timeout=0.5,
                    )
        deadline = time.monotonic() + 20
        while len(spy.ended) < 2 and time.monotonic() < deadline:
            time.sleep(0.05)
        assert len(spy.ended) == 2 and all(v in ("cancelled", "closed early") for v in spy.ended.values()), (
            spy.ended
        )
    finally:
        api.engine_for[0] = api.engine
    # The server keeps serving, and the adapter is free again (not held by the dead request).
    assert _raw(api, "/completions", {"model": "acme-a", "prompt": "x", "max_tokens": 2}).status_code == 200
    assert all(r.in_use == 0 for r in api.registry.resident())


# --------------------------------------------------------------------------- audit and logs


def test_prompts_and_completions_never_reach_the_audit_log_or_the_logs(
    api: Api, caplog: pytest.LogCaptureFixture
) -> None:
    canary = "CANARY-7f3a91 the patient's secret diagnosis"
    caplog.set_level(logging.DEBUG)
    client = api.client("acme")
    answer = client.completions.create(model="acme-b", prompt=canary, max_tokens=8, temperature=0)
    chat = client.chat.completions.create(
        model="acme-a", messages=[{"role": "user", "content": canary}], max_tokens=8
    )
    with pytest.raises(openai.NotFoundError):
        client.completions.create(model="globex-c", prompt=canary, max_tokens=2)
    outputs = [answer.choices[0].text, chat.choices[0].message.content or ""]
    db = create_engine_from_url(api.db_url)
    try:
        with db.connect() as conn:
            rows = [
                tuple(map(str, r))
                for r in conn.execute(text("SELECT action, resource, details FROM audit_records"))
            ]
    finally:
        db.dispose()
    actions = [r[0] for r in rows]
    assert actions.count("serving.adapter.loaded") == 2 and "serving.adapter.refused" in actions
    dump = "\n".join(" ".join(r) for r in rows) + "\n" + caplog.text
    assert "CANARY" not in dump
    for output in outputs:
        if len(output.strip()) >= 6:
            assert output not in dump


class GatedEngine(RecordingEngine):
    """The real engine, holding each request after its first chunk until ``release`` is set."""

    def __init__(self, engine: Engine) -> None:
        super().__init__(engine)
        self.release = threading.Event()

    def generate(self, request: GenerationRequest) -> AsyncIterator[GenerationChunk]:
        return self._gated(super().generate(request))

    async def _gated(self, chunks: AsyncIterator[GenerationChunk]) -> AsyncIterator[GenerationChunk]:
        first = True
        async for chunk in chunks:
            yield chunk
            while first and not self.release.is_set():
                await asyncio.sleep(0.01)
            first = False


def test_no_free_adapter_slot_is_a_429_and_the_slot_frees_when_the_stream_ends(api: Api) -> None:
    api.registry.max_resident = 1
    gate = GatedEngine(api.engine)
    api.engine_for[0] = gate  # type: ignore[assignment]
    headers = {"Authorization": "Bearer key-acme"}
    body = {"model": "acme-a", "prompt": PROMPT, "max_tokens": 8, "stream": True}
    try:
        with httpx.Client(timeout=60) as client:
            with client.stream("POST", f"{api.url}/v1/completions", json=body, headers=headers) as held:
                assert held.status_code == 200
                lines = held.iter_lines()  # kept: dropping the iterator would close the connection
                assert next(line for line in lines if line.startswith("data: "))
                busy = _raw(api, "/completions", {"model": "acme-b", "prompt": "x", "max_tokens": 2})
                error = _assert_error(busy, 429, code="rate_limit_exceeded")
                assert error["type"] == "rate_limit_error"
                with pytest.raises(openai.RateLimitError):
                    api.client("acme").completions.create(model="acme-b", prompt="x", max_tokens=2)
                gate.release.set()
                assert "data: [DONE]" in list(lines)
    finally:
        gate.release.set()
        api.engine_for[0] = api.engine
    deadline = time.monotonic() + 20
    while any(r.in_use for r in api.registry.resident()) and time.monotonic() < deadline:
        time.sleep(0.05)
    assert _raw(api, "/completions", {"model": "acme-b", "prompt": "x", "max_tokens": 2}).status_code == 200
    assert [r.name for r in api.registry.resident()] == ["acme-b"]


# --------------------------------------------------------------------------- fuzzing


_JSON = st.recursive(
    st.none()
    | st.booleans()
    | st.integers(-(2**70), 2**70)
    | st.floats(allow_nan=False)
    | st.text(max_size=8),
    lambda inner: st.lists(inner, max_size=3) | st.dictionaries(st.text(max_size=6), inner, max_size=3),
    max_leaves=6,
)
_FIELDS = [
    "prompt",
    "messages",
    "max_tokens",
    "max_completion_tokens",
    "temperature",
    "top_p",
    "n",
    "stop",
    "seed",
    "logprobs",
    "top_logprobs",
    "stream",
    "stream_options",
    "presence_penalty",
    "frequency_penalty",
    "top_k",
    "min_p",
    "repetition_penalty",
    "stop_token_ids",
    "ignore_eos",
    "echo",
    "suffix",
    "best_of",
    "logit_bias",
    "tools",
    "user",
    "response_format",
    "bogus",
]


@settings(max_examples=60, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(
    chat=st.booleans(),
    fields=st.dictionaries(st.sampled_from(_FIELDS), _JSON, max_size=5),
    model=st.sampled_from([MODEL, "acme-a", "globex-c", "nope", 3]),
)
def test_any_json_body_gets_an_answer_or_an_openai_shaped_4xx(
    api: Api, chat: bool, fields: dict[str, Any], model: Any
) -> None:
    body = {"model": model, **fields}
    if "max_tokens" not in body:
        body["max_tokens"] = 2
    response = _raw(api, "/chat/completions" if chat else "/completions", body)
    assert response.status_code in (200, 400, 404), response.text
    if response.status_code != 200:
        _assert_error(response, response.status_code)
    elif body.get("stream") is True:
        assert response.text.rstrip().endswith("data: [DONE]")
    else:
        assert response.json()["choices"]


class LeakyEngine(RecordingEngine):
    """Fails with an exception whose message quotes the prompt (as a careless library might)."""

    def generate(self, request: GenerationRequest) -> AsyncIterator[GenerationChunk]:
        text = self.tokenizer().decode(list(request.prompt_token_ids))  # type: ignore[attr-defined]
        raise RuntimeError(f"could not process {text!r}")


@pytest.mark.parametrize("stream", [False, True])
def test_an_unexpected_failure_is_a_500_that_quotes_nothing_of_the_request(
    api: Api, caplog: pytest.LogCaptureFixture, stream: bool
) -> None:
    caplog.set_level(logging.DEBUG)
    api.engine_for[0] = LeakyEngine(api.engine)  # type: ignore[assignment]
    try:
        body = {"model": MODEL, "prompt": "CANARY-0b9c secret", "max_tokens": 2, "stream": stream}
        response = _raw(api, "/completions", body)
    finally:
        api.engine_for[0] = api.engine
    error = _assert_error(response, 500)
    assert error["type"] == "server_error" and "RuntimeError" in error["message"]
    assert "CANARY" not in response.text
    assert "RuntimeError" in caplog.text and "CANARY" not in caplog.text
