"""The OpenAI-compatible API: ``GET /v1/models``, ``POST /v1/completions``, ``POST /v1/chat/completions``.

One implementation, mounted in two places: ``tensafe server`` at ``/oai/api/v1`` (prefix ``""``:
the ``openai`` SDK's ``base_url`` is ``…/oai/api/v1``) and ``tensafe serve`` at ``/v1``.
:func:`build_openai_router` returns the routes; :func:`build_openai_app` wraps them in an
application whose every answer, including unknown paths and unexpected failures, has OpenAI's
error shape. Neither knows about tenants' storage or API keys: the caller passes an
``authenticate`` coroutine (the request's :class:`~tensafe.serving.registry.ServingCaller`, or
:class:`~tensafe.serving.errors.UnauthenticatedError`) and an
:class:`~tensafe.serving.registry.AdapterRegistry` (which model names the caller may use).

What one request goes through, in order:

1. **Authentication** (``authenticate``): 401 before the body is read.
2. **The body**: JSON (else 400 ``invalid_json``), validated by :mod:`tensafe.protocol.openai`
   (400 naming the ``param``: an unknown field, a value out of range, a parameter OpenAI
   defines but this server does not implement at that value).
3. **The model** (``registry.acquire``): a base model or an adapter visible to the caller (404
   otherwise, the same for another tenant's adapter as for an unknown name), loaded on demand
   (429 when every adapter slot serves running requests).
4. **The prompt**: a string (tokenized with the model's tokenizer, special tokens added), token
   ids, or chat ``messages`` rendered with the tokenizer's chat template. A prompt that leaves
   no room in the context, or ``max_tokens`` beyond it, is a 400 naming ``prompt``/``messages``
   or ``max_tokens`` (code ``context_length_exceeded``).
5. **Generation**: ``n`` choices (and every prompt of a batch) are separate engine requests, run
   concurrently (they share the engine's batches); with a ``seed``, choice ``i`` uses
   ``(seed + i) mod 2**63``. Streaming answers are server-sent events (``data: {...}`` … ``data: [DONE]``);
   ``stream_options.include_usage`` adds a last chunk with ``usage`` and no choices.
6. **Disconnect**: when the client goes away (streaming or not) every engine request of the
   answer is cancelled, which frees its batch slot and KV cache.

Errors map one to one: :class:`~tensafe.serving.errors.InvalidGenerationRequestError` 400,
:class:`~tensafe.serving.errors.UnauthenticatedError` 401,
:class:`~tensafe.serving.errors.AdapterRefusedError` 403,
:class:`~tensafe.serving.errors.ModelNotFoundError` 404,
:class:`~tensafe.serving.errors.ServingOverloadedError` 429,
:class:`~tensafe.serving.errors.EngineUnavailableError` 503 (the engine died or the request was
aborted), anything else 500 naming only the exception's type. An error after a stream has
started is sent as one ``data: {"error": ...}`` event, then ``data: [DONE]``.

Prompts and completions are never logged: the log says which route failed and the exception's
type, nothing of the request's content.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import logging
import secrets
import time
import traceback
from collections.abc import AsyncIterator, Awaitable, Callable, Sequence
from dataclasses import dataclass, field
from typing import Any, Final, Literal

from fastapi import APIRouter, FastAPI, Request
from fastapi.responses import JSONResponse, Response, StreamingResponse
from pydantic import ValidationError
from starlette.exceptions import HTTPException as StarletteHTTPException
from starlette.types import Receive, Scope, Send

from tensafe.protocol import openai as oai
from tensafe.serving.engine import Engine, GenerationRequest, SamplingParams, TokenLogprob
from tensafe.serving.errors import (
    AdapterRefusedError,
    EngineUnavailableError,
    InvalidGenerationRequestError,
    ModelNotFoundError,
    ServingError,
    ServingOverloadedError,
    UnauthenticatedError,
)
from tensafe.serving.registry import AdapterRegistry, ServingCaller, Target

__all__ = ["Authenticate", "build_openai_app", "build_openai_router", "openai_error_response"]

_log = logging.getLogger("tensafe.serving.api")

#: Returns the authenticated caller of a request, or raises :class:`UnauthenticatedError`.
Authenticate = Callable[[Request], Awaitable[ServingCaller]]

_MAX_BODY_CHARS: Final = 16 * 1024 * 1024

#: ``(status, type, code)`` of each serving error, most specific first.
_ERRORS: Final[tuple[tuple[type[ServingError], int, str, str | None], ...]] = (
    (UnauthenticatedError, 401, "invalid_request_error", "invalid_api_key"),
    (InvalidGenerationRequestError, 400, "invalid_request_error", None),
    (AdapterRefusedError, 403, "permission_error", "adapter_refused"),
    (ModelNotFoundError, 404, "invalid_request_error", "model_not_found"),
    (ServingOverloadedError, 429, "rate_limit_error", "rate_limit_exceeded"),
    (EngineUnavailableError, 503, "server_error", "engine_unavailable"),
)


def _log_failure(route: str, exc: BaseException) -> None:
    """Log an unexpected failure: its type and where, never its message (it may quote the request)."""
    where = "".join(traceback.format_tb(exc.__traceback__))
    _log.error("%s failed with %s at:\n%s", route, type(exc).__name__, where)


def openai_error_response(exc: BaseException) -> JSONResponse:
    """The OpenAI-shaped answer to ``exc`` (a 500 naming only the type for a non-serving error)."""
    status, body = _error(exc)
    return JSONResponse(body, status)


def _error(exc: BaseException) -> tuple[int, dict[str, Any]]:
    for kind, status, type_, code in _ERRORS:
        if isinstance(exc, kind):
            param = getattr(exc, "param", None)
            if isinstance(exc, ModelNotFoundError):
                param = "model"
            code = getattr(exc, "code", None) or code
            return status, oai.error_body(str(exc), type=type_, param=param, code=code)
    return 500, oai.error_body(
        f"internal server error ({type(exc).__name__}); the server's log has the details",
        type="server_error",
    )


# --------------------------------------------------------------------------- parsing


def _invalid(message: str, param: str | None, code: str | None = None) -> InvalidGenerationRequestError:
    return InvalidGenerationRequestError(message, param=param, code=code)


def _validation_problem(exc: ValidationError) -> InvalidGenerationRequestError:
    first = exc.errors(include_url=False, include_input=False)[0]
    loc = [str(part) for part in first.get("loc", ())]
    # A union reports the member type it tried last ("prompt.str"); name the field itself.
    param = ".".join(
        p for p in loc if not p.startswith(("list[", "str", "int", "dict[")) and p != "function-after"
    )
    if first.get("type") == "extra_forbidden":
        return _invalid(f"Unrecognized request argument supplied: {param}", param)
    if first.get("type") == "missing":
        return _invalid(f"Missing required parameter: '{param}'.", param)
    message = str(first.get("msg", "invalid value"))
    return _invalid(f"Invalid value for '{param}': {message}.", param or None)


def _parse(raw: bytes, model: type[oai.CompletionRequest] | type[oai.ChatCompletionRequest]) -> Any:
    if len(raw) > _MAX_BODY_CHARS:
        raise _invalid(f"the request body is larger than {_MAX_BODY_CHARS} bytes", None)
    try:
        data = json.loads(raw)
    except (ValueError, UnicodeDecodeError):
        raise _invalid(
            "We could not parse the JSON body of your request. The API expects a JSON object "
            "(Content-Type: application/json).",
            None,
            "invalid_json",
        ) from None
    if not isinstance(data, dict):
        raise _invalid("The request body must be a JSON object.", None, "invalid_json")
    try:
        return model.model_validate(data)
    except ValidationError as exc:
        raise _validation_problem(exc) from None


def _neutral(value: Any, name: str) -> bool:
    if value is None or value is False or value == {} or value == []:
        return True
    if name == "response_format":
        return isinstance(value, dict) and value.get("type") == "text" and len(value) == 1
    if name == "modalities":
        return bool(value == ["text"])
    if name == "service_tier":
        return bool(value in ("auto", "default"))
    if name == "tool_choice":
        return bool(value == "none")
    return False


def _check_unsupported(body: Any, names: Sequence[str]) -> None:
    for name in names:
        if not _neutral(getattr(body, name), name):
            raise _invalid(f"'{name}' is not supported by this server; leave it unset.", name)


# --------------------------------------------------------------------------- one generation


@dataclass
class _Choice:
    """What one engine request produced so far."""

    index: int
    prompt_tokens: int
    text: list[str] = field(default_factory=list)
    token_ids: list[int] = field(default_factory=list)
    logprobs: list[TokenLogprob] = field(default_factory=list)
    finish_reason: Literal["stop", "length"] | None = None
    completion_tokens: int = 0


@dataclass(frozen=True)
class _Plan:
    """Everything to run after validation: the engine requests, one per choice."""

    target: Target
    requests: tuple[GenerationRequest, ...]
    prompt_tokens: int
    stream: bool
    include_usage: bool
    logprobs: int | None


def _sampling(body: Any, *, max_tokens: int, logprobs: int | None, seed: int | None) -> SamplingParams:
    top_k = -1 if body.top_k in (None, 0) else int(body.top_k)
    return SamplingParams(
        max_tokens=max_tokens,
        temperature=1.0 if body.temperature is None else float(body.temperature),
        top_p=1.0 if body.top_p is None else float(body.top_p),
        top_k=top_k,
        min_p=0.0 if body.min_p is None else float(body.min_p),
        repetition_penalty=1.0 if body.repetition_penalty is None else float(body.repetition_penalty),
        presence_penalty=0.0 if body.presence_penalty is None else float(body.presence_penalty),
        frequency_penalty=0.0 if body.frequency_penalty is None else float(body.frequency_penalty),
        stop=body.stop_list(),
        stop_token_ids=tuple(body.stop_token_ids or ()),
        ignore_eos=bool(body.ignore_eos),
        seed=seed,
        logprobs=logprobs,
    )


def _check_lengths(
    engine: Engine, prompt_len: int, max_tokens: int | None, *, prompt_param: str, max_param: str
) -> int:
    """The ``max_tokens`` to use; 400 when the prompt or ``max_tokens`` do not fit the context."""
    limit = engine.max_model_len
    if prompt_len == 0:
        raise _invalid("The prompt is empty.", prompt_param)
    if prompt_len >= limit:
        raise _invalid(
            f"This model's maximum context length is {limit} tokens. However, your prompt has "
            f"{prompt_len} tokens, which leaves no room for a completion. Please shorten it.",
            prompt_param,
            "context_length_exceeded",
        )
    if max_tokens is None:
        return limit - prompt_len
    if prompt_len + max_tokens > limit:
        raise _invalid(
            f"This model's maximum context length is {limit} tokens. However, you requested "
            f"{prompt_len + max_tokens} tokens ({prompt_len} in the prompt, {max_tokens} for the "
            f"completion). Please reduce '{max_param}' to at most {limit - prompt_len}.",
            max_param,
            "context_length_exceeded",
        )
    return max_tokens


def _token_ids(tokenizer: Any, ids: Sequence[int], *, param: str) -> list[int]:
    vocab = len(tokenizer)
    bad = next((t for t in ids if not 0 <= t < vocab), None)
    if bad is not None:
        raise _invalid(
            f"Token id {bad} is out of range for this model's vocabulary (0 to {vocab - 1}).", param
        )
    return list(ids)


def _completion_prompts(tokenizer: Any, prompt: Any) -> list[list[int]]:
    if isinstance(prompt, str):
        return [list(tokenizer.encode(prompt))]
    if not prompt:
        raise _invalid("The prompt is empty.", "prompt")
    if all(isinstance(p, int) for p in prompt):
        return [_token_ids(tokenizer, prompt, param="prompt")]
    if all(isinstance(p, str) for p in prompt):
        return [list(tokenizer.encode(p)) for p in prompt]
    return [_token_ids(tokenizer, p, param="prompt") for p in prompt]


def _message_text(message: oai.ChatMessage, index: int) -> str:
    if (
        message.role in ("tool", "function")
        or message.tool_calls
        or message.function_call
        or message.tool_call_id
    ):
        raise _invalid("Tool and function calling are not supported by this server.", f"messages[{index}]")
    content = message.content
    if content is None:
        return ""
    if isinstance(content, str):
        return content
    parts = []
    for part in content:
        if part.type != "text" or part.text is None:
            raise _invalid(
                f"Content parts of type '{part.type}' are not supported (this model takes text only).",
                f"messages[{index}].content",
            )
        parts.append(part.text)
    return "".join(parts)


def _chat_prompt(tokenizer: Any, messages: Sequence[oai.ChatMessage]) -> list[int]:
    rendered = [
        {"role": "system" if m.role == "developer" else m.role, "content": _message_text(m, i)}
        for i, m in enumerate(messages)
    ]
    if getattr(tokenizer, "chat_template", None) is None:
        raise _invalid("This model has no chat template; use /completions.", "messages")
    try:
        text = tokenizer.apply_chat_template(rendered, tokenize=False, add_generation_prompt=True)
    except Exception as exc:  # a template may raise on a conversation it does not accept
        raise _invalid(
            f"The chat template refused the messages ({type(exc).__name__}).", "messages"
        ) from None
    return list(tokenizer.encode(text, add_special_tokens=False))


# --------------------------------------------------------------------------- the routes


class _Api:
    def __init__(self, registry: AdapterRegistry, authenticate: Authenticate) -> None:
        self.registry = registry
        self.authenticate = authenticate

    async def models(self, request: Request) -> Response:
        try:
            caller = await self.authenticate(request)
            entries = await self.registry.list_models(caller)
        except Exception as exc:
            return self._fail("models", exc)
        now = int(time.time())
        data = [
            oai.Model(id=e.id, created=e.created or now, owned_by=e.owned_by, root=e.root) for e in entries
        ]
        return JSONResponse(oai.ModelList(data=data).model_dump())

    async def model(self, request: Request) -> Response:
        """``GET /models/{model}``: one model the caller may use (404 otherwise, as for a request)."""
        name = str(request.path_params.get("model", ""))
        try:
            caller = await self.authenticate(request)
            ref = await self.registry.resolve(caller, name)
        except Exception as exc:
            return self._fail("models", exc)
        entry = (
            oai.Model(id=name, created=int(time.time()), owned_by="tensafe", root=name)
            if ref is None
            else oai.Model(id=name, created=int(time.time()), owned_by=ref.tenant, root=ref.base_model)
        )
        return JSONResponse(entry.model_dump())

    async def completions(self, request: Request) -> Response:
        return await self._serve(request, chat=False)

    async def chat(self, request: Request) -> Response:
        return await self._serve(request, chat=True)

    @staticmethod
    def _fail(route: str, exc: BaseException) -> JSONResponse:
        if not isinstance(exc, ServingError):
            _log_failure(route, exc)
        return openai_error_response(exc)

    async def _serve(self, request: Request, *, chat: bool) -> Response:
        route = "chat/completions" if chat else "completions"
        target: Target | None = None
        try:
            caller = await self.authenticate(request)
            body = _parse(await request.body(), oai.ChatCompletionRequest if chat else oai.CompletionRequest)
            _check_unsupported(body, oai.UNSUPPORTED_CHAT if chat else oai.UNSUPPORTED_COMPLETION)
            if not chat and body.best_of not in (None, body.n):
                raise _invalid("'best_of' is not supported by this server; leave it unset.", "best_of")
            if chat and body.top_logprobs is not None and not body.logprobs:
                raise _invalid("'top_logprobs' requires 'logprobs' to be true.", "top_logprobs")
            if body.stream_options is not None and not body.stream:
                raise _invalid("'stream_options' is only allowed when 'stream' is true.", "stream_options")
            target = await self.registry.acquire(caller, body.model)
            plan = self._plan(target, body, chat=chat)
        except BaseException as exc:  # cancelled too: the adapter's use must end
            if target is not None:
                self.registry.release(target)
            if not isinstance(exc, Exception):
                raise
            return self._fail(route, exc)
        if plan.stream:
            # The engine requests start now; the answer's status waits for every first chunk,
            # so that a refusal by the engine (overload, a dead engine) is still an HTTP error.
            fanout = _Fanout(plan.target.engine, plan.requests)
            try:
                async with _until_disconnected(request) as gone:
                    await fanout.started(gone)
            except BaseException as exc:
                await fanout.aclose()
                self.registry.release(plan.target)
                if isinstance(exc, _Disconnected):
                    return Response(status_code=499)
                if isinstance(exc, Exception):
                    return self._fail(route, exc)
                raise

            async def cleanup() -> None:
                try:
                    await fanout.aclose()
                finally:
                    self.registry.release(plan.target)

            return _EventStream(self._stream(request, plan, fanout, chat=chat), cleanup=cleanup)
        try:
            return await self._complete(request, plan, chat=chat)
        except Exception as exc:
            return self._fail(route, exc)
        finally:
            self.registry.release(plan.target)

    def _plan(self, target: Target, body: Any, *, chat: bool) -> _Plan:
        engine = target.engine
        tokenizer = engine.tokenizer()
        if chat:
            prompts = [_chat_prompt(tokenizer, body.messages)]
            requested = (
                body.max_completion_tokens if body.max_completion_tokens is not None else body.max_tokens
            )
            max_param = "max_completion_tokens" if body.max_completion_tokens is not None else "max_tokens"
            logprobs = (body.top_logprobs or 0) if body.logprobs else None
            prompt_param = "messages"
        else:
            prompts = _completion_prompts(tokenizer, body.prompt)
            requested, max_param, logprobs, prompt_param = (
                body.max_tokens,
                "max_tokens",
                body.logprobs,
                "prompt",
            )
        rid = secrets.token_hex(12)
        requests = []
        for p_index, ids in enumerate(prompts):
            max_tokens = _check_lengths(
                engine, len(ids), requested, prompt_param=prompt_param, max_param=max_param
            )
            for j in range(body.n):
                index = p_index * body.n + j
                # Engines take non-negative seeds; OpenAI's are any 64-bit integer.
                seed = None if body.seed is None else (body.seed + index) % 2**63
                requests.append(
                    GenerationRequest(
                        request_id=f"{rid}-{index}",
                        prompt_token_ids=tuple(ids),
                        params=_sampling(body, max_tokens=max_tokens, logprobs=logprobs, seed=seed),
                        adapter_id=target.adapter_id,
                    )
                )
        include_usage = bool(body.stream_options and body.stream_options.include_usage)
        return _Plan(
            target=target,
            requests=tuple(requests),
            prompt_tokens=sum(len(ids) for ids in prompts),
            stream=bool(body.stream),
            include_usage=include_usage,
            logprobs=logprobs,
        )

    # -- non-streaming

    async def _complete(self, request: Request, plan: _Plan, *, chat: bool) -> Response:
        engine = plan.target.engine
        choices = [
            _Choice(index=i, prompt_tokens=len(r.prompt_token_ids)) for i, r in enumerate(plan.requests)
        ]

        async def run(choice: _Choice, req: GenerationRequest) -> None:
            async for chunk in engine.generate(req):
                _absorb(choice, chunk)

        async with _until_disconnected(request) as gone:
            tasks = [asyncio.ensure_future(run(c, r)) for c, r in zip(choices, plan.requests, strict=True)]
            try:
                await _first_of(asyncio.gather(*tasks), gone)
            finally:
                for task in tasks:
                    task.cancel()
                await asyncio.gather(*tasks, return_exceptions=True)
        if gone.done():
            return Response(status_code=499)  # nobody is listening; the engine requests are cancelled
        created, tokenizer = int(time.time()), engine.tokenizer()
        usage = _usage(plan, choices)
        model = plan.target.model
        if chat:
            chat_answer = oai.ChatCompletion(
                id=f"chatcmpl-{plan.requests[0].request_id.split('-')[0]}",
                created=created,
                model=model,
                choices=[
                    oai.ChatChoice(
                        index=c.index,
                        message=oai.ResponseMessage(content="".join(c.text)),
                        logprobs=_chat_logprobs(tokenizer, c.logprobs) if plan.logprobs is not None else None,
                        finish_reason=c.finish_reason,
                    )
                    for c in choices
                ],
                usage=usage,
            )
            return JSONResponse(chat_answer.model_dump())
        answer = oai.Completion(
            id=f"cmpl-{plan.requests[0].request_id.split('-')[0]}",
            created=created,
            model=model,
            choices=[
                oai.CompletionChoice(
                    index=c.index,
                    text="".join(c.text),
                    logprobs=_completion_logprobs(tokenizer, c.logprobs, plan.logprobs, 0)
                    if plan.logprobs is not None
                    else None,
                    finish_reason=c.finish_reason,
                )
                for c in choices
            ],
            usage=usage,
        )
        return JSONResponse(answer.model_dump())

    # -- streaming

    async def _stream(
        self, request: Request, plan: _Plan, fanout: _Fanout, *, chat: bool
    ) -> AsyncIterator[str]:
        engine = plan.target.engine
        tokenizer = engine.tokenizer()
        created, model = int(time.time()), plan.target.model
        rid = plan.requests[0].request_id.split("-")[0]
        response_id = f"chatcmpl-{rid}" if chat else f"cmpl-{rid}"
        choices = [
            _Choice(index=i, prompt_tokens=len(r.prompt_token_ids)) for i, r in enumerate(plan.requests)
        ]
        offsets = [0] * len(choices)
        usage_field: dict[str, Any] = {"usage": None} if plan.include_usage else {}
        async with _until_disconnected(request) as gone:
            try:
                if chat:
                    for c in choices:
                        first = oai.ChatCompletionChunk(
                            id=response_id,
                            created=created,
                            model=model,
                            choices=[
                                oai.ChatChunkChoice(
                                    index=c.index, delta=oai.ChatDelta(role="assistant", content="")
                                )
                            ],
                            **usage_field,
                        )
                        yield _event(first.model_dump(exclude_unset=True))
                running = len(plan.requests)
                while running:
                    index, item = await fanout.next(gone)
                    if item is None:
                        running -= 1
                        continue
                    if isinstance(item, BaseException):
                        raise item
                    choice = choices[index]
                    _absorb(choice, item)
                    logprobs = list(item.logprobs or ())
                    chunk: oai.Completion | oai.ChatCompletionChunk
                    if chat:
                        chunk = oai.ChatCompletionChunk(
                            id=response_id,
                            created=created,
                            model=model,
                            choices=[
                                oai.ChatChunkChoice(
                                    index=index,
                                    delta=oai.ChatDelta(content=item.text) if item.text else oai.ChatDelta(),
                                    logprobs=_chat_logprobs(tokenizer, logprobs)
                                    if plan.logprobs is not None
                                    else None,
                                    finish_reason=choice.finish_reason,
                                )
                            ],
                            **usage_field,
                        )
                    else:
                        chunk_logprobs = None
                        if plan.logprobs is not None:
                            chunk_logprobs = _completion_logprobs(
                                tokenizer, logprobs, plan.logprobs, offsets[index]
                            )
                            offsets[index] += sum(len(t) for t in chunk_logprobs.tokens)
                        chunk = oai.Completion(
                            id=response_id,
                            created=created,
                            model=model,
                            choices=[
                                oai.CompletionChoice(
                                    index=index,
                                    text=item.text,
                                    logprobs=chunk_logprobs,
                                    finish_reason=choice.finish_reason,
                                )
                            ],
                            **usage_field,
                        )
                    yield _event(chunk.model_dump(exclude_unset=True))
                if plan.include_usage:
                    usage = _usage(plan, choices)
                    last: oai.Completion | oai.ChatCompletionChunk
                    if chat:
                        last = oai.ChatCompletionChunk(
                            id=response_id, created=created, model=model, choices=[], usage=usage
                        )
                    else:
                        last = oai.Completion(
                            id=response_id, created=created, model=model, choices=[], usage=usage
                        )
                    yield _event(last.model_dump(exclude_unset=True))
            except _Disconnected:
                return
            except Exception as exc:
                if not isinstance(exc, ServingError):
                    _log_failure("a streamed answer", exc)
                yield _event(_error(exc)[1])
            finally:
                await fanout.aclose()
            yield "data: [DONE]\n\n"


class _Fanout:
    """The engine requests of one streamed answer, run concurrently; their items in arrival order.

    Each item is ``(index, chunk)``, ``(index, None)`` when request ``index`` ended, or
    ``(index, exception)`` when it failed.
    """

    def __init__(self, engine: Engine, requests: Sequence[GenerationRequest]) -> None:
        self._queue: asyncio.Queue[tuple[int, Any]] = asyncio.Queue()
        self._early: list[tuple[int, Any]] = []
        self._tasks = [asyncio.ensure_future(self._run(engine, i, r)) for i, r in enumerate(requests)]

    async def _run(self, engine: Engine, index: int, request: GenerationRequest) -> None:
        try:
            async for chunk in engine.generate(request):
                await self._queue.put((index, chunk))
        except Exception as exc:
            await self._queue.put((index, exc))
        else:
            await self._queue.put((index, None))

    async def started(self, gone: asyncio.Future[None]) -> None:
        """Wait until every request produced its first item; raise the first failure."""
        seen: set[int] = set()
        while len(seen) < len(self._tasks):
            index, item = await _first_of(self._queue.get(), gone)
            self._early.append((index, item))
            if isinstance(item, BaseException):
                raise item
            seen.add(index)

    async def next(self, gone: asyncio.Future[None]) -> tuple[int, Any]:
        """The next item (those :meth:`started` saw first)."""
        if self._early:
            return self._early.pop(0)
        item: tuple[int, Any] = await _first_of(self._queue.get(), gone)
        return item

    async def aclose(self) -> None:
        """Cancel every request still running (the engine frees their rows and caches)."""
        for task in self._tasks:
            task.cancel()
        await asyncio.gather(*self._tasks, return_exceptions=True)


def _absorb(choice: _Choice, chunk: Any) -> None:
    """Add one engine chunk to a choice; an aborted request is an error (503)."""
    if chunk.finish_reason == "abort":
        raise EngineUnavailableError(
            "the request was aborted by the engine (its adapter was unloaded or the engine is "
            "shutting down); retry"
        )
    choice.text.append(chunk.text)
    choice.token_ids.extend(chunk.token_ids)
    if chunk.logprobs:
        choice.logprobs.extend(chunk.logprobs)
    choice.completion_tokens = chunk.completion_tokens
    choice.prompt_tokens = chunk.prompt_tokens or choice.prompt_tokens
    if chunk.finish_reason is not None:
        choice.finish_reason = chunk.finish_reason


def _usage(plan: _Plan, choices: Sequence[_Choice]) -> oai.Usage:
    completion = sum(c.completion_tokens for c in choices)
    return oai.Usage(
        prompt_tokens=plan.prompt_tokens,
        completion_tokens=completion,
        total_tokens=plan.prompt_tokens + completion,
    )


def _decode(tokenizer: Any, token_id: int) -> str:
    return str(tokenizer.decode([token_id]))


def _completion_logprobs(
    tokenizer: Any, entries: Sequence[TokenLogprob], k: int | None, offset: int
) -> oai.CompletionLogprobs:
    """Completions' logprobs: the top ``k`` alternatives and the sampled token, as vLLM does."""
    tokens: list[str] = []
    token_logprobs: list[float | None] = []
    top_logprobs: list[dict[str, float] | None] = []
    text_offset: list[int] = []
    for entry in entries:
        token = _decode(tokenizer, entry.token_id)
        tokens.append(token)
        token_logprobs.append(entry.logprob)
        top = sorted(entry.top.items(), key=lambda kv: -kv[1])[: k or 0]
        alternatives = {_decode(tokenizer, t): lp for t, lp in top}
        alternatives.setdefault(token, entry.logprob)
        top_logprobs.append(alternatives)
        text_offset.append(offset)
        offset += len(token)
    return oai.CompletionLogprobs(
        tokens=tokens, token_logprobs=token_logprobs, top_logprobs=top_logprobs, text_offset=text_offset
    )


