"""Sampling and prompt scoring of the training runtime against naive full-forward loops."""

from __future__ import annotations

import pathlib
from typing import Any

import numpy as np
import pytest
import torch

from tensafe.training.runtime import (
    AdamParams,
    Datum,
    InvalidRequestError,
    LoraTrainingSession,
    SamplingSession,
)

PROMPT = [1, 17, 42, 99, 7]


@pytest.fixture(scope="module")
def session(tiny_model_dir: pathlib.Path) -> LoraTrainingSession:
    s = LoraTrainingSession.create(
        base_model=str(tiny_model_dir), rank=4, dp=None, seed=0, allow_non_private=True
    )
    # Sharpen the random tiny model so that greedy paths are unambiguous and the LoRA matters.
    g = torch.Generator().manual_seed(5)
    with torch.no_grad():
        for name, p in s.model.named_parameters():
            if p.requires_grad and "lora_B" in name:
                p.copy_(torch.randn(p.shape, generator=g) * 0.5)
    return s


def _naive_logprobs(model: Any, tokens: list[int]) -> torch.Tensor:
    with torch.no_grad():
        return torch.log_softmax(model(input_ids=torch.tensor([tokens])).logits[0].double(), dim=-1)


def _naive_greedy(model: Any, prompt: list[int], n: int) -> list[int]:
    seq = list(prompt)
    for _ in range(n):
        seq.append(int(torch.argmax(_naive_logprobs(model, seq)[-1])))
    return seq[len(prompt) :]


def test_temperature_zero_is_the_argmax_loop(session: LoraTrainingSession) -> None:
    out = session.sample(PROMPT, max_tokens=8, temperature=0.0, stop=[])
    seq = out.sequences[0]
    assert seq.tokens == _naive_greedy(session.model, PROMPT, 8)
    assert seq.stop_reason == "length"
    assert out.prompt_logprobs is None and out.topk_prompt_logprobs is None


def test_top_k_one_and_tiny_top_p_equal_greedy(session: LoraTrainingSession) -> None:
    greedy = session.sample(PROMPT, max_tokens=6, temperature=0.0, stop=[]).sequences[0].tokens
    for kwargs in ({"top_k": 1}, {"top_p": 1e-9}):
        out = session.sample(PROMPT, max_tokens=6, temperature=1.0, seed=11, stop=[], **kwargs)
        assert out.sequences[0].tokens == greedy


def test_logprobs_are_those_of_the_model(session: LoraTrainingSession) -> None:
    out = session.sample(PROMPT, max_tokens=6, temperature=0.7, top_k=50, seed=3, stop=[], num_samples=2)
    for seq in out.sequences:
        full = PROMPT + seq.tokens
        lp = _naive_logprobs(session.model, full)
        expected = [float(lp[len(PROMPT) - 1 + i, t]) for i, t in enumerate(seq.tokens)]
        np.testing.assert_allclose(seq.logprobs, expected, rtol=1e-4, atol=1e-4)


def test_seed_reproducibility_and_num_samples(session: LoraTrainingSession) -> None:
    a = session.sample(PROMPT, max_tokens=10, seed=123, num_samples=3, stop=[])
    b = session.sample(PROMPT, max_tokens=10, seed=123, num_samples=3, stop=[])
    c = session.sample(PROMPT, max_tokens=10, seed=124, num_samples=3, stop=[])
    assert len(a.sequences) == 3
    assert all(len(s.tokens) == 10 and len(s.logprobs) == 10 for s in a.sequences)
    assert [s.tokens for s in a.sequences] == [s.tokens for s in b.sequences]
    assert [s.tokens for s in a.sequences] != [s.tokens for s in c.sequences]
    assert len({tuple(s.tokens) for s in a.sequences}) > 1  # the samples of one request differ


def test_stop_tokens(session: LoraTrainingSession) -> None:
    greedy = _naive_greedy(session.model, PROMPT, 8)
    stop_tok = greedy[3]
    first = greedy.index(stop_tok)
    out = session.sample(PROMPT, max_tokens=8, temperature=0.0, stop=[stop_tok, 48000])
    seq = out.sequences[0]
    assert seq.tokens == greedy[: first + 1]  # the stop token is included
    assert seq.stop_reason == "stop"


