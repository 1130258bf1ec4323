"""Wire models of the OpenAI-compatible inference API (completions, chat completions, models).

One definition for the server side (:mod:`tensafe.serving.api` validates request bodies with
these classes and builds every answer from them) and for tests and clients that want types.
The shapes follow OpenAI's API reference as the official ``openai`` Python SDK sends and
parses them, plus vLLM's sampling extensions (``top_k``, ``min_p``, ``repetition_penalty``,
``stop_token_ids``, ``ignore_eos``) sent through the SDK's ``extra_body``.

Requests are strict where OpenAI is strict: a field OpenAI does not define is refused
(``Unrecognized request argument supplied: NAME``, HTTP 400, ``param`` = the field), and
ranges are OpenAI's. A field OpenAI defines but this server does not implement is accepted
only at its neutral value (``null``, ``false``, an empty object); any other value is refused
with a message that names it (:data:`UNSUPPORTED_COMPLETION` / :data:`UNSUPPORTED_CHAT`).

Errors use OpenAI's shape, ``{"error": {"message", "type", "param", "code"}}``
(:class:`ErrorResponse`, :func:`error_body`).
"""

from __future__ import annotations

from typing import Any, Final, Literal

from pydantic import BaseModel, ConfigDict, Field, field_validator

__all__ = [
    "MAX_N",
    "MAX_STOP",
    "MAX_TOP_LOGPROBS",
    "UNSUPPORTED_CHAT",
    "UNSUPPORTED_COMPLETION",
    "ChatChoice",
    "ChatChoiceLogprobs",
    "ChatChunkChoice",
    "ChatCompletion",
    "ChatCompletionChunk",
    "ChatCompletionRequest",
    "ChatDelta",
    "ChatMessage",
    "ChatTokenLogprob",
    "ChatTopLogprob",
    "Completion",
    "CompletionChoice",
    "CompletionLogprobs",
    "CompletionRequest",
    "ContentPart",
    "ErrorDetail",
    "ErrorResponse",
    "Model",
    "ModelList",
    "ResponseMessage",
    "StreamOptions",
    "Usage",
    "error_body",
]

#: The most choices one request may ask for (``n``).
MAX_N: Final = 16
#: The most stop strings one request may give.
MAX_STOP: Final = 16
#: The most alternatives per token (``logprobs`` of completions, ``top_logprobs`` of chat).
MAX_TOP_LOGPROBS: Final = 20

_INT64 = 2**63 - 1


class _Request(BaseModel):
    """Unknown fields refused (OpenAI answers 400 ``Unrecognized request argument``)."""

    model_config = ConfigDict(extra="forbid", frozen=True, protected_namespaces=())


class _Response(BaseModel):
    model_config = ConfigDict(extra="ignore", protected_namespaces=())


class StreamOptions(_Request):
    """``stream_options``: ``include_usage`` adds a last chunk with ``usage`` and no choices."""

    include_usage: bool = False


class _Sampling(_Request):
    """The sampling fields completions and chat share (OpenAI's ranges; vLLM's extensions)."""

    model: str = Field(min_length=1, max_length=1024)
    temperature: float | None = Field(default=None, ge=0.0, le=2.0, allow_inf_nan=False)
    top_p: float | None = Field(default=None, gt=0.0, le=1.0, allow_inf_nan=False)
    n: int = Field(default=1, ge=1, le=MAX_N)
    stream: bool = False
    stream_options: StreamOptions | None = None
    stop: str | list[str] | None = None
    seed: int | None = Field(default=None, ge=-_INT64 - 1, le=_INT64)
    presence_penalty: float | None = Field(default=None, ge=-2.0, le=2.0, allow_inf_nan=False)
    frequency_penalty: float | None = Field(default=None, ge=-2.0, le=2.0, allow_inf_nan=False)
    user: str | None = Field(default=None, max_length=512)
    logit_bias: dict[str, float] | None = None
    # vLLM's extensions (the openai SDK sends them with extra_body=...).
    top_k: int | None = Field(default=None, ge=-1)
    min_p: float | None = Field(default=None, ge=0.0, le=1.0, allow_inf_nan=False)
    repetition_penalty: float | None = Field(default=None, gt=0.0, le=10.0, allow_inf_nan=False)
    stop_token_ids: list[int] | None = Field(default=None, max_length=64)
    ignore_eos: bool = False

    @field_validator("stop")
    @classmethod
    def _stops(cls, value: str | list[str] | None) -> str | list[str] | None:
        stops = [value] if isinstance(value, str) else (value or [])
        if len(stops) > MAX_STOP:
            raise ValueError(f"at most {MAX_STOP} stop sequences are accepted")
        if any(not s or len(s) > 1000 for s in stops):
            raise ValueError("stop sequences must be 1 to 1000 characters long")
        return value

    def stop_list(self) -> tuple[str, ...]:
        """``stop`` as a tuple (empty when absent)."""
        if self.stop is None:
            return ()
        return (self.stop,) if isinstance(self.stop, str) else tuple(self.stop)


