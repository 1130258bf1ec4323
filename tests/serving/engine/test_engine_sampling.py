"""Sampling with vLLM's semantics, against a naive per-token oracle, and seeded determinism.

The oracle (:func:`naive_allowed`) re-derives from vLLM's documented rules, one token at a
time in plain Python, which tokens a request may draw: penalties (repetition over prompt +
output, frequency and presence over the output), temperature, ``min_p``, ``top_k`` (ties
kept), ``top_p`` (smallest set reaching ``p``, at least one). Greedy must be the argmax of the
penalized logits; a random draw must be in the allowed set; logprobs are the raw
distribution's.
"""

from __future__ import annotations

import asyncio
import math
from collections import Counter
from collections.abc import Callable, Sequence
from typing import Any

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from tensafe.serving.engine import SamplingParams
from tensafe.serving.engines._sampling import RowSampler, sample_batch

VOCAB = 12


def naive_penalized(
    logits: Sequence[float], prompt: Sequence[int], output: Sequence[int], p: SamplingParams
) -> list[float]:
    counts = Counter(output)
    out = []
    for token, value in enumerate(logits):
        if token in counts or token in prompt:
            value = value / p.repetition_penalty if value > 0 else value * p.repetition_penalty
        value -= p.frequency_penalty * counts.get(token, 0)
        value -= p.presence_penalty * (1 if token in counts else 0)
        out.append(value)
    return out


def naive_allowed(
    logits: Sequence[float], prompt: Sequence[int], output: Sequence[int], p: SamplingParams
) -> set[int]:
    values = [v / p.temperature for v in naive_penalized(logits, prompt, output, p)]
    m = max(values)
    z = sum(math.exp(v - m) for v in values)
    probs = [math.exp(v - m) / z for v in values]
    allowed = set(range(len(values)))
    if p.min_p > 0:
        top = max(probs)
        allowed = {t for t in allowed if probs[t] >= top * p.min_p * (1 - 1e-6)}
    if p.top_k > 0:
        kth = sorted((values[t] for t in allowed), reverse=True)[min(p.top_k, len(allowed)) - 1]
        allowed = {t for t in allowed if values[t] >= kth}
    if p.top_p < 1:
        # Renormalize over what is left; keep the most likely tokens until their mass reaches top_p.
        mass = sum(math.exp(values[t] - m) for t in allowed)
        ordered = sorted(allowed, key=lambda t: values[t], reverse=True)
        kept: set[int] = set()
        total = 0.0
        for t in ordered:
            kept.add(t)
            total += math.exp(values[t] - m) / mass
            if total >= p.top_p - 1e-6:
                # Ties with the last kept token stay (they have the same probability).
                kept |= {u for u in ordered if abs(values[u] - values[t]) < 1e-6}
                break
        allowed = kept
    return allowed


params_strategy = st.builds(
    SamplingParams,
    max_tokens=st.just(1),
    temperature=st.one_of(st.just(0.0), st.floats(0.05, 2.0)),
    top_p=st.one_of(st.just(1.0), st.floats(0.05, 1.0)),
    top_k=st.one_of(st.just(-1), st.integers(1, VOCAB + 2)),
    min_p=st.one_of(st.just(0.0), st.floats(0.0, 0.9)),
    repetition_penalty=st.one_of(st.just(1.0), st.floats(0.5, 2.0)),
    presence_penalty=st.one_of(st.just(0.0), st.floats(-2.0, 2.0)),
    frequency_penalty=st.one_of(st.just(0.0), st.floats(-2.0, 2.0)),
    seed=st.integers(0, 2**31),
    logprobs=st.one_of(st.none(), st.integers(0, 5)),
)


@settings(max_examples=200, deadline=None)
@given(
    params=params_strategy,
    logits=st.lists(st.floats(-6.0, 6.0), min_size=VOCAB, max_size=VOCAB),
    prompt=st.lists(st.integers(0, VOCAB - 1), min_size=1, max_size=6),
    output=st.lists(st.integers(0, VOCAB - 1), max_size=6),
)
def test_sample_follows_vllm_rules(
    params: SamplingParams, logits: list[float], prompt: list[int], output: list[int]
) -> None:
    row = RowSampler.create(params, prompt, vocab_size=VOCAB, seed=params.seed or 0)
    for token in output:
        row.record(token)
    tensor = torch.tensor([logits], dtype=torch.float32)
    (token,), (logprob,) = sample_batch(tensor, [row])
    if params.temperature == 0.0:
        penalized = naive_penalized(logits, prompt, output, params)
        assert penalized[token] >= max(penalized) - 1e-5
    else:
        assert token in naive_allowed(logits, prompt, output, params)
    if params.logprobs is None:
        assert logprob is None
    else:
        assert logprob is not None
        raw = torch.log_softmax(tensor[0].double(), dim=-1)
        assert logprob.token_id == token
        assert logprob.logprob == pytest.approx(float(raw[token]), abs=1e-5)
        assert len(logprob.top) == params.logprobs
        best = sorted(range(VOCAB), key=lambda t: float(raw[t]), reverse=True)[: params.logprobs]
        assert sorted(logprob.top.values(), reverse=True) == pytest.approx(
            [float(raw[t]) for t in best], abs=1e-5
        )
    assert row.output_counts is None or float(row.output_counts[token]) == output.count(token) + 1


