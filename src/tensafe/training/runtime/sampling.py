"""Autoregressive sampling and prompt scoring with Tinker's semantics.

* ``temperature == 0`` is greedy decoding (``top_k``/``top_p`` are then irrelevant).
* Otherwise logits are divided by the temperature, restricted to the ``top_k`` most likely
  tokens (``-1``: no limit), then to the smallest set whose probability reaches ``top_p``,
  and one token is drawn.
* Reported log-probabilities are those of the unmodified model distribution (temperature 1,
  no filtering), which is what the learner computes for the same tokens.
* ``stop``: ``None`` stops at the model's EOS token(s); ``[]`` never stops early; a list of
  token ids stops after one of them is generated (it is included in the output); a string or
  a list of strings stops as soon as the decoded continuation contains one of them (the
  token that completed it is included). The stop reason is then ``"stop"``; reaching
  ``max_tokens`` gives ``"length"``.
* With a ``seed``, the same request gives the same samples; without one, the seed is drawn
  from the operating system.
"""

from __future__ import annotations

import math
import os
from collections.abc import Sequence
from typing import Any

import numpy as np
import torch

from tensafe.training.runtime.errors import InvalidRequestError
from tensafe.training.runtime.types import SampledSequence, SampleResult, StopReason

__all__ = ["MAX_NUM_SAMPLES", "MAX_TOPK", "check_tokens", "prompt_scores", "sample"]

#: Upper bound of ``num_samples`` in one request.
MAX_NUM_SAMPLES = 128
#: Upper bound of ``topk_prompt_logprobs``.
MAX_TOPK = 64


def check_tokens(tokens: object, *, vocab_size: int, max_length: int, what: str) -> list[int]:
    """Return ``tokens`` as a list of ints after checking range and length.

    Raises:
        InvalidRequestError: If a token is not an int in ``[0, vocab_size)`` or the sequence is
            empty or longer than ``max_length``.
    """
    if isinstance(tokens, np.ndarray):
        if tokens.ndim != 1 or tokens.dtype.kind not in "iu":
            raise InvalidRequestError(f"{what} must be a 1-D array of integer token ids")
        tokens = tokens.tolist()
    if isinstance(tokens, str | bytes) or not isinstance(tokens, Sequence):
        raise InvalidRequestError(f"{what} must be a list of token ids")
    out: list[int] = []
    for t in tokens:
        if isinstance(t, np.integer):
            t = int(t)
        if isinstance(t, bool) or not isinstance(t, int):
            raise InvalidRequestError(f"{what} must contain integer token ids")
        if not 0 <= t < vocab_size:
            raise InvalidRequestError(f"{what} holds token id {t} outside [0, {vocab_size})")
        out.append(int(t))
    if not out:
        raise InvalidRequestError(f"{what} is empty")
    if len(out) > max_length:
        raise InvalidRequestError(f"{what} has {len(out)} tokens; the model accepts at most {max_length}")
    return out


def _stop_spec(stop: object, *, vocab_size: int, eos_ids: Sequence[int]) -> tuple[set[int], list[str]]:
    if stop is None:
        return set(eos_ids), []
    if isinstance(stop, str):
        if not stop:
            raise InvalidRequestError("a stop string must not be empty")
        return set(), [stop]
    if not isinstance(stop, Sequence):
        raise InvalidRequestError("stop must be a string, a list of strings or a list of token ids")
    items = list(stop)
    if all(isinstance(s, str) for s in items):
        if any(not s for s in items):
            raise InvalidRequestError("a stop string must not be empty")
        return set(), [str(s) for s in items]
    if all(isinstance(s, int) and not isinstance(s, bool) for s in items):
        ids = {int(s) for s in items}
        if any(not 0 <= s < vocab_size for s in ids):
            raise InvalidRequestError(f"stop token ids must be in [0, {vocab_size})")
        return ids, []
    raise InvalidRequestError("stop must be a string, a list of strings or a list of token ids (not mixed)")


