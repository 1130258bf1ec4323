"""Token sampling of the transformers engine, with vLLM's semantics and order.

For each batch row, from the model's last-position logits (float32):

1. ``logprobs`` (when requested) come from the raw distribution: ``log_softmax`` of the
   logits before any penalty, temperature or filter (vLLM's default ``raw_logprobs``), with
   the ``k`` most likely alternatives.
2. Penalties, as vLLM applies them: the repetition penalty on every token seen in the prompt
   or the output (a positive logit is divided by it, a negative one multiplied), then
   ``logits -= frequency_penalty * count`` and ``logits -= presence_penalty * (count > 0)``
   with the counts of the output tokens only.
3. ``temperature < 1e-5`` is greedy: the argmax of the penalized logits.
4. Otherwise: divide by the temperature, drop tokens whose probability is below
   ``min_p`` times the largest one, keep the ``top_k`` largest logits (ties kept), keep the
   smallest set of tokens whose probability reaches ``top_p`` (at least one), and draw with
   the exponential race vLLM uses (``argmax(p / q)`` with ``q ~ Exp(1)``) from the request's
   own ``torch.Generator``, so a seeded request draws the same tokens whatever else shares
   its batch.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field

import torch

from tensafe.serving.engine import SamplingParams, TokenLogprob

__all__ = ["GREEDY_EPS", "RowSampler", "sample_batch"]

#: Temperatures below this are greedy (vLLM's ``_SAMPLING_EPS``).
GREEDY_EPS = 1e-5


@dataclass(eq=False)
class RowSampler:
    """The sampling state of one request: its parameters, generator and penalty counts."""

    params: SamplingParams
    generator: torch.Generator
    vocab_size: int
    prompt_seen: torch.Tensor | None = None
    output_counts: torch.Tensor | None = None
    _prompt: Sequence[int] = field(default=())

    @classmethod
    def create(
        cls, params: SamplingParams, prompt: Sequence[int], *, vocab_size: int, seed: int
    ) -> RowSampler:
        """State for a new request; ``seed`` is the request's seed or a fresh random one."""
        row = cls(params=params, generator=torch.Generator().manual_seed(seed), vocab_size=vocab_size)
        if params.repetition_penalty != 1.0:
            seen = torch.zeros(vocab_size, dtype=torch.bool)
            seen[torch.tensor(list(prompt), dtype=torch.long)] = True
            row.prompt_seen = seen
        if row.penalized:
            row.output_counts = torch.zeros(vocab_size, dtype=torch.float32)
        return row

    @property
    def penalized(self) -> bool:
        p = self.params
        return p.repetition_penalty != 1.0 or p.frequency_penalty != 0.0 or p.presence_penalty != 0.0

    def record(self, token: int) -> None:
        """Count an output token (for the penalties)."""
        if self.output_counts is not None:
            self.output_counts[token] += 1.0


def _penalize(logits: torch.Tensor, rows: Sequence[RowSampler]) -> torch.Tensor:
    picked = [i for i, row in enumerate(rows) if row.penalized]
    if not picked:
        return logits
    index = torch.tensor(picked, dtype=torch.long)
    sub = logits.index_select(0, index)
    counts = torch.stack([rows[i].output_counts for i in picked])  # type: ignore[misc]
    output_seen = counts > 0
    rep = torch.tensor([rows[i].params.repetition_penalty for i in picked], dtype=sub.dtype).unsqueeze(1)
    seen = output_seen.clone()
    for j, i in enumerate(picked):
        prompt_seen = rows[i].prompt_seen
        if prompt_seen is not None:
            seen[j] |= prompt_seen
    penalties = torch.where(seen, rep.expand_as(sub), torch.ones_like(sub))
    sub = torch.where(sub > 0, sub / penalties, sub * penalties)
    freq = torch.tensor([rows[i].params.frequency_penalty for i in picked], dtype=sub.dtype).unsqueeze(1)
    pres = torch.tensor([rows[i].params.presence_penalty for i in picked], dtype=sub.dtype).unsqueeze(1)
    sub = sub - freq * counts - pres * output_seen.to(sub.dtype)
    out = logits.clone()
    out.index_copy_(0, index, sub)
    return out


