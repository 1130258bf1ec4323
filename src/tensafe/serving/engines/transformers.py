"""The ``transformers`` engine: continuous batching and per-row multi-LoRA on CPU, in process.

:class:`TransformersEngine` implements :class:`~tensafe.serving.engine.Engine` on a Hugging
Face causal language model loaded through :mod:`tensafe.training.models` (registered models
and local directories only: nothing is downloaded).

Threads. One scheduler thread owns the model, the KV cache and the adapter slots and runs
every forward pass; the asyncio side never touches torch. :meth:`TransformersEngine.generate`
checks the request, puts it on the waiting queue (under one lock, with a condition the
scheduler sleeps on) and awaits its own ``asyncio.Queue``; the scheduler hands each chunk to
the consumer's event loop with ``call_soon_threadsafe``. The engine is bound to no event
loop: each request's chunks go to the loop that called ``generate``.

Continuous batching. Each scheduler iteration (1) drops cancelled requests, (2) admits
waiting requests, in order, while fewer than ``max_num_seqs`` run and a LoRA slot is
available for their adapter (a request whose adapter needs a slot that is not free waits;
the ones behind it may go first), (3) prefills the newcomers (prompts of equal length
together, with no padding) and samples their first token, and (4) runs one batched decode
step for every running request. The KV cache is one left-padded buffer per layer
(:mod:`._kvcache`): rows are appended on admission and dropped on completion, and each row
gets its own position ids. Beyond ``max_queued`` waiting requests, :meth:`generate` raises
:class:`~tensafe.serving.errors.ServingOverloadedError`.

Multi-LoRA. Resident adapters (:meth:`load_adapter`, checked by :mod:`._lora` and kept in
memory) are copied into one of ``max_loras`` slots when a request needs them; the attention and
MLP projections add, for each batch row, its own slot's low-rank update (rank zero-padded to
``max_lora_rank``), so requests for different adapters and the base model share a batch.
:meth:`unload_adapter` refuses new requests for the adapter at once; requests already
running finish with it, then its slot is zeroed.

Sampling follows vLLM (:mod:`._sampling`); text is detokenized incrementally with stop
strings cut out (:mod:`._detok`). A request stops with ``"stop"`` on EOS (unless
``ignore_eos``), a stop token or a stop string, with ``"length"`` after ``max_tokens`` or at
``max_model_len``, and with ``"abort"`` when the engine closes. Closing the async iterator
(the client disconnected) aborts the request: its row, KV cache and slot reference are freed
before the next step.

Prompts and outputs are never logged; the log names request counts and adapter ids only.
"""

from __future__ import annotations

import asyncio
import logging
import math
import secrets
import threading
from collections import deque
from collections.abc import AsyncIterator, Sequence
from dataclasses import dataclass, field
from typing import Any

import torch

from tensafe.serving.engine import (
    FinishReason,
    GenerationChunk,
    GenerationRequest,
    LoraAdapter,
    SamplingParams,
    TokenLogprob,
)
from tensafe.serving.engines._detok import Detokenizer
from tensafe.serving.engines._kvcache import BatchKVCache
from tensafe.serving.engines._lora import LoraBank, ParsedAdapter, parse_adapter
from tensafe.serving.engines._sampling import RowSampler, sample_batch
from tensafe.serving.errors import (
    EngineUnavailableError,
    InvalidGenerationRequestError,
    ModelNotFoundError,
    ServingOverloadedError,
)

__all__ = ["MAX_LOGPROBS", "TransformersEngine"]

_log = logging.getLogger(__name__)

#: Most ``logprobs`` alternatives a request may ask for (vLLM's default ``max_logprobs``).
MAX_LOGPROBS = 20


@dataclass(eq=False)
class _Seq:
    """One request, from submission to its last chunk."""

    request: GenerationRequest
    loop: asyncio.AbstractEventLoop
    out: asyncio.Queue[GenerationChunk | BaseException]
    adapter: ParsedAdapter | None
    sampler: RowSampler
    detok: Detokenizer
    prompt: list[int]
    output: list[int] = field(default_factory=list)
    slot: int = 0
    cancelled: bool = False
    done: bool = False


