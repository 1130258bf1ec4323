"""Adversarial and lifecycle cases: cancellation, overload, bad adapters, unload, close, bad requests."""

from __future__ import annotations

import asyncio
import json
import pathlib
from collections.abc import Callable
from typing import Any

import pytest
import torch
from safetensors.torch import load, save

from tensafe.serving.engine import Engine, GenerationRequest, LoraAdapter, SamplingParams
from tensafe.serving.errors import (
    EngineUnavailableError,
    InvalidGenerationRequestError,
    ModelNotFoundError,
    ServingOverloadedError,
)

MODEL = "tensafe-test/tiny-llama"


async def _engine(model_dir: pathlib.Path, **kwargs: Any) -> Any:
    from tensafe.serving.engines.transformers import TransformersEngine

    settings = {"max_loras": 2, "max_lora_rank": 8, "max_num_seqs": 4, "max_model_len": 256, **kwargs}
    return await TransformersEngine.start(str(model_dir), model_name=MODEL, **settings)


def _request(
    prompt: list[int], *, request_id: str = "r", adapter_id: str | None = None, **params: Any
) -> GenerationRequest:
    params.setdefault("max_tokens", 8)
    params.setdefault("temperature", 0.0)
    return GenerationRequest(
        request_id=request_id, prompt_token_ids=prompt, params=SamplingParams(**params), adapter_id=adapter_id
    )


def _slow(engine: Any, seconds: float = 0.01) -> Any:
    """Make every forward pass take at least ``seconds``, so a request outlives the test's next step."""
    import time

    forward = engine._forward

    def slow(input_ids: Any, **kwargs: Any) -> Any:
        time.sleep(seconds)
        return forward(input_ids, **kwargs)

    engine._forward = slow
    return engine


def test_engine_satisfies_the_protocol(transformers_engine: Any) -> None:
    assert isinstance(transformers_engine, Engine)
    assert transformers_engine.model_id == MODEL
    assert transformers_engine.max_model_len == 256
    assert transformers_engine.max_lora_rank == 8
    assert transformers_engine.resident_adapters() == frozenset()


def test_cancelled_request_frees_its_slot_and_the_engine_keeps_serving(
    serving_model_dir: pathlib.Path, make_lora_adapter: Callable[..., Any], run_request: Callable[..., Any]
) -> None:
    """One batch row and one LoRA slot: a client that disconnects must give both back."""
    adapter = make_lora_adapter(serving_model_dir, rank=4, seed=5, adapter_id="held")
    other = make_lora_adapter(serving_model_dir, rank=4, seed=6, adapter_id="other")

    async def main() -> tuple[Any, Any, Any]:
        engine = await _engine(serving_model_dir, max_num_seqs=1, max_loras=1)
        try:
            await engine.load_adapter(adapter)
            await engine.load_adapter(other)
            prompt = engine.tokenizer().encode("Hello there")
            stream = engine.generate(_request(prompt, adapter_id="held", max_tokens=200, ignore_eos=True))
            first = await stream.__anext__()
            assert first.finish_reason is None
            await stream.aclose()  # The client disconnected.
            # The only row and the only slot must be free again: both of these need them.
            after = await asyncio.wait_for(
                run_request(
                    engine, prompt, adapter_id="other", max_tokens=4, temperature=0.0, ignore_eos=True
                ),
                60,
            )
            base = await asyncio.wait_for(run_request(engine, prompt, max_tokens=4, temperature=0.0), 60)
            # Nothing of the cancelled request is left in the batch, the cache or the id table.
            await asyncio.sleep(0.05)
            state = (engine._running, engine._kv.rows, engine._active_ids, engine._slot_refs)
            return after, base, state
        finally:
            await engine.close()

    after, base, (running, rows, active, refs) = asyncio.run(main())
    assert after.finish_reason == "length" and len(after.tokens) == 4
    assert base.finish_reason in ("length", "stop")
    assert running == [] and rows == 0 and active == set() and refs == [0, 0]


