"""The vLLM worker: the script TenSafe's ``vllm`` engine runs with vLLM's own interpreter.

It is run as ``VLLM_PYTHON _vllm_worker.py`` by :mod:`tensafe.serving.engines.vllm` and imports
only the standard library and ``vllm`` (vLLM lives in its own environment, with its own torch and
transformers, and never imports TenSafe). It drives one ``vllm.v1.engine.async_llm.AsyncLLM``.

Channel (private to the parent): frames on the worker's original standard input and output, each a
4-byte big-endian length followed by that many bytes of UTF-8 JSON (one object). At start the
worker moves the channel to private descriptors, points descriptor 0 at ``/dev/null`` and 1 at
standard error, so nothing vLLM or a library prints can corrupt the framing. Standard error is
vLLM's log; it never receives prompts or outputs (request logging stays off).

Parent -> worker: the first frame is ``{"engine_args": {...}}`` (keyword arguments of
``AsyncEngineArgs``); then

* ``{"op": "generate", "id", "prompt_token_ids", "params": {...}, "lora": int | null}``
* ``{"op": "abort", "id"}``
* ``{"op": "add_lora", "seq", "name", "lora_int_id", "path"}`` (replies once vLLM has read the
  files: the parent removes them then; not pinned, see ``add_lora``) and
  ``{"op": "remove_lora", "seq", "lora_int_id"}``
* ``{"op": "shutdown"}`` (end of input means the same)

Worker -> parent: ``{"op": "ready", "max_model_len", "vllm_version"}`` once; ``{"op": "chunk",
"id", "text", "token_ids", "logprobs", "finish_reason", "prompt_tokens", "completion_tokens"}``;
``{"op": "error", "id", "kind": "invalid" | "internal", "message"}`` (the request is over);
``{"op": "reply", "seq", "ok", "message"}``; ``{"op": "fatal", "message"}`` (the worker exits;
``"kind": "no_vllm"`` when vLLM cannot be imported).
``logprobs`` is a list of ``[token_id, logprob, [[id, logprob], ...]]`` (the alternatives ranked
1..k) or null.
"""

from __future__ import annotations

import asyncio
import json
import os
import struct
import sys
import threading
from typing import Any, BinaryIO

# This file sits next to TenSafe's ``vllm.py``: drop its directory from the import path so that
# ``import vllm`` finds the real vLLM (the directory is added when Python runs a script).
_HERE = os.path.dirname(os.path.abspath(__file__))
sys.path[:] = [p for p in sys.path if os.path.abspath(p or os.curdir) != _HERE]

_HEADER = struct.Struct(">I")
_MAX_FRAME = 64 * 1024 * 1024
EXIT_NO_VLLM = 3
EXIT_FATAL = 4


def _read_frame(stream: BinaryIO) -> dict[str, Any] | None:
    header = stream.read(_HEADER.size)
    if len(header) < _HEADER.size:
        return None
    (size,) = _HEADER.unpack(header)
    if size > _MAX_FRAME:
        raise ValueError(f"frame of {size} bytes exceeds the limit")
    data = b""
    while len(data) < size:
        part = stream.read(size - len(data))
        if not part:
            return None
        data += part
    message = json.loads(data.decode("utf-8"))
    if not isinstance(message, dict):
        raise ValueError("a frame must hold a JSON object")
    return message


class _Channel:
    """Writes frames to the parent (from the event loop's thread only)."""

    def __init__(self, stream: BinaryIO) -> None:
        self._stream = stream

    def send(self, message: dict[str, Any]) -> None:
        data = json.dumps(message, separators=(",", ":")).encode("utf-8")
        self._stream.write(_HEADER.pack(len(data)) + data)
        self._stream.flush()


