"""How a request ends: stop strings (cut out, never streamed then retracted), stop tokens, EOS,
``max_tokens``, the context length; and incremental detokenization equal to a full decode."""

from __future__ import annotations

import asyncio
from collections.abc import Callable
from typing import Any

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from tensafe.serving.engines._detok import Detokenizer


def _greedy(engine: Any, run_request: Callable[..., Any], prompt: list[int], **kwargs: Any) -> Any:
    kwargs.setdefault("max_tokens", 24)
    return asyncio.run(run_request(engine, prompt, temperature=0.0, ignore_eos=True, **kwargs))


def test_stop_string_is_cut_out_and_ends_the_request(
    transformers_engine: Any, run_request: Callable[..., Any]
) -> None:
    prompt = transformers_engine.tokenizer().encode("Once upon a time")
    free = _greedy(transformers_engine, run_request, prompt)
    assert len(free.text) > 12
    # A stop string that starts inside the output and spans a token boundary.
    start = len(free.text) // 3
    stop = free.text[start : start + 5]
    assert stop.strip()
    at = free.text.find(stop)
    stopped = _greedy(transformers_engine, run_request, prompt, stop=(stop, "never-in-the-output"))
    assert stopped.finish_reason == "stop"
    assert stopped.text == free.text[:at]
    assert stop not in stopped.text
    # Tokens are those of the free run up to the one that completed the stop string.
    assert stopped.tokens == free.tokens[: len(stopped.tokens)]
    # No chunk streamed a part of the stop string that was later retracted.
    streamed = ""
    for chunk in stopped.chunks:
        streamed += chunk.text
        assert free.text.startswith(streamed)
        assert len(streamed) <= at


def test_stop_token_ids_and_eos(transformers_engine: Any, run_request: Callable[..., Any]) -> None:
    tok = transformers_engine.tokenizer()
    prompt = tok.encode("A list of fruits: apple, banana,")
    free = _greedy(transformers_engine, run_request, prompt, max_tokens=10)
    target = free.tokens[4]
    first = free.tokens.index(target)
    stopped = _greedy(transformers_engine, run_request, prompt, max_tokens=10, stop_token_ids=(target,))
    assert stopped.finish_reason == "stop"
    assert stopped.tokens == free.tokens[: first + 1]  # The stop token is in the ids ...
    assert stopped.text == tok.decode(free.tokens[:first], skip_special_tokens=True)  # ... not in the text.
    # EOS stops unless ignore_eos: make the engine's EOS set the token the model produces.
    eos = transformers_engine._eos
    transformers_engine._eos = frozenset({target})
    try:
        at_eos = asyncio.run(run_request(transformers_engine, prompt, max_tokens=10, temperature=0.0))
        ignored = _greedy(transformers_engine, run_request, prompt, max_tokens=10)
    finally:
        transformers_engine._eos = eos
    assert at_eos.finish_reason == "stop" and at_eos.tokens == free.tokens[: first + 1]
    assert ignored.finish_reason == "length" and ignored.tokens == free.tokens


def test_max_tokens_and_context_length(transformers_engine: Any, run_request: Callable[..., Any]) -> None:
    tok = transformers_engine.tokenizer()
    prompt = tok.encode("Hello")
    short = _greedy(transformers_engine, run_request, prompt, max_tokens=3)
    assert short.finish_reason == "length" and len(short.tokens) == 3
    # The context (256 tokens) ends the request before max_tokens.
    long_prompt = (prompt * 300)[:250]
    capped = _greedy(transformers_engine, run_request, long_prompt, max_tokens=100)
    assert capped.finish_reason == "length"
    assert len(long_prompt) + len(capped.tokens) == transformers_engine.max_model_len
    assert capped.chunks[-1].completion_tokens == 6


TEXTS = st.text(
    alphabet=st.sampled_from([*"abc XYZ.,!?\n\t", "é", "ü", "你", "好", "🙂", "—", "ß"]),
    max_size=40,
)


@settings(max_examples=60, deadline=None)
@given(prompt=TEXTS, output=TEXTS.filter(bool))
def test_incremental_detokenization_equals_full_decode(tiny_tokenizer: Any, prompt: str, output: str) -> None:
    prompt_ids = tiny_tokenizer.encode(prompt or "x")
    output_ids = tiny_tokenizer.encode(output)
    detok = Detokenizer(tiny_tokenizer, prompt_ids, ())
    streamed = ""
    for token in output_ids:
        assert not detok.add(token)
        streamed += detok.delta(finished=False)
        assert "\ufffd" not in streamed or "\ufffd" in output
    detok.finish()
    streamed += detok.delta(finished=True)
    assert streamed == tiny_tokenizer.decode(
        output_ids, skip_special_tokens=True, clean_up_tokenization_spaces=False
    )
    assert streamed == output


@settings(max_examples=60, deadline=None)
@given(output=TEXTS.filter(lambda s: len(s) >= 2), data=st.data())
def test_stop_string_cut_matches_str_find(tiny_tokenizer: Any, output: str, data: Any) -> None:
    i = data.draw(st.integers(0, len(output) - 1))
    j = data.draw(st.integers(i + 1, min(len(output), i + 6)))
    stop = output[i:j]
    detok = Detokenizer(tiny_tokenizer, tiny_tokenizer.encode("x"), (stop,))
    streamed = ""
    for token in tiny_tokenizer.encode(output):
        hit = detok.add(token)
        streamed += detok.delta(finished=hit)
        if hit:
            break
    else:
        detok.finish()
        streamed += detok.delta(finished=True)
    assert streamed == output[: output.find(stop)]


@pytest.fixture(scope="module")
def tiny_tokenizer() -> Any:
    from tensafe.training.models import load_tokenizer

    return load_tokenizer("HuggingFaceTB/SmolLM2-135M-Instruct")