def test_task_cancellation_aborts_the_request(serving_model_dir: pathlib.Path) -> None:
    async def main() -> Any:
        engine = _slow(await _engine(serving_model_dir, max_num_seqs=1))
        try:
            prompt = engine.tokenizer().encode("Hello there")

            async def consume() -> None:
                async for _ in engine.generate(_request(prompt, max_tokens=10_000 // 50, ignore_eos=True)):
                    await asyncio.sleep(0)

            task = asyncio.create_task(consume())
            await asyncio.sleep(0.3)
            task.cancel()
            with pytest.raises(asyncio.CancelledError):
                await task
            for _ in range(100):
                if not engine._running and not engine._active_ids:
                    break
                await asyncio.sleep(0.02)
            return engine._running, engine._active_ids
        finally:
            await engine.close()

    running, active = asyncio.run(main())
    assert running == [] and active == set()


def test_overload_is_refused_beyond_the_queue_bound(serving_model_dir: pathlib.Path) -> None:
    """One running request (held inside its forward pass), two waiting: the next one is a 429."""
    import threading

    async def main() -> list[str | None]:
        engine = await _engine(serving_model_dir, max_num_seqs=1, max_queued=2)
        gate = threading.Event()
        forward = engine._forward

        def held(input_ids: Any, **kwargs: Any) -> Any:
            gate.wait(60)
            return forward(input_ids, **kwargs)

        engine._forward = held
        try:
            prompt = engine.tokenizer().encode("Hello there")
            streams = [
                engine.generate(_request(prompt, request_id=f"q{i}", max_tokens=5, ignore_eos=True))
                for i in range(3)
            ]

            async def until(condition: Callable[[], bool]) -> None:
                for _ in range(1000):
                    if condition():
                        return
                    await asyncio.sleep(0.01)
                raise AssertionError("the engine did not reach the expected state")

            firsts = [asyncio.create_task(streams[0].__anext__())]
            await until(lambda: not engine._waiting and len(engine._active_ids) == 1)  # q0 runs (held).
            firsts += [asyncio.create_task(s.__anext__()) for s in streams[1:]]
            await until(lambda: len(engine._waiting) == 2)  # q1 and q2 wait.
            with pytest.raises(ServingOverloadedError, match="max_queued=2"):
                await engine.generate(_request(prompt, request_id="q3")).__anext__()
            gate.set()
            reasons = []
            for stream, first in zip(streams, firsts):
                last = await first
                async for last in stream:
                    pass
                reasons.append(last.finish_reason)
            # Once the queue drained, requests are accepted again.
            again = [c async for c in engine.generate(_request(prompt, request_id="q4", max_tokens=2))]
            reasons.append(again[-1].finish_reason)
            return reasons
        finally:
            gate.set()
            await engine.close()

    assert asyncio.run(main()) == ["length", "length", "length", "length"]


def _files(adapter: LoraAdapter) -> tuple[dict[str, Any], dict[str, torch.Tensor]]:
    return json.loads(adapter.files["adapter_config.json"]), dict(
        load(adapter.files["adapter_model.safetensors"])
    )


def _rebuild(
    adapter: LoraAdapter, config: dict[str, Any] | None = None, tensors: Any = None, **kw: Any
) -> LoraAdapter:
    cfg, weights = _files(adapter)
    files = {
        "adapter_config.json": json.dumps(config if config is not None else cfg).encode(),
        "adapter_model.safetensors": save(tensors if tensors is not None else weights),
    }
    fields = {"adapter_id": adapter.adapter_id, "base_model_id": adapter.base_model_id, "files": files, **kw}
    return LoraAdapter(**fields)


def _bad_adapters(
    model_dir: pathlib.Path, make: Callable[..., LoraAdapter]
) -> dict[str, tuple[LoraAdapter, str]]:
    good = make(model_dir, rank=4, seed=3, adapter_id="bad")
    cfg, weights = _files(good)
    a_name = next(n for n in weights if n.endswith("q_proj.lora_A.weight"))
    b_name = a_name.replace("lora_A", "lora_B")
    wrong_shape = dict(weights)
    wrong_shape[a_name] = torch.zeros(4, 48)
    nan = dict(weights)
    nan[b_name] = weights[b_name].clone()
    nan[b_name][0, 0] = float("nan")
    half = {k: v for k, v in weights.items() if k != b_name}
    extra = dict(weights)
    extra["base_model.model.lm_head.lora_A.weight"] = torch.zeros(4, 32)
    extra["base_model.model.lm_head.lora_B.weight"] = torch.zeros(49152, 4)
    untargeted_cfg = {**cfg, "target_modules": ["v_proj"]}
    return {
        "wrong base (LoraAdapter)": (
            _rebuild(good, base_model_id="HuggingFaceTB/SmolLM2-135M-Instruct"),
            "base model",
        ),
        "wrong base (config)": (
            _rebuild(good, config={**cfg, "base_model_name_or_path": "meta-llama/Llama-3.2-1B"}),
            "base_model_name_or_path",
        ),
        "rank too high": (make(model_dir, rank=16, seed=3, adapter_id="bad"), "max_lora_rank"),
        "wrong shape": (_rebuild(good, tensors=wrong_shape), "has shape"),
        "NaN": (_rebuild(good, tensors=nan), "NaN"),
        "missing half": (_rebuild(good, tensors=half), "not its pair"),
        "lm_head": (_rebuild(good, tensors=extra), "adapts no attention or MLP projection"),
        "not targeted": (_rebuild(good, config=untargeted_cfg), "does not target"),
        "DoRA": (_rebuild(good, config={**cfg, "use_dora": True}), "use_dora"),
        "not LoRA": (_rebuild(good, config={**cfg, "peft_type": "IA3"}), "peft_type"),
        "pickle": (
            LoraAdapter(
                adapter_id="bad",
                base_model_id=MODEL,
                files={
                    "adapter_config.json": good.files["adapter_config.json"],
                    "adapter_model.safetensors": b"\x80\x04K.",
                },
            ),
            "not a valid safetensors",
        ),
        "config not JSON": (
            LoraAdapter(
                adapter_id="bad",
                base_model_id=MODEL,
                files={
                    "adapter_config.json": b"{",
                    "adapter_model.safetensors": good.files["adapter_model.safetensors"],
                },
            ),
            "not UTF-8 JSON",
        ),
        "no weights": (
            LoraAdapter(adapter_id="bad", base_model_id=MODEL, files={"adapter_config.json": b"{}"}),
            "missing",
        ),
    }


def test_bad_adapters_are_refused(
    transformers_engine: Any, serving_model_dir: pathlib.Path, make_lora_adapter: Callable[..., Any]
) -> None:
    cases = _bad_adapters(serving_model_dir, make_lora_adapter)
    for name, (adapter, message) in cases.items():
        with pytest.raises(InvalidGenerationRequestError, match=message) as info:
            asyncio.run(transformers_engine.load_adapter(adapter))
        assert info.value.param == "adapter", name
        assert transformers_engine.resident_adapters() == frozenset(), name
    # The good one loads, under the catalog name and under the directory as base model.
    asyncio.run(
        transformers_engine.load_adapter(
            make_lora_adapter(serving_model_dir, rank=4, seed=3, adapter_id="ok")
        )
    )
    alias = make_lora_adapter(
        serving_model_dir, rank=4, seed=3, adapter_id="by-path", base_model_id=str(serving_model_dir)
    )
    asyncio.run(transformers_engine.load_adapter(alias))
    assert transformers_engine.resident_adapters() == {"ok", "by-path"}


def test_unknown_adapter_and_unload(
    transformers_engine: Any, serving_model_dir: pathlib.Path, make_lora_adapter: Callable[..., Any]
) -> None:
    prompt = transformers_engine.tokenizer().encode("Hello")

    async def first(request: GenerationRequest) -> Any:
        stream = transformers_engine.generate(request)
        try:
            return await stream.__anext__()
        finally:
            await stream.aclose()

    with pytest.raises(ModelNotFoundError, match="not loaded"):
        asyncio.run(first(_request(prompt, adapter_id="nobody")))
    adapter = make_lora_adapter(serving_model_dir, rank=4, seed=9, adapter_id="gone-soon")

    async def running_survives_unload() -> tuple[Any, Any]:
        await transformers_engine.load_adapter(adapter)
        stream = transformers_engine.generate(
            _request(prompt, request_id="u1", adapter_id="gone-soon", max_tokens=30, ignore_eos=True)
        )
        chunk = await stream.__anext__()
        await transformers_engine.unload_adapter("gone-soon")
        last = chunk
        async for last in stream:
            pass
        return chunk, last

    _, last = asyncio.run(running_survives_unload())
    assert last.finish_reason == "length" and last.completion_tokens == 30
    assert transformers_engine.resident_adapters() == frozenset()
    with pytest.raises(ModelNotFoundError):
        asyncio.run(first(_request(prompt, request_id="u2", adapter_id="gone-soon")))
    with pytest.raises(ModelNotFoundError):
        asyncio.run(transformers_engine.unload_adapter("gone-soon"))

    async def settle() -> list[Any]:
        await asyncio.sleep(0.05)
        return list(transformers_engine._slot_owner)

    # The freed slot holds no weights of the unloaded adapter any more.
    assert all(owner is None for owner in asyncio.run(settle()))
    for module in transformers_engine._bank.modules.values():
        assert not module.lora_a.any() and not module.lora_b.any()


@pytest.mark.parametrize(
    ("prompt", "params", "param"),
    [
        ([], {}, "prompt"),
        ([1] * 256, {}, "prompt"),
        ([10**9], {}, "prompt"),
        ([1, 2], {"max_tokens": 0}, "max_tokens"),
        ([1, 2], {"temperature": -1.0}, "temperature"),
        ([1, 2], {"top_p": 0.0}, "top_p"),
        ([1, 2], {"top_k": -2}, "top_k"),
        ([1, 2], {"min_p": 1.5}, "min_p"),
        ([1, 2], {"repetition_penalty": 0.0}, "repetition_penalty"),
        ([1, 2], {"presence_penalty": 2.5}, "presence_penalty"),
        ([1, 2], {"frequency_penalty": float("nan")}, "frequency_penalty"),
        ([1, 2], {"logprobs": 21}, "logprobs"),
        ([1, 2], {"stop_token_ids": (-1,)}, "stop_token_ids"),
        ([1, 2], {"seed": -5}, "seed"),
    ],
)
def test_bad_requests_are_refused_with_the_field_named(
    transformers_engine: Any, prompt: list[int], params: dict[str, Any], param: str
) -> None:
    async def main() -> None:
        await transformers_engine.generate(_request(prompt, **params)).__anext__()

    with pytest.raises(InvalidGenerationRequestError) as info:
        asyncio.run(main())
    assert info.value.param == param


def test_duplicate_request_id_is_refused(transformers_engine: Any) -> None:
    async def main() -> None:
        _slow(transformers_engine)
        prompt = transformers_engine.tokenizer().encode("Hello")
        stream = transformers_engine.generate(
            _request(prompt, request_id="dup", max_tokens=50, ignore_eos=True)
        )
        await stream.__anext__()
        try:
            with pytest.raises(InvalidGenerationRequestError, match="already running"):
                await transformers_engine.generate(_request(prompt, request_id="dup")).__anext__()
        finally:
            await stream.aclose()

    asyncio.run(main())


def test_close_aborts_running_requests_and_refuses_new_ones(serving_model_dir: pathlib.Path) -> None:
    async def main() -> tuple[list[Any], Any]:
        engine = _slow(await _engine(serving_model_dir, max_num_seqs=1))
        prompt = engine.tokenizer().encode("Hello")
        streams = [
            engine.generate(_request(prompt, request_id=f"c{i}", max_tokens=150, ignore_eos=True))
            for i in range(2)
        ]
        await streams[0].__anext__()
        waiting = asyncio.create_task(streams[1].__anext__())
        await asyncio.sleep(0.05)
        await engine.close()
        lasts = []
        last = None
        async for last in streams[0]:
            pass
        lasts.append(last)
        lasts.append(await waiting)
        with pytest.raises(EngineUnavailableError, match="closed"):
            await engine.generate(_request(prompt, request_id="late")).__anext__()
        return lasts, engine._model

    lasts, model = asyncio.run(main())
    assert [chunk.finish_reason for chunk in lasts] == ["abort", "abort"]
    assert model is None


def test_unsupported_model_and_limits_fail_the_start(
    serving_model_dir: pathlib.Path, tmp_path: pathlib.Path
) -> None:
    with pytest.raises(EngineUnavailableError, match="cannot load base model"):
        asyncio.run(_engine(tmp_path / "nothing-here"))
    with pytest.raises(InvalidGenerationRequestError, match="max_position_embeddings"):
        asyncio.run(_engine(serving_model_dir, max_model_len=100_000))
    with pytest.raises(InvalidGenerationRequestError) as info:
        asyncio.run(_engine(serving_model_dir, max_loras=0))
    assert info.value.param == "max_loras"