def _chat_logprobs(tokenizer: Any, entries: Sequence[TokenLogprob]) -> oai.ChatChoiceLogprobs:
    content = []
    for entry in entries:
        token = _decode(tokenizer, entry.token_id)
        top = sorted(entry.top.items(), key=lambda kv: -kv[1])
        content.append(
            oai.ChatTokenLogprob(
                token=token,
                logprob=entry.logprob,
                bytes=list(token.encode()),
                top_logprobs=[
                    oai.ChatTopLogprob(
                        token=(t := _decode(tokenizer, tid)), logprob=lp, bytes=list(t.encode())
                    )
                    for tid, lp in top
                ],
            )
        )
    return oai.ChatChoiceLogprobs(content=content)


def _event(payload: dict[str, Any]) -> str:
    return f"data: {json.dumps(payload, separators=(',', ':'), ensure_ascii=False)}\n\n"


# --------------------------------------------------------------------------- disconnects


class _Disconnected(Exception):
    """The client went away."""


@contextlib.asynccontextmanager
async def _until_disconnected(request: Request) -> AsyncIterator[asyncio.Future[None]]:
    """A future that completes when the client disconnects (watched while the block runs)."""
    gone: asyncio.Future[None] = asyncio.get_running_loop().create_future()

    async def watch() -> None:
        while True:
            message = await request.receive()
            if message["type"] == "http.disconnect":
                if not gone.done():
                    gone.set_result(None)
                return

    watcher = asyncio.ensure_future(watch())
    try:
        yield gone
    finally:
        watcher.cancel()
        with contextlib.suppress(asyncio.CancelledError, Exception):
            await watcher