class CompletionRequest(_Sampling):
    """``POST /v1/completions``: ``prompt`` is a string, token ids, or one list of either (a batch)."""

    prompt: str | list[str] | list[int] | list[list[int]]
    max_tokens: int | None = Field(default=16, ge=1)
    logprobs: int | None = Field(default=None, ge=0, le=MAX_TOP_LOGPROBS)
    echo: bool = False
    suffix: str | None = None
    best_of: int | None = Field(default=None, ge=1)


#: Fields of completions OpenAI defines that this server implements only at the neutral value.
UNSUPPORTED_COMPLETION: Final = ("echo", "suffix", "best_of", "logit_bias")


class ContentPart(_Request):
    """One part of a message's content; only ``text`` parts (a text-only model)."""

    type: str
    text: str | None = None
    model_config = ConfigDict(extra="allow", frozen=True)


class ChatMessage(_Request):
    """One message of ``messages``: ``system``, ``developer``, ``user`` or ``assistant``."""

    role: Literal["system", "developer", "user", "assistant", "tool", "function"]
    content: str | list[ContentPart] | None = None
    name: str | None = Field(default=None, max_length=256)
    # Fields of assistant and tool messages (tool calling is not supported: refused if set).
    tool_calls: list[dict[str, Any]] | None = None
    tool_call_id: str | None = None
    function_call: dict[str, Any] | None = None
    refusal: str | None = None


class ChatCompletionRequest(_Sampling):
    """``POST /v1/chat/completions``: the tokenizer's chat template renders ``messages``."""

    messages: list[ChatMessage] = Field(min_length=1)
    max_tokens: int | None = Field(default=None, ge=1)
    max_completion_tokens: int | None = Field(default=None, ge=1)
    logprobs: bool = False
    top_logprobs: int | None = Field(default=None, ge=0, le=MAX_TOP_LOGPROBS)
    # Defined by OpenAI, implemented only at the neutral value (see UNSUPPORTED_CHAT).
    tools: list[dict[str, Any]] | None = None
    tool_choice: str | dict[str, Any] | None = None
    parallel_tool_calls: bool | None = None
    functions: list[dict[str, Any]] | None = None
    function_call: str | dict[str, Any] | None = None
    response_format: dict[str, Any] | None = None
    audio: dict[str, Any] | None = None
    modalities: list[str] | None = None
    prediction: dict[str, Any] | None = None
    reasoning_effort: str | None = None
    service_tier: str | None = None
    store: bool | None = None
    metadata: dict[str, str] | None = None
    web_search_options: dict[str, Any] | None = None


#: Fields of chat completions OpenAI defines that this server implements only at the neutral value.
UNSUPPORTED_CHAT: Final = (
    "tools",
    "tool_choice",
    "functions",
    "function_call",
    "response_format",
    "audio",
    "modalities",
    "prediction",
    "reasoning_effort",
    "service_tier",
    "store",
    "web_search_options",
    "logit_bias",
)


