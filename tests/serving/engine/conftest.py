"""Helpers of the engine tests: an independent reference and a request runner.

* ``peft_reference`` (session): ``reference(model_dir, adapter, prompt, *, max_tokens, top=0)``
  generates greedily with plain ``transformers`` (plus ``peft.PeftModel`` loaded from the
  adapter's files when ``adapter`` is given), one full forward per token with no KV cache, and
  returns the tokens, their logprobs and the ``top`` most likely alternatives of each step.
  It shares no code with the engine.
* ``run_request(engine, prompt, *, adapter_id=None, request_id=None, **params)`` (session):
  runs one request to completion and returns a :class:`Result` (chunks, tokens, text, ...).
"""

from __future__ import annotations

import itertools
import pathlib
import tempfile
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any

import pytest

from tensafe.serving.engine import GenerationChunk, GenerationRequest, LoraAdapter, SamplingParams

_ids = itertools.count()


@dataclass
class Reference:
    tokens: list[int]
    logprobs: list[float]
    top: list[dict[int, float]]


@dataclass
class Result:
    chunks: list[GenerationChunk]

    @property
    def tokens(self) -> list[int]:
        return [t for c in self.chunks for t in c.token_ids]

    @property
    def text(self) -> str:
        return "".join(c.text for c in self.chunks)

    @property
    def logprobs(self) -> list[float]:
        return [lp.logprob for c in self.chunks for lp in (c.logprobs or ())]

    @property
    def top(self) -> list[dict[int, float]]:
        return [dict(lp.top) for c in self.chunks for lp in (c.logprobs or ())]

    @property
    def finish_reason(self) -> str | None:
        return self.chunks[-1].finish_reason


def _reference_model(model_dir: pathlib.Path | str, adapter: LoraAdapter | None) -> Any:
    import torch
    from peft import PeftModel
    from transformers import AutoModelForCausalLM

    base = AutoModelForCausalLM.from_pretrained(str(model_dir), dtype=torch.float32, local_files_only=True)
    if adapter is None:
        return base.eval()
    with tempfile.TemporaryDirectory(prefix="tensafe-test-reference-") as tmp:
        for name, data in adapter.files.items():
            (pathlib.Path(tmp) / name).write_bytes(data)
        model = PeftModel.from_pretrained(base, tmp)
    return model.eval()


def reference(
    model_dir: pathlib.Path | str,
    adapter: LoraAdapter | None,
    prompt: Sequence[int],
    *,
    max_tokens: int,
    top: int = 0,
) -> Reference:
    import torch

    model = _reference_model(model_dir, adapter)
    ids = list(prompt)
    out = Reference([], [], [])
    with torch.no_grad():
        for _ in range(max_tokens):
            logits = model(input_ids=torch.tensor([ids])).logits[0, -1].to(torch.float32)
            logprobs = torch.log_softmax(logits, dim=-1)
            token = int(torch.argmax(logits))
            out.tokens.append(token)
            out.logprobs.append(float(logprobs[token]))
            if top:
                values, idx = logprobs.topk(top)
                out.top.append({int(i): float(v) for i, v in zip(idx, values)})
            ids.append(token)
    return out


@pytest.fixture(scope="session")
def peft_reference() -> Callable[..., Reference]:
    return reference


async def run(
    engine: Any,
    prompt: Sequence[int],
    *,
    adapter_id: str | None = None,
    request_id: str | None = None,
    **params: Any,
) -> Result:
    params.setdefault("max_tokens", 8)
    request = GenerationRequest(
        request_id=request_id or f"test-{next(_ids)}",
        prompt_token_ids=list(prompt),
        params=SamplingParams(**params),
        adapter_id=adapter_id,
    )
    return Result([chunk async for chunk in engine.generate(request)])


@pytest.fixture(scope="session")
def run_request() -> Callable[..., Any]:
    return run