async def _first_of(work: Awaitable[Any], gone: asyncio.Future[None]) -> Any:
    """The result of ``work``, unless the client disconnects first (then :class:`_Disconnected`)."""
    task = asyncio.ensure_future(work)
    try:
        done, _ = await asyncio.wait({task, gone}, return_when=asyncio.FIRST_COMPLETED)
    except BaseException:
        task.cancel()
        raise
    if task in done:
        return task.result()
    task.cancel()
    with contextlib.suppress(asyncio.CancelledError, Exception):
        await task
    raise _Disconnected


class _EventStream(StreamingResponse):
    """Server-sent events whose generator is always closed and whose engine requests are cancelled."""

    def __init__(self, events: AsyncIterator[str], *, cleanup: Callable[[], Awaitable[None]]) -> None:
        super().__init__(events, media_type="text/event-stream", headers={"Cache-Control": "no-cache"})
        self._events = events
        self._cleanup = cleanup

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        try:
            await super().__call__(scope, receive, send)
        finally:
            try:
                aclose = getattr(self._events, "aclose", None)
                if aclose is not None:
                    await aclose()
            finally:
                await self._cleanup()


# --------------------------------------------------------------------------- factories


def build_openai_router(
    *, registry: AdapterRegistry, authenticate: Authenticate, prefix: str = "/v1"
) -> APIRouter:
    """The OpenAI-compatible routes under ``prefix`` (``/v1`` standalone, ``""`` under a mount).

    Every answer of these routes, errors included, has OpenAI's shape whatever the enclosing
    application's error handlers (bodies are parsed by the routes, not by FastAPI).
    """
    api = _Api(registry, authenticate)
    router = APIRouter(prefix=prefix, tags=["openai"])
    router.add_api_route("/models", api.models, methods=["GET"], summary="List the models the caller may use")
    router.add_api_route(
        "/models/{model:path}", api.model, methods=["GET"], summary="Retrieve a model the caller may use"
    )
    router.add_api_route("/completions", api.completions, methods=["POST"], summary="Create a completion")
    router.add_api_route("/chat/completions", api.chat, methods=["POST"], summary="Create a chat completion")
    return router