def test_stop_strings(session: LoraTrainingSession) -> None:
    greedy = _naive_greedy(session.model, PROMPT, 8)
    tok = session.tokenizer
    target = tok.decode(greedy[2:4])
    expected_len = next(i + 1 for i in range(8) if target in tok.decode(greedy[: i + 1]))
    out = session.sample(PROMPT, max_tokens=8, temperature=0.0, stop=target)
    assert out.sequences[0].tokens == greedy[:expected_len]
    assert out.sequences[0].stop_reason == "stop"
    out2 = session.sample(PROMPT, max_tokens=8, temperature=0.0, stop=["never-appears-xyz", target])
    assert out2.sequences[0].tokens == greedy[:expected_len]


def test_default_stop_is_eos(session: LoraTrainingSession) -> None:
    eos = session.tokenizer.eos_token_id
    out = session.sample(PROMPT, max_tokens=12, seed=1, num_samples=4)
    for seq in out.sequences:
        if seq.stop_reason == "stop":
            assert seq.tokens[-1] == eos and eos not in seq.tokens[:-1]
        else:
            assert len(seq.tokens) == 12 and eos not in seq.tokens


def test_prompt_logprobs_and_compute_logprobs_match_naive_forward(session: LoraTrainingSession) -> None:
    lp = _naive_logprobs(session.model, PROMPT)
    expected = [None] + [float(lp[i - 1, PROMPT[i]]) for i in range(1, len(PROMPT))]
    got = session.compute_logprobs(PROMPT)
    assert got[0] is None
    np.testing.assert_allclose(got[1:], expected[1:], rtol=1e-5, atol=1e-5)
    out = session.sample(PROMPT, max_tokens=1, include_prompt_logprobs=True, topk_prompt_logprobs=3, seed=0)
    assert out.prompt_logprobs is not None and out.prompt_logprobs[0] is None
    np.testing.assert_allclose(out.prompt_logprobs[1:], expected[1:], rtol=1e-5, atol=1e-5)
    top = out.topk_prompt_logprobs
    assert top is not None and top[0] is None and len(top) == len(PROMPT)
    for i in range(1, len(PROMPT)):
        row = top[i]
        assert row is not None and len(row) == 3
        ref_vals, ref_idx = torch.topk(lp[i - 1], 3)
        assert [t for t, _ in row] == ref_idx.tolist()
        np.testing.assert_allclose([v for _, v in row], ref_vals.numpy(), rtol=1e-5, atol=1e-5)
    assert session.compute_logprobs([5]) == [None]


def test_sampling_uses_the_lora_weights(tiny_model_dir: pathlib.Path, session: LoraTrainingSession) -> None:
    base = SamplingSession.for_base_model(str(tiny_model_dir))
    assert base.compute_logprobs(PROMPT) != session.compute_logprobs(PROMPT)
    adapted = SamplingSession.from_adapter_files(str(tiny_model_dir), session.sampler_weights_files())
    np.testing.assert_allclose(
        adapted.compute_logprobs(PROMPT)[1:], session.compute_logprobs(PROMPT)[1:], rtol=1e-5, atol=1e-6
    )
    greedy = session.sample(PROMPT, max_tokens=5, temperature=0.0, stop=[]).sequences[0].tokens
    assert adapted.sample(PROMPT, max_tokens=5, temperature=0.0, stop=[]).sequences[0].tokens == greedy
    with pytest.raises(InvalidRequestError, match="exactly the files"):
        SamplingSession.from_adapter_files(str(tiny_model_dir), {"x": b""})


def test_sampling_follows_training(tiny_model_dir: pathlib.Path) -> None:
    s = LoraTrainingSession.create(
        base_model=str(tiny_model_dir), rank=2, dp=None, seed=0, allow_non_private=True
    )
    before = s.compute_logprobs(PROMPT)
    target = np.array([*PROMPT[1:], 3], dtype=np.int64)
    s.forward_backward([Datum(PROMPT, {"target_tokens": target})], "cross_entropy")
    s.optim_step(AdamParams(learning_rate=1e-2))
    after = s.compute_logprobs(PROMPT)
    assert sum(after[1:]) > sum(before[1:])  # type: ignore[arg-type]