def _sampling_params(params: dict[str, Any]) -> Any:
    from vllm import SamplingParams
    from vllm.sampling_params import RequestOutputKind

    top_k = int(params["top_k"])
    return SamplingParams(
        n=1,
        max_tokens=int(params["max_tokens"]),
        temperature=float(params["temperature"]),
        top_p=float(params["top_p"]),
        top_k=0 if top_k == -1 else top_k,
        min_p=float(params["min_p"]),
        repetition_penalty=float(params["repetition_penalty"]),
        presence_penalty=float(params["presence_penalty"]),
        frequency_penalty=float(params["frequency_penalty"]),
        stop=list(params["stop"]),
        stop_token_ids=list(params["stop_token_ids"]),
        ignore_eos=bool(params["ignore_eos"]),
        seed=params["seed"],
        logprobs=params["logprobs"],
        include_stop_str_in_output=False,
        output_kind=RequestOutputKind.DELTA,
    )


def _logprobs(entries: Any, token_ids: list[int], k: int) -> list[Any]:
    out: list[Any] = []
    for token_id, entry in zip(token_ids, entries, strict=True):
        top = [[int(t), float(lp.logprob)] for t, lp in entry.items() if lp.rank is not None and lp.rank <= k]
        out.append([int(token_id), float(entry[token_id].logprob), top])
    return out


class _Worker:
    def __init__(self, engine: Any, channel: _Channel) -> None:
        self.engine = engine
        self.channel = channel
        self.tasks: dict[str, asyncio.Task[None]] = {}
        self.loras: dict[int, Any] = {}

    async def generate(self, message: dict[str, Any]) -> None:
        from vllm.exceptions import VLLMClientError
        from vllm.v1.engine.exceptions import EngineDeadError

        rid = str(message["id"])
        params = message["params"]
        lora = self.loras.get(message["lora"]) if message.get("lora") is not None else None
        if message.get("lora") is not None and lora is None:
            self.channel.send({"op": "error", "id": rid, "kind": "invalid", "message": "unknown adapter"})
            return
        completion = 0
        k = params["logprobs"]
        try:
            sampling = _sampling_params(params)
            prompt = {"prompt_token_ids": [int(t) for t in message["prompt_token_ids"]]}
            async for output in self.engine.generate(prompt, sampling, rid, lora_request=lora):
                result = output.outputs[0]
                token_ids = [int(t) for t in result.token_ids]
                completion += len(token_ids)
                logprobs = None
                if k is not None and result.logprobs is not None:
                    logprobs = _logprobs(result.logprobs, token_ids, int(k))
                self.channel.send(
                    {
                        "op": "chunk",
                        "id": rid,
                        "text": result.text,
                        "token_ids": token_ids,
                        "logprobs": logprobs,
                        "finish_reason": result.finish_reason,
                        "prompt_tokens": len(output.prompt_token_ids or ()),
                        "completion_tokens": completion,
                    }
                )
        except asyncio.CancelledError:
            return  # aborted by the parent; vLLM's generate() aborted the request
        except EngineDeadError:
            self.channel.send({"op": "fatal", "message": "vLLM's engine core died"})
            os._exit(EXIT_FATAL)
        except (ValueError, TypeError, VLLMClientError) as exc:
            # vLLM's request validation (prompt too long, bad parameter): no prompt text in these.
            self.channel.send({"op": "error", "id": rid, "kind": "invalid", "message": str(exc)[:500]})
        except Exception as exc:
            cause = exc.__cause__ if exc.__cause__ is not None else exc
            kind = "invalid" if isinstance(cause, (ValueError, TypeError, VLLMClientError)) else "internal"
            text = str(cause)[:500] if kind == "invalid" else type(cause).__name__
            self.channel.send({"op": "error", "id": rid, "kind": kind, "message": text})
        finally:
            self.tasks.pop(rid, None)

    async def add_lora(self, message: dict[str, Any]) -> None:
        from vllm.lora.request import LoRARequest

        int_id = int(message["lora_int_id"])
        request = LoRARequest(
            lora_name=str(message["name"]), lora_int_id=int_id, lora_path=str(message["path"])
        )
        try:
            # Not pinned (pinning also pins a batch slot, and max_loras slots would run out): the
            # parent keeps at most max_cpu_loras adapters loaded, so vLLM never evicts one and
            # never re-reads its (removed) files.
            ok = await self.engine.add_lora(request)
            if ok:
                self.loras[int_id] = request
            reply = {"ok": bool(ok), "message": "" if ok else "vLLM did not load the adapter"}
        except Exception as exc:
            reply = {"ok": False, "message": f"{type(exc).__name__}: {str(exc)[:500]}"}
        self.channel.send({"op": "reply", "seq": message["seq"], **reply})

    async def remove_lora(self, message: dict[str, Any]) -> None:
        int_id = int(message["lora_int_id"])
        try:
            ok = await self.engine.remove_lora(int_id)
            self.loras.pop(int_id, None)
            reply = {"ok": True, "message": "" if ok else "not loaded"}
        except Exception as exc:
            reply = {"ok": False, "message": type(exc).__name__}
        self.channel.send({"op": "reply", "seq": message["seq"], **reply})

    async def run(self, inbox: asyncio.Queue[dict[str, Any] | None]) -> None:
        background: set[asyncio.Task[None]] = set()
        while True:
            message = await inbox.get()
            if message is None or message.get("op") == "shutdown":
                break
            op = message.get("op")
            if op == "generate":
                task = asyncio.create_task(self.generate(message))
                self.tasks[str(message["id"])] = task
            elif op == "abort":
                running = self.tasks.pop(str(message["id"]), None)
                if running is not None:
                    running.cancel()
            elif op in ("add_lora", "remove_lora"):
                task = asyncio.create_task(
                    self.add_lora(message) if op == "add_lora" else self.remove_lora(message)
                )
                background.add(task)
                task.add_done_callback(background.discard)
        for task in list(self.tasks.values()):
            task.cancel()
        await asyncio.gather(*self.tasks.values(), return_exceptions=True)