def _filter(logits: torch.Tensor, rows: Sequence[RowSampler]) -> torch.Tensor:
    """Temperature, min_p, top_k, top_p (vLLM's order and tie rules)."""
    temps = torch.tensor([row.params.temperature for row in rows], dtype=logits.dtype).unsqueeze(1)
    logits = logits / temps
    min_p = torch.tensor([row.params.min_p for row in rows], dtype=logits.dtype).unsqueeze(1)
    if bool((min_p > 0).any()):
        probs = logits.softmax(dim=-1)
        threshold = probs.amax(dim=-1, keepdim=True) * min_p
        logits = logits.masked_fill(probs < threshold, float("-inf"))
    vocab = logits.shape[-1]
    ks = [row.params.top_k if row.params.top_k > 0 else vocab for row in rows]
    ps = [row.params.top_p for row in rows]
    if all(k >= vocab for k in ks) and all(p >= 1.0 for p in ps):
        return logits
    ordered, order = logits.sort(dim=-1, descending=False)
    if any(k < vocab for k in ks):
        k = torch.tensor([min(k, vocab) for k in ks], dtype=torch.long)
        kth = ordered.gather(1, (vocab - k).unsqueeze(1))
        ordered = ordered.masked_fill(ordered < kth, float("-inf"))
    if any(p < 1.0 for p in ps):
        p = torch.tensor(ps, dtype=logits.dtype).unsqueeze(1)
        cumulative = ordered.softmax(dim=-1).cumsum(dim=-1)
        drop = cumulative <= 1 - p
        drop[:, -1] = False
        ordered = ordered.masked_fill(drop, float("-inf"))
    return ordered.scatter(1, order, ordered)


def sample_batch(
    logits: torch.Tensor, rows: Sequence[RowSampler]
) -> tuple[list[int], list[TokenLogprob | None]]:
    """Sample one token per row of ``logits`` (``[rows, vocab]``); see the module docstring."""
    logits = logits.to(torch.float32)
    wants_logprobs = [row.params.logprobs is not None for row in rows]
    raw = torch.log_softmax(logits, dim=-1) if any(wants_logprobs) else None
    processed = _penalize(logits, rows)
    greedy = [row.params.temperature < GREEDY_EPS for row in rows]
    tokens = [0] * len(rows)
    if any(greedy):
        argmax = processed.argmax(dim=-1).tolist()
        for i, g in enumerate(greedy):
            if g:
                tokens[i] = int(argmax[i])
    random_rows = [i for i, g in enumerate(greedy) if not g]
    if random_rows:
        index = torch.tensor(random_rows, dtype=torch.long)
        subset = [rows[i] for i in random_rows]
        probs = _filter(processed.index_select(0, index), subset).softmax(dim=-1)
        race = torch.empty_like(probs)
        for j, row in enumerate(subset):
            race[j].exponential_(generator=row.generator)
        drawn = (probs / race).argmax(dim=-1).tolist()
        for j, i in enumerate(random_rows):
            tokens[i] = int(drawn[j])
    logprobs: list[TokenLogprob | None] = [None] * len(rows)
    if raw is not None:
        for i, row in enumerate(rows):
            k = row.params.logprobs
            if k is None:
                continue
            top: dict[int, float] = {}
            if k > 0:
                values, ids = raw[i].topk(k)
                top = {int(t): float(v) for t, v in zip(ids.tolist(), values.tolist())}
            logprobs[i] = TokenLogprob(token_id=tokens[i], logprob=float(raw[i, tokens[i]]), top=top)
    for i, row in enumerate(rows):
        row.record(tokens[i])
    return tokens, logprobs