async def _http_error(_request: Request, exc: Exception) -> JSONResponse:
    assert isinstance(exc, StarletteHTTPException)
    if exc.status_code == 404:
        message, type_ = "Unknown request URL. Please check the URL and method.", "invalid_request_error"
    elif exc.status_code == 405:
        message, type_ = "Method not allowed for this URL.", "invalid_request_error"
    else:
        message, type_ = str(exc.detail), "invalid_request_error"
    return JSONResponse(oai.error_body(message, type=type_), exc.status_code)


async def _unexpected(_request: Request, exc: Exception) -> JSONResponse:
    _log_failure("a request", exc)
    return openai_error_response(exc)


def build_openai_app(
    *,
    registry: AdapterRegistry,
    authenticate: Authenticate,
    prefix: str = "/v1",
    title: str = "TenSafe OpenAI-compatible API",
) -> FastAPI:
    """An application serving :func:`build_openai_router`; unknown paths, failures: OpenAI's shape."""
    app = FastAPI(title=title, docs_url=None, redoc_url=None, openapi_url=None)
    app.add_exception_handler(StarletteHTTPException, _http_error)
    app.add_exception_handler(Exception, _unexpected)
    app.include_router(build_openai_router(registry=registry, authenticate=authenticate, prefix=prefix))
    return app
