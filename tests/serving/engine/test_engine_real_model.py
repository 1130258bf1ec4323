"""The engine on the real SmolLM2-135M-Instruct: a served adapter's greedy output and logprobs
equal transformers + PEFT (the same independent reference as on the tiny model), mixed with
a base-model request in the same batch."""

from __future__ import annotations

import asyncio
from collections.abc import Callable
from typing import Any

import pytest

REAL = "HuggingFaceTB/SmolLM2-135M-Instruct"


@pytest.mark.slow
@pytest.mark.realmodel
def test_smollm2_adapter_and_base_equal_the_reference(
    peft_reference: Callable[..., Any], make_lora_adapter: Callable[..., Any], run_request: Callable[..., Any]
) -> None:
    from tensafe.serving.engines.transformers import TransformersEngine
    from tensafe.training.models import resolve_model

    model_dir = resolve_model(REAL).path
    adapter = make_lora_adapter(model_dir, rank=8, seed=1, adapter_id="real", base_model_id=REAL)
    messages = [{"role": "user", "content": "Name three colours."}]

    async def main() -> tuple[list[int], Any, Any]:
        engine = await TransformersEngine.start(
            REAL, max_loras=2, max_lora_rank=8, max_num_seqs=4, max_model_len=512
        )
        try:
            await engine.load_adapter(adapter)
            tok: Any = engine.tokenizer()
            encoded = tok.apply_chat_template(messages, add_generation_prompt=True, tokenize=True)
            prompt = [int(t) for t in encoded["input_ids"]]
            served, base = await asyncio.gather(
                run_request(
                    engine,
                    prompt,
                    adapter_id="real",
                    max_tokens=12,
                    temperature=0.0,
                    logprobs=2,
                    ignore_eos=True,
                ),
                run_request(engine, prompt, max_tokens=12, temperature=0.0, logprobs=2, ignore_eos=True),
            )
            return prompt, served, base
        finally:
            await engine.close()

    prompt, served, base = asyncio.run(main())
    for result, ref_adapter in ((served, adapter), (base, None)):
        ref = peft_reference(model_dir, ref_adapter, prompt, max_tokens=12, top=2)
        assert result.tokens == ref.tokens
        for got, want in zip(result.logprobs, ref.logprobs):
            assert got == pytest.approx(want, abs=1e-3)
        for got_top, want_top in zip(result.top, ref.top):
            assert set(got_top) == set(want_top)
    assert served.tokens != base.tokens