def _check_params(
    *,
    max_tokens: object,
    temperature: object,
    top_k: object,
    top_p: object,
    num_samples: object,
    seed: object,
) -> None:
    if isinstance(max_tokens, bool) or not isinstance(max_tokens, int) or max_tokens < 1:
        raise InvalidRequestError(f"max_tokens must be a positive integer, got {max_tokens!r}")
    if (
        isinstance(temperature, bool)
        or not isinstance(temperature, int | float)
        or not math.isfinite(temperature)
        or temperature < 0
    ):
        raise InvalidRequestError(f"temperature must be a finite number >= 0, got {temperature!r}")
    if isinstance(top_k, bool) or not isinstance(top_k, int) or (top_k != -1 and top_k < 1):
        raise InvalidRequestError(f"top_k must be -1 (no limit) or a positive integer, got {top_k!r}")
    if isinstance(top_p, bool) or not isinstance(top_p, int | float) or not 0 < top_p <= 1:
        raise InvalidRequestError(f"top_p must be in (0, 1], got {top_p!r}")
    if (
        isinstance(num_samples, bool)
        or not isinstance(num_samples, int)
        or not 1 <= num_samples <= MAX_NUM_SAMPLES
    ):
        raise InvalidRequestError(f"num_samples must be in [1, {MAX_NUM_SAMPLES}], got {num_samples!r}")
    if seed is not None and (isinstance(seed, bool) or not isinstance(seed, int)):
        raise InvalidRequestError(f"seed must be an integer, got {seed!r}")


def _filter(logits: torch.Tensor, *, temperature: float, top_k: int, top_p: float) -> torch.Tensor:
    """Return the sampling log-weights (``-inf`` for excluded tokens), shape ``[B, V]``."""
    # Shift first so that the largest logit is 0: tiny temperatures then give -inf, never NaN.
    scaled = (logits - logits.max(dim=-1, keepdim=True).values) / temperature
    if top_k != -1 and top_k < scaled.shape[-1]:
        kth = torch.topk(scaled, top_k, dim=-1).values[..., -1:]
        scaled = scaled.masked_fill(scaled < kth, float("-inf"))
    if top_p < 1.0:
        sorted_logits, order = torch.sort(scaled, dim=-1, descending=True)
        probs = torch.softmax(sorted_logits, dim=-1)
        before = torch.cumsum(probs, dim=-1) - probs  # probability mass strictly before each token
        drop_sorted = before >= top_p
        drop_sorted[..., 0] = False
        drop = torch.zeros_like(drop_sorted).scatter(-1, order, drop_sorted)
        scaled = scaled.masked_fill(drop, float("-inf"))
    return scaled


def _eval_logits(model: Any, ids: torch.Tensor, past: Any = None) -> tuple[torch.Tensor, Any]:
    if past is None:
        out = model(input_ids=ids, use_cache=True)
    else:
        out = model(input_ids=ids, cache=past, use_cache=True)
    return out.logits.float(), out["cache"]


def prompt_scores(
    model: Any, tokens: list[int], *, topk: int = 0
) -> tuple[list[float | None], list[list[tuple[int, float]] | None] | None]:
    """Return the log-probability of each prompt token given the tokens before it.

    Args:
        model: A causal LM.
        tokens: The token ids (at least one).
        topk: Also return the ``topk`` most likely tokens at each position (0: no).

    Returns:
        ``(logprobs, topk_list)``; the first entry of each is ``None``.
    """
    if isinstance(topk, bool) or not isinstance(topk, int) or not 0 <= topk <= MAX_TOPK:
        raise InvalidRequestError(f"topk_prompt_logprobs must be in [0, {MAX_TOPK}], got {topk!r}")
    with torch.no_grad():
        ids = torch.tensor([tokens], dtype=torch.long)
        logits = model(input_ids=ids, use_cache=False).logits.float()[0]
        logp = torch.log_softmax(logits, dim=-1)
    targets = torch.tensor(tokens[1:], dtype=torch.long)
    values = logp[:-1].gather(-1, targets.unsqueeze(-1)).squeeze(-1).tolist() if len(tokens) > 1 else []
    lps: list[float | None] = [None, *[float(v) for v in values]]
    top: list[list[tuple[int, float]] | None] | None = None
    if topk:
        k = min(topk, logp.shape[-1])
        vals, idx = torch.topk(logp[:-1], k, dim=-1)
        top = [None]
        for row_v, row_i in zip(vals.tolist(), idx.tolist(), strict=True):
            top.append([(int(i), float(v)) for i, v in zip(row_i, row_v, strict=True)])
    return lps, top