# --------------------------------------------------------------------------- answers


class Usage(_Response):
    """Token counts: the prompt once, the completions of every choice together."""

    prompt_tokens: int
    completion_tokens: int
    total_tokens: int


class CompletionLogprobs(_Response):
    """Completions' legacy logprobs: per token its text, logprob, alternatives and text offset."""

    tokens: list[str] = Field(default_factory=list)
    token_logprobs: list[float | None] = Field(default_factory=list)
    top_logprobs: list[dict[str, float] | None] = Field(default_factory=list)
    text_offset: list[int] = Field(default_factory=list)


class CompletionChoice(_Response):
    """One choice of a completion (or its delta in a stream chunk)."""

    index: int
    text: str
    logprobs: CompletionLogprobs | None = None
    finish_reason: Literal["stop", "length"] | None = None


class Completion(_Response):
    """A completion, or one chunk of a streamed one (the same ``object``, as OpenAI does)."""

    id: str
    object: Literal["text_completion"] = "text_completion"
    created: int
    model: str
    choices: list[CompletionChoice]
    usage: Usage | None = None
    system_fingerprint: str | None = None


class ChatTopLogprob(_Response):
    """One alternative token."""

    token: str
    logprob: float
    bytes: list[int] | None = None


class ChatTokenLogprob(_Response):
    """One generated token with its alternatives."""

    token: str
    logprob: float
    bytes: list[int] | None = None
    top_logprobs: list[ChatTopLogprob] = Field(default_factory=list)


class ChatChoiceLogprobs(_Response):
    """``logprobs`` of a chat choice."""

    content: list[ChatTokenLogprob] | None = None
    refusal: list[ChatTokenLogprob] | None = None


class ResponseMessage(_Response):
    """The assistant's answer."""

    role: Literal["assistant"] = "assistant"
    content: str | None = None
    refusal: str | None = None


class ChatChoice(_Response):
    """One choice of a chat completion."""

    index: int
    message: ResponseMessage
    logprobs: ChatChoiceLogprobs | None = None
    finish_reason: Literal["stop", "length"] | None = None


class ChatCompletion(_Response):
    """A chat completion."""

    id: str
    object: Literal["chat.completion"] = "chat.completion"
    created: int
    model: str
    choices: list[ChatChoice]
    usage: Usage | None = None
    system_fingerprint: str | None = None


class ChatDelta(_Response):
    """What a stream chunk adds to a choice's message."""

    role: Literal["assistant"] | None = None
    content: str | None = None


class ChatChunkChoice(_Response):
    """One choice's delta in a stream chunk."""

    index: int
    delta: ChatDelta
    logprobs: ChatChoiceLogprobs | None = None
    finish_reason: Literal["stop", "length"] | None = None


class ChatCompletionChunk(_Response):
    """One server-sent event of a streamed chat completion."""

    id: str
    object: Literal["chat.completion.chunk"] = "chat.completion.chunk"
    created: int
    model: str
    choices: list[ChatChunkChoice]
    usage: Usage | None = None
    system_fingerprint: str | None = None


class Model(_Response):
    """One entry of ``GET /v1/models``; ``root`` is the base model (vLLM's extension)."""

    id: str
    object: Literal["model"] = "model"
    created: int
    owned_by: str
    root: str | None = None


class ModelList(_Response):
    """``GET /v1/models``."""

    object: Literal["list"] = "list"
    data: list[Model]


class ErrorDetail(_Response):
    """OpenAI's error object."""

    message: str
    type: str
    param: str | None = None
    code: str | None = None


class ErrorResponse(_Response):
    """OpenAI's error body: ``{"error": {"message", "type", "param", "code"}}``."""

    error: ErrorDetail


def error_body(
    message: str, *, type: str, param: str | None = None, code: str | None = None
) -> dict[str, Any]:
    """An OpenAI-shaped error body (every key present, ``null`` when unknown)."""
    return ErrorResponse(error=ErrorDetail(message=message, type=type, param=param, code=code)).model_dump()