def test_draws_follow_the_filtered_distribution() -> None:
    """Over many seeds, frequencies match softmax(logits / T) restricted to the top-k and renormalized."""
    logits = torch.tensor([[2.0, 1.5, 1.0, 0.0, -1.0, -3.0]])
    params = SamplingParams(max_tokens=1, temperature=0.7, top_k=3)
    counts: Counter[int] = Counter()
    n = 4000
    for seed in range(n):
        (token,), _ = sample_batch(logits, [RowSampler.create(params, [0], vocab_size=6, seed=seed)])
        counts[token] += 1
    kept = torch.softmax(logits[0, :3] / 0.7, dim=-1)
    assert set(counts) <= {0, 1, 2}
    for token in range(3):
        assert counts[token] / n == pytest.approx(float(kept[token]), abs=0.03)


def test_rows_of_one_batch_use_their_own_generators() -> None:
    """A seeded row draws the same token whatever shares its batch."""
    logits = torch.randn(5, 50, generator=torch.Generator().manual_seed(1))
    params = SamplingParams(max_tokens=1, temperature=1.0, seed=7)

    def alone(i: int) -> int:
        (token,), _ = sample_batch(logits[i : i + 1], [RowSampler.create(params, [0], vocab_size=50, seed=7)])
        return token

    rows = [RowSampler.create(params, [0], vocab_size=50, seed=7) for _ in range(5)]
    together, _ = sample_batch(logits, rows)
    assert together == [alone(i) for i in range(5)]


def test_seeded_requests_are_reproducible_and_seeds_matter(
    transformers_engine: Any, run_request: Callable[..., Any]
) -> None:
    prompt = transformers_engine.tokenizer().encode("Tell me a story about")

    async def main() -> tuple[Any, ...]:
        kwargs = {"max_tokens": 16, "temperature": 1.0, "top_p": 0.95, "ignore_eos": True}
        first = await run_request(transformers_engine, prompt, seed=1234, **kwargs)
        # Same seed while other requests share the batch.
        crowd = [run_request(transformers_engine, prompt, seed=s, **kwargs) for s in (1, 2, 3)]
        again, *_ = await asyncio.gather(
            run_request(transformers_engine, prompt, seed=1234, **kwargs), *crowd
        )
        other = await run_request(transformers_engine, prompt, seed=4321, **kwargs)
        return first, again, other

    first, again, other = asyncio.run(main())
    assert first.tokens == again.tokens
    assert first.text == again.text
    assert first.tokens != other.tokens


def test_repetition_penalty_changes_greedy_output_as_the_oracle_says(
    transformers_engine: Any, run_request: Callable[..., Any], serving_model_dir: Any
) -> None:
    """Greedy with penalties: each step's token is the argmax of the naively penalized raw logits."""
    prompt = transformers_engine.tokenizer().encode("the the the the")
    params = {"repetition_penalty": 1.7, "frequency_penalty": 0.4, "presence_penalty": 0.3}
    result = asyncio.run(
        run_request(
            transformers_engine, prompt, max_tokens=8, temperature=0.0, ignore_eos=True, logprobs=0, **params
        )
    )
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(str(serving_model_dir), dtype=torch.float32).eval()
    ids = list(prompt)
    p = SamplingParams(max_tokens=8, **params)
    with torch.no_grad():
        for step, token in enumerate(result.tokens):
            raw = model(input_ids=torch.tensor([ids])).logits[0, -1].tolist()
            penalized = naive_penalized(raw, prompt, result.tokens[:step], p)
            assert penalized[token] >= max(penalized) - 1e-4
            ids.append(token)
    plain = asyncio.run(
        run_request(transformers_engine, prompt, max_tokens=8, temperature=0.0, ignore_eos=True)
    )
    assert plain.tokens != result.tokens
