"""The inference engine interface shared by the ``transformers`` and ``vllm`` engines.

An engine serves one base model and any number of resident LoRA adapters. It knows nothing
of tenants, packages, HTTP or the OpenAI wire format: the API layer
(:mod:`tensafe.serving.api`) resolves a request's ``model`` to an adapter id through the
adapter registry, renders chat templates, fans out ``n`` and formats the answer; the engine
turns one :class:`GenerationRequest` (prompt token ids, one adapter or none, sampling
parameters) into a stream of :class:`GenerationChunk`.

Contract every engine keeps (the same API test suite runs against each):

* ``adapter_id=None`` is the base model; any other id must have been loaded with
  :meth:`Engine.load_adapter`, else :class:`~tensafe.serving.errors.ModelNotFoundError`.
* Requests for different adapters may share a batch; each gets its own adapter's output
  (greedy output equal to transformers + PEFT with that adapter alone).
* :meth:`Engine.generate` yields chunks in order; the last one has ``finish_reason``
  (``"stop"``: EOS, a stop string or stop token; ``"length"``: ``max_tokens`` or the
  context; ``"abort"``: cancelled). A stop string is not included in the text.
* Cancelling the iteration (the client disconnected) aborts the request and frees its
  batch slot and KV cache.
* ``logprobs`` are those of the model's distribution after the adapter (temperature 1, no
  filtering, as vLLM's default ``logprobs_mode``), natural log.
* Decrypted adapter weights live only in memory (or, for an engine in another process, in a
  private tmpfs directory removed once loaded); prompts and outputs are never logged.
"""

from __future__ import annotations

from collections.abc import AsyncIterator, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Literal, Protocol, runtime_checkable

__all__ = [
    "Engine",
    "FinishReason",
    "GenerationChunk",
    "GenerationRequest",
    "LoraAdapter",
    "SamplingParams",
    "TokenLogprob",
]

FinishReason = Literal["stop", "length", "abort"]


@dataclass(frozen=True, kw_only=True)
class SamplingParams:
    """Sampling parameters with vLLM's semantics (the OpenAI API layer validates ranges).

    ``temperature == 0`` is greedy. ``top_k == -1`` and ``top_p == 1`` disable those
    filters, ``min_p == 0`` too. ``seed``: the same request with the same seed gives the
    same tokens on the same engine. ``logprobs``: ``None`` for none, ``k >= 0`` for the
    sampled token's logprob plus the ``k`` most likely alternatives.
    """

    max_tokens: int
    temperature: float = 1.0
    top_p: float = 1.0
    top_k: int = -1
    min_p: float = 0.0
    repetition_penalty: float = 1.0
    presence_penalty: float = 0.0
    frequency_penalty: float = 0.0
    stop: tuple[str, ...] = ()
    stop_token_ids: tuple[int, ...] = ()
    ignore_eos: bool = False
    seed: int | None = None
    logprobs: int | None = None


@dataclass(frozen=True, kw_only=True)
class GenerationRequest:
    """One sequence to generate. ``request_id`` is unique among running requests."""

    request_id: str
    prompt_token_ids: Sequence[int]
    params: SamplingParams
    adapter_id: str | None = None


@dataclass(frozen=True)
class TokenLogprob:
    """One generated token: its logprob and the ``k`` most likely alternatives."""

    token_id: int
    logprob: float
    top: Mapping[int, float] = field(default_factory=dict)


@dataclass(frozen=True, kw_only=True)
class GenerationChunk:
    """New output since the previous chunk of the same request.

    ``text`` is the detokenized delta (stop strings removed); ``token_ids`` the new token
    ids and ``logprobs`` one entry per new token when requested. ``prompt_tokens`` and
    ``completion_tokens`` are running totals for ``usage``.
    """

    text: str
    token_ids: tuple[int, ...]
    logprobs: tuple[TokenLogprob, ...] | None
    finish_reason: FinishReason | None
    prompt_tokens: int
    completion_tokens: int


@dataclass(frozen=True, kw_only=True)
class LoraAdapter:
    """Decrypted PEFT LoRA adapter files, in memory (never written to a persistent disk).

    ``files`` holds ``adapter_config.json`` and ``adapter_model.safetensors`` as bytes;
    ``base_model_id`` must be the engine's base model.
    """

    adapter_id: str
    base_model_id: str
    files: Mapping[str, bytes]


@runtime_checkable
class Engine(Protocol):
    """One base model with resident LoRA adapters (see the module docstring)."""

    @property
    def model_id(self) -> str:
        """The base model's name (the ``model`` clients use for it)."""
        ...

    @property
    def max_model_len(self) -> int:
        """The context length: prompt plus generated tokens."""
        ...

    @property
    def max_lora_rank(self) -> int:
        """The largest LoRA rank :meth:`load_adapter` accepts."""
        ...

    def tokenizer(self) -> object:
        """The base model's Hugging Face tokenizer (chat template, encode, decode)."""
        ...

    async def load_adapter(self, adapter: LoraAdapter) -> None:
        """Make ``adapter.adapter_id`` usable; raise ``InvalidGenerationRequestError`` on a bad one."""
        ...

    async def unload_adapter(self, adapter_id: str) -> None:
        """Free the adapter; requests still running with it finish first or are aborted."""
        ...

    def resident_adapters(self) -> frozenset[str]:
        """Ids of the adapters currently loaded."""
        ...

    def generate(self, request: GenerationRequest) -> AsyncIterator[GenerationChunk]:
        """Stream the request's output (see the module docstring for the contract)."""
        ...

    async def close(self) -> None:
        """Abort every request, free the model, stop any worker thread or process."""
        ...
