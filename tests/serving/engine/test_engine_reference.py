"""The engine's greedy output and logprobs equal an independent reference, alone and mixed.

The reference (``peft_reference``) is plain transformers + ``peft.PeftModel`` loaded from the
adapter's files, one full forward per token with no KV cache; the engine batches, left-pads,
caches and adds per-row LoRA updates from stacked slots. Tokens must be equal and logprobs
(with the top-k alternatives) agree to 1e-3.
"""

from __future__ import annotations

import asyncio
import pathlib
from collections.abc import Callable
from typing import Any

import pytest

PROMPTS = (
    "The capital of France is",
    "Once upon a time",
    "def fibonacci(n):",
    "Hello",
    "A list of fruits: apple, banana,",
)
TOL = 1e-3


def _encode(engine: Any, text: str) -> list[int]:
    ids: list[int] = engine.tokenizer().encode(text)
    return ids


def _assert_matches(result: Any, ref: Any, *, top: int) -> None:
    assert result.tokens == ref.tokens
    assert len(result.logprobs) == len(ref.logprobs)
    for got, want in zip(result.logprobs, ref.logprobs):
        assert got == pytest.approx(want, abs=TOL)
    if top:
        for got_top, want_top in zip(result.top, ref.top):
            assert set(got_top) == set(want_top)
            for token, value in want_top.items():
                assert got_top[token] == pytest.approx(value, abs=TOL)


def test_base_model_rows_equal_plain_transformers(
    transformers_engine: Any,
    serving_model_dir: pathlib.Path,
    peft_reference: Callable[..., Any],
    run_request: Any,
) -> None:
    prompt = _encode(transformers_engine, PROMPTS[0])
    result = asyncio.run(
        run_request(transformers_engine, prompt, max_tokens=10, temperature=0.0, logprobs=3, ignore_eos=True)
    )
    ref = peft_reference(serving_model_dir, None, prompt, max_tokens=10, top=3)
    _assert_matches(result, ref, top=3)
    assert result.finish_reason == "length"
    assert result.chunks[-1].completion_tokens == 10
    assert result.chunks[-1].prompt_tokens == len(prompt)


@pytest.mark.parametrize(
    ("rank", "targets"), [(4, None), (8, ("q_proj", "v_proj")), (2, ("down_proj", "o_proj"))]
)
def test_adapter_alone_equals_peft(
    transformers_engine: Any,
    serving_model_dir: pathlib.Path,
    make_lora_adapter: Callable[..., Any],
    peft_reference: Callable[..., Any],
    run_request: Any,
    rank: int,
    targets: tuple[str, ...] | None,
) -> None:
    kwargs = {"targets": targets} if targets else {}
    adapter = make_lora_adapter(serving_model_dir, rank=rank, seed=rank, adapter_id="solo", **kwargs)
    asyncio.run(transformers_engine.load_adapter(adapter))
    prompt = _encode(transformers_engine, PROMPTS[1])
    result = asyncio.run(
        run_request(
            transformers_engine,
            prompt,
            adapter_id="solo",
            max_tokens=12,
            temperature=0.0,
            logprobs=2,
            ignore_eos=True,
        )
    )
    ref = peft_reference(serving_model_dir, adapter, prompt, max_tokens=12, top=2)
    _assert_matches(result, ref, top=2)
    # The adapter matters: the base model's answer differs.
    base = peft_reference(serving_model_dir, None, prompt, max_tokens=12)
    assert base.tokens != ref.tokens