def sample(
    model: Any,
    tokenizer: Any,
    prompt_tokens: Sequence[int],
    *,
    vocab_size: int,
    max_length: int,
    eos_ids: Sequence[int],
    max_tokens: int,
    temperature: float = 1.0,
    top_k: int = -1,
    top_p: float = 1.0,
    stop: str | Sequence[str] | Sequence[int] | None = None,
    seed: int | None = None,
    num_samples: int = 1,
    include_prompt_logprobs: bool = False,
    topk_prompt_logprobs: int = 0,
) -> SampleResult:
    """Generate ``num_samples`` continuations of ``prompt_tokens`` (see the module docstring).

    Raises:
        InvalidRequestError: If a parameter or token is invalid.
    """
    _check_params(
        max_tokens=max_tokens,
        temperature=temperature,
        top_k=top_k,
        top_p=top_p,
        num_samples=num_samples,
        seed=seed,
    )
    prompt = check_tokens(prompt_tokens, vocab_size=vocab_size, max_length=max_length, what="prompt")
    if len(prompt) + max_tokens > max_length:
        raise InvalidRequestError(
            f"prompt ({len(prompt)} tokens) plus max_tokens ({max_tokens}) exceeds the model's context "
            f"of {max_length}"
        )
    stop_ids, stop_strings = _stop_spec(stop, vocab_size=vocab_size, eos_ids=eos_ids)
    prompt_lps: list[float | None] | None = None
    prompt_top: list[list[tuple[int, float]] | None] | None = None
    if include_prompt_logprobs or topk_prompt_logprobs:
        lps, prompt_top = prompt_scores(model, prompt, topk=topk_prompt_logprobs)
        prompt_lps = lps if include_prompt_logprobs else None
    generator = torch.Generator()
    generator.manual_seed(seed if seed is not None else int.from_bytes(os.urandom(8), "little"))
    greedy = float(temperature) == 0.0
    n = num_samples
    tokens: list[list[int]] = [[] for _ in range(n)]
    logprobs: list[list[float]] = [[] for _ in range(n)]
    reasons: list[StopReason | None] = [None] * n
    with torch.no_grad():
        logits, past = _eval_logits(model, torch.tensor([prompt] * n, dtype=torch.long))
        last = logits[:, -1, :]
        for _ in range(max_tokens):
            logp = torch.log_softmax(last, dim=-1)
            if greedy:
                nxt = torch.argmax(last, dim=-1)
            else:
                weights = _filter(last, temperature=float(temperature), top_k=top_k, top_p=float(top_p))
                probs = torch.softmax(weights, dim=-1)
                nxt = torch.multinomial(probs, 1, generator=generator).squeeze(-1)
            chosen = logp.gather(-1, nxt.unsqueeze(-1)).squeeze(-1)
            for i in range(n):
                if reasons[i] is not None:
                    continue
                tok = int(nxt[i])
                tokens[i].append(tok)
                logprobs[i].append(float(chosen[i]))
                if tok in stop_ids:
                    reasons[i] = "stop"
                elif stop_strings:
                    text = tokenizer.decode(tokens[i], skip_special_tokens=False)
                    if any(s in text for s in stop_strings):
                        reasons[i] = "stop"
            if all(r is not None for r in reasons):
                break
            logits, past = _eval_logits(model, nxt.unsqueeze(-1), past)
            last = logits[:, -1, :]
    sequences = [
        SampledSequence(tokens=tokens[i], logprobs=logprobs[i], stop_reason=reasons[i] or "length")
        for i in range(n)
    ]
    return SampleResult(sequences=sequences, prompt_logprobs=prompt_lps, topk_prompt_logprobs=prompt_top)