async def _serve(config: dict[str, Any], inbox_stream: BinaryIO, channel: _Channel) -> None:
    import vllm
    from vllm import AsyncEngineArgs
    from vllm.v1.engine.async_llm import AsyncLLM

    engine = AsyncLLM.from_engine_args(AsyncEngineArgs(**config["engine_args"]))
    loop = asyncio.get_running_loop()
    inbox: asyncio.Queue[dict[str, Any] | None] = asyncio.Queue()

    def read() -> None:
        while True:
            try:
                message = _read_frame(inbox_stream)
            except (ValueError, OSError):
                message = None
            loop.call_soon_threadsafe(inbox.put_nowait, message)
            if message is None:
                return

    threading.Thread(target=read, name="tensafe-vllm-channel", daemon=True).start()
    channel.send(
        {
            "op": "ready",
            "max_model_len": int(engine.model_config.max_model_len),
            "vllm_version": vllm.__version__,
        }
    )
    try:
        await _Worker(engine, channel).run(inbox)
    finally:
        engine.shutdown()


def main() -> int:
    """Run the worker until the parent says ``shutdown`` or closes the channel."""
    inbox_stream = os.fdopen(os.dup(0), "rb", buffering=0)
    channel = _Channel(os.fdopen(os.dup(1), "wb", buffering=0))
    null = os.open(os.devnull, os.O_RDONLY)
    os.dup2(null, 0)
    os.close(null)
    os.dup2(2, 1)
    config = _read_frame(inbox_stream)
    if config is None:
        return EXIT_FATAL
    try:
        import vllm  # noqa: F401
        from vllm.v1.engine.async_llm import AsyncLLM  # noqa: F401
    except ImportError as exc:
        channel.send(
            {
                "op": "fatal",
                "kind": "no_vllm",
                "message": f"vllm cannot be imported by {sys.executable}: {exc}",
            }
        )
        return EXIT_NO_VLLM
    try:
        asyncio.run(_serve(config, inbox_stream, channel))
    except Exception as exc:
        channel.send({"op": "fatal", "message": f"{type(exc).__name__}: {str(exc)[:1000]}"})
        return EXIT_FATAL
    return 0


if __name__ == "__main__":
    sys.exit(main())