def test_mixed_batch_gives_each_request_its_own_adapter(
    serving_model_dir: pathlib.Path,
    make_lora_adapter: Callable[..., Any],
    peft_reference: Callable[..., Any],
    run_request: Any,
) -> None:
    """Three adapters (ranks 2, 4, 8) and the base model, prompts of different lengths, run concurrently."""
    from tensafe.serving.engines.transformers import TransformersEngine

    adapters = [
        make_lora_adapter(serving_model_dir, rank=r, seed=10 + r, adapter_id=f"mix-{r}") for r in (2, 4, 8)
    ]
    plan = [
        ("mix-2", PROMPTS[0]),
        ("mix-4", PROMPTS[2]),
        ("mix-8", PROMPTS[3]),
        (None, PROMPTS[4]),
        ("mix-4", PROMPTS[3]),
    ]
    steps: list[int] = []

    async def main() -> list[Any]:
        engine = await TransformersEngine.start(
            str(serving_model_dir),
            model_name="tensafe-test/tiny-llama",
            max_loras=3,
            max_lora_rank=8,
            max_num_seqs=8,
            max_model_len=128,
        )
        try:
            for adapter in adapters:
                await engine.load_adapter(adapter)
            forward = engine._forward

            def counting(input_ids: Any, **kwargs: Any) -> Any:
                steps.append(int(input_ids.shape[0]))
                return forward(input_ids, **kwargs)

            engine._forward = counting  # type: ignore[method-assign]
            tok = engine.tokenizer()
            return list(
                await asyncio.gather(
                    *(
                        run_request(
                            engine,
                            tok.encode(text),
                            adapter_id=aid,
                            max_tokens=10,
                            temperature=0.0,
                            logprobs=1,
                            ignore_eos=True,
                        )
                        for aid, text in plan
                    )
                )
            )
        finally:
            await engine.close()

    results = asyncio.run(main())
    # They really shared the batch: some decode step ran all five rows.
    assert max(steps) == len(plan)
    by_id = {a.adapter_id: a for a in adapters}
    tokenizer_outputs = set()
    for (aid, text), result in zip(plan, results):
        from tensafe.training.models import load_tokenizer

        prompt = load_tokenizer(str(serving_model_dir)).encode(text)
        ref = peft_reference(serving_model_dir, by_id.get(aid) if aid else None, prompt, max_tokens=10, top=1)
        _assert_matches(result, ref, top=1)
        tokenizer_outputs.add(tuple(result.tokens))
    assert len(tokenizer_outputs) == len(plan)


def test_adapter_slot_contention_queues_instead_of_mixing_weights(
    serving_model_dir: pathlib.Path,
    make_lora_adapter: Callable[..., Any],
    peft_reference: Callable[..., Any],
    run_request: Any,
) -> None:
    """One LoRA slot, two adapters requested at once: the second waits for the slot, both are right."""
    from tensafe.serving.engines.transformers import TransformersEngine

    a = make_lora_adapter(serving_model_dir, rank=4, seed=21, adapter_id="one")
    b = make_lora_adapter(serving_model_dir, rank=4, seed=22, adapter_id="two")

    async def main() -> list[Any]:
        engine = await TransformersEngine.start(
            str(serving_model_dir),
            model_name="tensafe-test/tiny-llama",
            max_loras=1,
            max_lora_rank=4,
            max_num_seqs=4,
        )
        try:
            await engine.load_adapter(a)
            await engine.load_adapter(b)
            prompt = engine.tokenizer().encode(PROMPTS[0])
            return list(
                await asyncio.gather(
                    run_request(
                        engine, prompt, adapter_id="one", max_tokens=6, temperature=0.0, ignore_eos=True
                    ),
                    run_request(
                        engine, prompt, adapter_id="two", max_tokens=6, temperature=0.0, ignore_eos=True
                    ),
                    run_request(engine, prompt, max_tokens=6, temperature=0.0, ignore_eos=True),
                )
            )
        finally:
            await engine.close()

    first, second, base = asyncio.run(main())
    from tensafe.training.models import load_tokenizer

    prompt = load_tokenizer(str(serving_model_dir)).encode(PROMPTS[0])
    assert first.tokens == peft_reference(serving_model_dir, a, prompt, max_tokens=6).tokens
    assert second.tokens == peft_reference(serving_model_dir, b, prompt, max_tokens=6).tokens
    assert base.tokens == peft_reference(serving_model_dir, None, prompt, max_tokens=6).tokens