def _check_params(p: SamplingParams, vocab_size: int) -> None:
    def bad(param: str, message: str) -> InvalidGenerationRequestError:
        return InvalidGenerationRequestError(message, param=param)

    if isinstance(p.max_tokens, bool) or not isinstance(p.max_tokens, int) or p.max_tokens < 1:
        raise bad("max_tokens", "max_tokens must be an integer >= 1")
    checks: tuple[tuple[str, float, bool, str], ...] = (
        ("temperature", p.temperature, p.temperature >= 0, "temperature must be >= 0"),
        ("top_p", p.top_p, 0 < p.top_p <= 1, "top_p must be in (0, 1]"),
        ("min_p", p.min_p, 0 <= p.min_p <= 1, "min_p must be in [0, 1]"),
        (
            "repetition_penalty",
            p.repetition_penalty,
            p.repetition_penalty > 0,
            "repetition_penalty must be > 0",
        ),
        (
            "presence_penalty",
            p.presence_penalty,
            -2 <= p.presence_penalty <= 2,
            "presence_penalty must be in [-2, 2]",
        ),
        (
            "frequency_penalty",
            p.frequency_penalty,
            -2 <= p.frequency_penalty <= 2,
            "frequency_penalty must be in [-2, 2]",
        ),
    )
    for name, value, ok, message in checks:
        if not math.isfinite(value) or not ok:
            raise bad(name, message)
    if isinstance(p.top_k, bool) or not isinstance(p.top_k, int) or p.top_k < -1:
        raise bad("top_k", "top_k must be -1 or 0 (off) or a positive integer")
    if p.logprobs is not None and (
        isinstance(p.logprobs, bool) or not isinstance(p.logprobs, int) or not 0 <= p.logprobs <= MAX_LOGPROBS
    ):
        raise bad("logprobs", f"logprobs must be an integer in [0, {MAX_LOGPROBS}]")
    if not all(isinstance(s, str) for s in p.stop):
        raise bad("stop", "stop must be strings")
    if not all(
        isinstance(t, int) and not isinstance(t, bool) and 0 <= t < vocab_size for t in p.stop_token_ids
    ):
        raise bad("stop_token_ids", f"stop_token_ids must be token ids in [0, {vocab_size})")
    if p.seed is not None and (isinstance(p.seed, bool) or not isinstance(p.seed, int) or p.seed < 0):
        raise bad("seed", "seed must be a non-negative integer")


def _check_model(model: Any) -> None:
    config = model.config
    layer_types = getattr(config, "layer_types", None)
    sliding = getattr(config, "sliding_window", None)
    use_sliding = getattr(config, "use_sliding_window", sliding is not None)
    if (layer_types is not None and any(t != "full_attention" for t in layer_types)) or (
        sliding is not None and use_sliding
    ):
        raise EngineUnavailableError(
            f"{config.model_type} models with sliding-window or linear attention layers are not supported by "
            "the transformers engine (full-attention decoders such as Llama only); use --engine vllm"
        )
    if not getattr(config, "is_decoder", True) or getattr(config, "is_encoder_decoder", False):
        raise EngineUnavailableError("the transformers engine serves decoder-only causal language models")