@pytest.mark.parametrize(
    ("kwargs", "message"),
    [
        ({"max_tokens": 0}, "max_tokens"),
        ({"max_tokens": 2, "temperature": -1.0}, "temperature"),
        ({"max_tokens": 2, "top_k": 0}, "top_k"),
        ({"max_tokens": 2, "top_p": 0.0}, "top_p"),
        ({"max_tokens": 2, "num_samples": 0}, "num_samples"),
        ({"max_tokens": 2, "stop": [1, "a"]}, "not mixed"),
        ({"max_tokens": 2, "stop": [""]}, "must not be empty"),
        ({"max_tokens": 2, "stop": [10**9]}, "stop token ids"),
        ({"max_tokens": 10**6}, "exceeds the model's context"),
        ({"max_tokens": 2, "topk_prompt_logprobs": 1000}, "topk_prompt_logprobs"),
        ({"max_tokens": 2, "seed": "x"}, "seed"),
    ],
)
def test_invalid_sampling_parameters(
    session: LoraTrainingSession, kwargs: dict[str, Any], message: str
) -> None:
    with pytest.raises(InvalidRequestError, match=message):
        session.sample(PROMPT, **kwargs)


def test_invalid_prompts(session: LoraTrainingSession) -> None:
    for prompt, message in (
        ([], "empty"),
        ([1, 10**9], "outside"),
        ("abc", "list of token ids"),
        ([1.5], "integer"),
    ):
        with pytest.raises(InvalidRequestError, match=message):
            session.sample(prompt, max_tokens=1)  # type: ignore[arg-type]
        with pytest.raises(InvalidRequestError, match=message):
            session.compute_logprobs(prompt)  # type: ignore[arg-type]


def test_tiny_temperature_is_numerically_greedy(session: LoraTrainingSession) -> None:
    greedy = session.sample(PROMPT, max_tokens=4, temperature=0.0, stop=[]).sequences[0].tokens
    out = session.sample(PROMPT, max_tokens=4, temperature=1e-30, seed=2, stop=[])
    assert out.sequences[0].tokens == greedy


def test_numpy_token_arrays_are_accepted(session: LoraTrainingSession) -> None:
    as_list = session.compute_logprobs(PROMPT)
    assert session.compute_logprobs(np.array(PROMPT, dtype=np.int64)) == as_list
    with pytest.raises(InvalidRequestError, match="1-D array"):
        session.compute_logprobs(np.array(PROMPT, dtype=np.float32))  # type: ignore[arg-type]


def _nucleus(logp: torch.Tensor, top_p: float) -> set[int]:
    """Naive nucleus: add tokens by decreasing probability until the mass reaches top_p."""
    probs = logp.exp()
    order = torch.argsort(probs, descending=True).tolist()
    kept, mass = set(), 0.0
    for t in order:
        kept.add(t)
        mass += float(probs[t])
        if mass >= top_p:
            break
    return kept


@pytest.mark.parametrize(("top_k", "top_p", "temperature"), [(3, 1.0, 1.0), (-1, 0.02, 1.0), (5, 0.5, 0.5)])
def test_sampled_tokens_stay_in_the_filtered_support(
    session: LoraTrainingSession, top_k: int, top_p: float, temperature: float
) -> None:
    out = session.sample(
        PROMPT,
        max_tokens=5,
        temperature=temperature,
        top_k=top_k,
        top_p=top_p,
        seed=9,
        num_samples=4,
        stop=[],
    )
    for seq in out.sequences:
        full = PROMPT + seq.tokens
        lp = _naive_logprobs(session.model, full)
        for i, tok in enumerate(seq.tokens):
            row = torch.log_softmax(lp[len(PROMPT) - 1 + i] / temperature, dim=-1)
            allowed = set(range(row.shape[0]))
            if top_k != -1:
                allowed &= set(torch.topk(row, top_k).indices.tolist())
                row = torch.log_softmax(
                    torch.full_like(row, float("-inf")).index_copy(
                        0, torch.tensor(sorted(allowed)), row[sorted(allowed)]
                    ),
                    dim=-1,
                )
            if top_p < 1.0:
                allowed &= _nucleus(row, top_p)
            assert tok in allowed