class TransformersEngine:
    """An :class:`~tensafe.serving.engine.Engine` on Hugging Face ``transformers`` (see the module docstring).

    Create it with :meth:`start`; :meth:`close` it when done.
    """

    def __init__(
        self,
        *,
        model: Any,
        tokenizer: Any,
        model_id: str,
        base_names: frozenset[str],
        max_loras: int,
        max_lora_rank: int,
        max_num_seqs: int,
        max_model_len: int,
        max_queued: int,
    ) -> None:
        """Use :meth:`start` (this wraps an already loaded model and starts the scheduler)."""
        self._model = model
        self._tokenizer = tokenizer
        self._model_id = model_id
        self._base_names = base_names
        self._max_loras = max_loras
        self._max_lora_rank = max_lora_rank
        self._max_num_seqs = max_num_seqs
        self._max_model_len = max_model_len
        self._max_queued = max_queued
        self._vocab_size = int(model.get_output_embeddings().weight.shape[0])
        self._num_layers = int(model.config.num_hidden_layers)
        eos: set[int] = set()
        for source in (
            getattr(tokenizer, "eos_token_id", None),
            getattr(model.generation_config, "eos_token_id", None),
        ):
            if isinstance(source, int):
                eos.add(source)
            elif isinstance(source, list | tuple):
                eos.update(int(t) for t in source)
        self._eos = frozenset(eos)
        self._bank = LoraBank(model, slots=max_loras, max_rank=max_lora_rank)
        if not self._bank.modules:
            raise EngineUnavailableError(
                f"{model_id}: no attention or MLP projection to adapt was found; the transformers engine "
                "serves Llama-style decoders"
            )
        self._shapes = self._bank.shapes()
        # Shared state (under self._cond).
        self._cond = threading.Condition()
        self._waiting: deque[_Seq] = deque()
        self._active_ids: set[str] = set()
        self._resident: dict[str, ParsedAdapter] = {}
        self._closed = False
        self._failed: str | None = None
        self._cancel_pending = False
        # Scheduler state (its thread only).
        self._running: list[_Seq] = []
        self._kv = BatchKVCache(self._num_layers)
        self._slot_owner: list[ParsedAdapter | None] = [None] * (max_loras + 1)
        self._slot_refs: list[int] = [0] * (max_loras + 1)
        self._thread = threading.Thread(target=self._run, name="tensafe-serving-transformers", daemon=True)
        self._thread.start()

    # ------------------------------------------------------------------ construction
    @classmethod
    async def start(
        cls,
        model: str,
        *,
        max_loras: int,
        max_lora_rank: int,
        max_num_seqs: int,
        max_model_len: int | None = None,
        model_name: str | None = None,
        aliases: Sequence[str] = (),
        max_queued: int | None = None,
    ) -> TransformersEngine:
        """Load ``model`` and start the scheduler thread.

        Args:
            model: A registered model name or alias, or a local Hugging Face model directory.
            max_loras: Adapters that can be in one batch at the same time (LoRA slots).
            max_lora_rank: The largest adapter rank accepted.
            max_num_seqs: Requests decoded together at most (the batch size).
            max_model_len: Context length (prompt plus output); default and upper bound: the
                model's ``max_position_embeddings``.
            model_name: The name clients use for the base model (default: the registry id,
                or the directory path).
            aliases: Other names adapters may give as their base model (for example the
                catalog name and the directory of the same weights).
            max_queued: Waiting requests beyond which :meth:`generate` raises
                ``ServingOverloadedError`` (default ``8 * max_num_seqs``).

        Raises:
            EngineUnavailableError: The model cannot be loaded or is not supported.
            InvalidGenerationRequestError: A limit is out of range.
        """
        for name, value in (
            ("max_loras", max_loras),
            ("max_lora_rank", max_lora_rank),
            ("max_num_seqs", max_num_seqs),
        ):
            if isinstance(value, bool) or not isinstance(value, int) or value < 1:
                raise InvalidGenerationRequestError(f"{name} must be a positive integer", param=name)
        if max_queued is not None and (
            isinstance(max_queued, bool) or not isinstance(max_queued, int) or max_queued < 0
        ):
            raise InvalidGenerationRequestError("max_queued must be an integer >= 0", param="max_queued")
        return await asyncio.to_thread(
            cls._load,
            model,
            max_loras=max_loras,
            max_lora_rank=max_lora_rank,
            max_num_seqs=max_num_seqs,
            max_model_len=max_model_len,
            model_name=model_name,
            aliases=tuple(aliases),
            max_queued=max_queued if max_queued is not None else 8 * max_num_seqs,
        )

    @classmethod
    def _load(
        cls,
        model: str,
        *,
        max_loras: int,
        max_lora_rank: int,
        max_num_seqs: int,
        max_model_len: int | None,
        model_name: str | None,
        aliases: tuple[str, ...],
        max_queued: int,
    ) -> TransformersEngine:
        from tensafe.training.errors import TrainingError
        from tensafe.training.models import list_models, load_model_and_tokenizer, resolve_model

        try:
            spec = resolve_model(model)
            hf_model, tokenizer = load_model_and_tokenizer(model)
        except TrainingError as exc:
            raise EngineUnavailableError(f"cannot load base model {model!r}: {exc}") from None
        _check_model(hf_model)
        limit = int(getattr(hf_model.config, "max_position_embeddings", 0) or 0)
        if max_model_len is None:
            if limit <= 0:
                raise EngineUnavailableError(
                    f"{spec.id}: the config has no max_position_embeddings; set max_model_len"
                )
            max_model_len = limit
        if isinstance(max_model_len, bool) or not isinstance(max_model_len, int) or max_model_len < 2:
            raise InvalidGenerationRequestError(
                "max_model_len must be an integer >= 2", param="max_model_len"
            )
        if limit > 0 and max_model_len > limit:
            raise InvalidGenerationRequestError(
                f"max_model_len {max_model_len} is above the model's max_position_embeddings ({limit})",
                param="max_model_len",
            )
        names = {spec.id, str(spec.path), model, *aliases}
        for entry in list_models():
            if entry.id == spec.id:
                names.update(entry.aliases)
        model_id = model_name or spec.id
        names.add(model_id)
        hf_model.requires_grad_(False)
        return cls(
            model=hf_model,
            tokenizer=tokenizer,
            model_id=model_id,
            base_names=frozenset(names),
            max_loras=max_loras,
            max_lora_rank=max_lora_rank,
            max_num_seqs=max_num_seqs,
            max_model_len=max_model_len,
            max_queued=max_queued,
        )

    # ------------------------------------------------------------------ Engine interface
    @property
    def model_id(self) -> str:
        """The base model's name."""
        return self._model_id

    @property
    def max_model_len(self) -> int:
        """The context length: prompt plus generated tokens."""
        return self._max_model_len

    @property
    def max_lora_rank(self) -> int:
        """The largest LoRA rank :meth:`load_adapter` accepts."""
        return self._max_lora_rank

    @property
    def max_loras(self) -> int:
        """Adapters that can share one batch (LoRA slots)."""
        return self._max_loras

    @property
    def max_num_seqs(self) -> int:
        """Requests decoded together at most."""
        return self._max_num_seqs

    def tokenizer(self) -> object:
        """The base model's Hugging Face tokenizer."""
        return self._tokenizer

    async def load_adapter(self, adapter: LoraAdapter) -> None:
        """Check and keep ``adapter`` in memory; a loaded id is replaced (running requests keep the old one).

        Raises:
            InvalidGenerationRequestError: The adapter is malformed, for another base model, of a
                rank above ``max_lora_rank`` or adapts modules this engine cannot.
            EngineUnavailableError: The engine is closed.
        """
        parsed = await asyncio.to_thread(
            parse_adapter,
            adapter,
            base_names=self._base_names,
            shapes=self._shapes,
            max_rank=self._max_lora_rank,
        )
        with self._cond:
            self._check_open()
            self._resident[adapter.adapter_id] = parsed
            self._cond.notify_all()
        _log.info(
            "adapter %s loaded (rank %d, %d modules)", adapter.adapter_id, parsed.rank, len(parsed.weights)
        )

    async def unload_adapter(self, adapter_id: str) -> None:
        """Refuse new requests for ``adapter_id``; running ones finish, then its slot is zeroed.

        Raises:
            ModelNotFoundError: No adapter of that id is loaded.
        """
        with self._cond:
            if self._resident.pop(adapter_id, None) is None:
                raise ModelNotFoundError(f"adapter {adapter_id!r} is not loaded")
            self._cond.notify_all()
        _log.info("adapter %s unloaded", adapter_id)

    def resident_adapters(self) -> frozenset[str]:
        """Ids of the adapters currently loaded."""
        with self._cond:
            return frozenset(self._resident)

    def generate(self, request: GenerationRequest) -> AsyncIterator[GenerationChunk]:
        """Stream the request's output (see the module docstring and :class:`Engine`)."""
        return self._generate(request)

    async def _generate(self, request: GenerationRequest) -> AsyncIterator[GenerationChunk]:
        seq = self._submit(request, asyncio.get_running_loop())
        finished = False
        try:
            while True:
                item = await seq.out.get()
                if isinstance(item, BaseException):
                    finished = True
                    raise item
                if item.finish_reason is not None:
                    finished = True
                yield item
                if finished:
                    return
        finally:
            if not finished:
                self._cancel(seq)

    async def close(self) -> None:
        """Abort every request, stop the scheduler thread and drop the model."""
        with self._cond:
            self._closed = True
            self._cond.notify_all()
        await asyncio.to_thread(self._thread.join)

    # ------------------------------------------------------------------ submission (any thread)
    def _check_open(self) -> None:
        if self._failed is not None:
            raise EngineUnavailableError(
                f"the transformers engine stopped after an internal error ({self._failed})"
            )
        if self._closed:
            raise EngineUnavailableError("the transformers engine is closed")

    def _submit(self, request: GenerationRequest, loop: asyncio.AbstractEventLoop) -> _Seq:
        prompt = list(request.prompt_token_ids)
        if not prompt:
            raise InvalidGenerationRequestError("the prompt is empty", param="prompt")
        if not all(
            isinstance(t, int) and not isinstance(t, bool) and 0 <= t < self._vocab_size for t in prompt
        ):
            raise InvalidGenerationRequestError(
                f"prompt token ids must be in [0, {self._vocab_size})", param="prompt"
            )
        if len(prompt) >= self._max_model_len:
            raise InvalidGenerationRequestError(
                f"the prompt has {len(prompt)} tokens; this model's context is {self._max_model_len} tokens "
                "(prompt plus at least one generated token)",
                param="prompt",
            )
        params = request.params
        _check_params(params, self._vocab_size)
        seed = params.seed if params.seed is not None else secrets.randbits(63)
        with self._cond:
            self._check_open()
            adapter: ParsedAdapter | None = None
            if request.adapter_id is not None:
                adapter = self._resident.get(request.adapter_id)
                if adapter is None:
                    raise ModelNotFoundError(f"adapter {request.adapter_id!r} is not loaded")
            if request.request_id in self._active_ids:
                raise InvalidGenerationRequestError(
                    f"request id {request.request_id!r} is already running", param="request_id"
                )
            if len(self._waiting) >= self._max_queued:
                raise ServingOverloadedError(
                    f"{len(self._waiting)} requests are already waiting "
                    f"(max_queued={self._max_queued}); retry later"
                )
            seq = _Seq(
                request=request,
                loop=loop,
                out=asyncio.Queue(),
                adapter=adapter,
                sampler=RowSampler.create(params, prompt, vocab_size=self._vocab_size, seed=seed),
                detok=Detokenizer(self._tokenizer, prompt, params.stop),
                prompt=prompt,
            )
            self._active_ids.add(request.request_id)
            self._waiting.append(seq)
            self._cond.notify_all()
        return seq

    def _cancel(self, seq: _Seq) -> None:
        with self._cond:
            if seq.done:
                return
            seq.cancelled = True
            self._cancel_pending = True
            self._cond.notify_all()

    # ------------------------------------------------------------------ scheduler thread
    def _deliver(self, seq: _Seq, item: GenerationChunk | BaseException) -> None:
        try:
            seq.loop.call_soon_threadsafe(seq.out.put_nowait, item)
        except RuntimeError:  # The consumer's event loop is closed: nobody is listening.
            seq.cancelled = True

    def _finish(self, seq: _Seq, reason: FinishReason) -> None:
        """Send the last chunk of a request that produced no new token (abort)."""
        seq.done = True
        seq.detok.finish()
        self._deliver(
            seq,
            GenerationChunk(
                text=seq.detok.delta(finished=True),
                token_ids=(),
                logprobs=() if seq.request.params.logprobs is not None else None,
                finish_reason=reason,
                prompt_tokens=len(seq.prompt),
                completion_tokens=len(seq.output),
            ),
        )

    def _run(self) -> None:
        try:
            with torch.inference_mode():
                while self._step():
                    pass
        except Exception as exc:  # An internal failure fails every request, closed.
            reason = type(exc).__name__
            _log.exception("the transformers engine's scheduler failed (%s)", reason)
            with self._cond:
                self._failed = reason
                seqs = [*self._waiting, *self._running]
                self._waiting.clear()
            for seq in seqs:
                if not seq.done:
                    seq.done = True
                    self._deliver(seq, EngineUnavailableError(f"the transformers engine failed ({reason})"))
        finally:
            self._running = []
            self._kv = BatchKVCache(self._num_layers)
            self._model = None
            self._bank.mask = None

    def _step(self) -> bool:
        """One scheduler iteration; False once the engine is closed."""
        with self._cond:
            while not (self._waiting or self._running or self._closed or self._cancel_pending):
                self._cond.wait()
            if self._closed:
                seqs = [*self._waiting, *self._running]
                self._waiting.clear()
                self._active_ids.clear()
                for seq in seqs:
                    if not seq.done:
                        self._finish(seq, "abort")
                return False
            self._cancel_pending = False
            for seq in [s for s in self._waiting if s.cancelled]:
                self._waiting.remove(seq)
                seq.done = True
                self._active_ids.discard(seq.request.request_id)
            admitted = self._admit()
        if any(seq.cancelled for seq in self._running):
            self._retire()
        if admitted:
            self._prefill(admitted)
        if self._running:
            self._decode()
        return True

    def _admit(self) -> list[_Seq]:
        """Move waiting requests to the batch while there is room (under the lock)."""
        self._release_stale_slots()
        admitted: list[_Seq] = []
        room = self._max_num_seqs - len(self._running)
        for seq in list(self._waiting):
            if room <= 0:
                break
            if (
                seq.adapter is not None
                and self._resident.get(seq.request.adapter_id or "") is not seq.adapter
            ):
                self._waiting.remove(seq)
                seq.done = True
                self._active_ids.discard(seq.request.request_id)
                self._deliver(seq, ModelNotFoundError(f"adapter {seq.request.adapter_id!r} is not loaded"))
                continue
            slot = self._slot_for(seq.adapter)
            if slot is None:
                continue
            self._waiting.remove(seq)
            seq.slot = slot
            if slot:
                self._slot_refs[slot] += 1
            admitted.append(seq)
            room -= 1
        return admitted

    def _slot_for(self, adapter: ParsedAdapter | None) -> int | None:
        if adapter is None:
            return 0
        for slot in range(1, self._max_loras + 1):
            if self._slot_owner[slot] is adapter:
                return slot
        free = [s for s in range(1, self._max_loras + 1) if self._slot_refs[s] == 0]
        if not free:
            return None
        slot = next((s for s in free if self._slot_owner[s] is None), free[0])
        self._bank.fill(slot, adapter)
        self._slot_owner[slot] = adapter
        return slot

    def _release_stale_slots(self) -> None:
        """Zero the slots of unloaded (or replaced) adapters no running request uses."""
        resident = {id(a) for a in self._resident.values()}
        for slot in range(1, self._max_loras + 1):
            owner = self._slot_owner[slot]
            if owner is not None and self._slot_refs[slot] == 0 and id(owner) not in resident:
                self._bank.clear(slot)
                self._slot_owner[slot] = None

    def _retire(self) -> None:
        """Drop finished and cancelled rows from the batch and the KV cache."""
        keep = [i for i, seq in enumerate(self._running) if not (seq.done or seq.cancelled)]
        gone = [seq for seq in self._running if seq.done or seq.cancelled]
        self._running = [self._running[i] for i in keep]
        self._kv.keep(keep)
        with self._cond:
            for seq in gone:
                seq.done = True
                self._active_ids.discard(seq.request.request_id)
                if seq.slot:
                    self._slot_refs[seq.slot] -= 1
            self._release_stale_slots()

    def _forward(self, input_ids: torch.Tensor, **kwargs: Any) -> torch.Tensor:
        out = self._model(input_ids=input_ids, use_cache=True, logits_to_keep=1, **kwargs)
        logits: torch.Tensor = out.logits[:, -1, :]
        return logits

    def _prefill(self, admitted: list[_Seq]) -> None:
        groups: dict[int, list[_Seq]] = {}
        for seq in admitted:
            groups.setdefault(len(seq.prompt), []).append(seq)
        for length, group in groups.items():
            cache = BatchKVCache.fresh(self._num_layers)
            self._bank.set_rows([seq.slot for seq in group])
            logits = self._forward(
                torch.tensor([seq.prompt for seq in group], dtype=torch.long),
                position_ids=torch.arange(length).unsqueeze(0).expand(len(group), -1),
                cache=cache,
            )
            self._kv.admit(cache, len(group))
            self._running.extend(group)
            self._emit(group, logits)
        self._retire()

    def _decode(self) -> None:
        rows = self._running
        self._bank.set_rows([seq.slot for seq in rows])
        logits = self._forward(
            torch.tensor([[seq.output[-1]] for seq in rows], dtype=torch.long),
            attention_mask=self._kv.attention_mask(1),
            position_ids=self._kv.positions(),
            cache=self._kv.cache(),
        )
        self._emit(rows, logits)
        self._retire()

    def _emit(self, rows: list[_Seq], logits: torch.Tensor) -> None:
        tokens, logprobs = sample_batch(logits, [seq.sampler for seq in rows])
        for seq, token, logprob in zip(rows, tokens, logprobs, strict=True):
            if seq.cancelled:
                continue
            self._push(seq, token, logprob)

    def _push(self, seq: _Seq, token: int, logprob: TokenLogprob | None) -> None:
        params = seq.request.params
        seq.output.append(token)
        reason: FinishReason | None = None
        if (token in self._eos and not params.ignore_eos) or token in params.stop_token_ids:
            reason = "stop"  # A stop token adds no text.
        elif seq.detok.add(token):
            reason = "stop"
        elif len(seq.output) >= params.max_tokens or len(seq.prompt) + len(seq.output) >= self._max_model_len:
            reason = "length"
        if reason is not None:
            seq.detok.finish()
            seq.done = True
        self._deliver(
            seq,
            GenerationChunk(
                text=seq.detok.delta(finished=reason is not None),
                token_ids=(token,),
                logprobs=(logprob,) if logprob is not None else None,
                finish_reason=reason,
                prompt_tokens=len(seq.prompt),
                completion_tokens=len(seq.output),
            ),
        )
