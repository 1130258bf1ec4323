"""Fixtures of the vLLM engine tests (``tests/serving/vllm``).

* ``vllm_python`` (session): the interpreter of the vLLM environment, from
  ``TENSAFE_VLLM_PYTHON``. Unset: the tests that need vLLM are skipped with the install command,
  except in CI (``CI=true``), where a missing vLLM fails them (CI installs it with
  ``scripts/install-vllm.sh``).
* ``vllm_model_dir`` (session): a tiny Llama for vLLM. vLLM's CPU attention supports head sizes
  of 32 and more, so this is the serving tiny model (``tests/training/conftest.py``: 2 layers,
  the real SmolLM2 tokenizer and vocabulary, tied embeddings) with hidden size 64 and 2 heads of
  32 (1 KV head) instead of 4 heads of 8; its weights are drawn with ``initializer_range=0.2``
  so the next-token distribution is peaked and greedy decoding has clear winners.
* :data:`VLLM_MODEL`: the name it is served under.
* ``vllm_engine`` (module): a started :class:`~tensafe.serving.engines.vllm.VllmEngine` on it
  (2 LoRA slots, rank up to 8, 8 sequences, context 512), closed after the module.
* :func:`reference_greedy`: the independent reference, ``transformers`` + ``peft``
  (``PeftModel.from_pretrained`` on the adapter written to a temporary directory), greedy, one
  full forward pass per token, in float64 log-softmax.

``vllm_python`` and ``vllm_model_dir`` are also imported by ``tests/serving/api/conftest.py`` for
the ``vllm`` kind of the API suite's ``engine`` fixture.
"""

from __future__ import annotations

import asyncio
import os
import pathlib
import tempfile
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from typing import Any

import pytest

from tensafe import config
from tensafe.serving.engine import LoraAdapter

VLLM_MODEL = "tensafe-test/tiny-llama-vllm"


@pytest.fixture(scope="session")
def vllm_python() -> pathlib.Path:
    python = config.vllm_python()
    if python is None:
        message = (
            "TENSAFE_VLLM_PYTHON is not set: install vLLM with `bash scripts/install-vllm.sh VENV_DIR` "
            "and set TENSAFE_VLLM_PYTHON=VENV_DIR/bin/python"
        )
        if os.environ.get("CI", "").lower() == "true":
            pytest.fail(f"CI must run the vLLM tests: {message}")
        pytest.skip(message)
    return python


@pytest.fixture(scope="session")
def vllm_model_dir(tmp_path_factory: pytest.TempPathFactory) -> pathlib.Path:
    import torch
    from transformers import LlamaConfig, LlamaForCausalLM

    from tensafe.training.models import load_tokenizer

    tokenizer = load_tokenizer("HuggingFaceTB/SmolLM2-135M-Instruct")
    hf_config = LlamaConfig(
        vocab_size=len(tokenizer),
        hidden_size=64,
        num_hidden_layers=2,
        num_attention_heads=2,
        num_key_value_heads=1,
        intermediate_size=128,
        max_position_embeddings=512,
        tie_word_embeddings=True,
        initializer_range=0.2,
        pad_token_id=tokenizer.pad_token_id,
        bos_token_id=1,
        eos_token_id=2,
    )
    torch.manual_seed(0)
    model = LlamaForCausalLM(hf_config).to(torch.float32).eval()
    directory = tmp_path_factory.mktemp("vllm-tiny-llama")
    model.save_pretrained(str(directory), safe_serialization=True)
    tokenizer.save_pretrained(str(directory))
    return directory


def start_engine(model_dir: pathlib.Path, python: pathlib.Path, **overrides: Any) -> Any:
    from tensafe.serving.engines.vllm import VllmEngine

    options: dict[str, Any] = {
        "vllm_python": python,
        "model_name": VLLM_MODEL,
        "max_loras": 2,
        "max_lora_rank": 8,
        "max_num_seqs": 8,
        "max_model_len": 512,
        "max_resident_adapters": 4,
    }
    options.update(overrides)
    return asyncio.run(VllmEngine.start(str(model_dir), **options))


@pytest.fixture(scope="module")
def vllm_engine(vllm_model_dir: pathlib.Path, vllm_python: pathlib.Path) -> Iterator[Any]:
    engine = start_engine(vllm_model_dir, vllm_python)
    try:
        yield engine
    finally:
        asyncio.run(engine.close())


@dataclass
class Reference:
    token_ids: list[int]
    logprobs: list[float]
    tops: list[dict[int, float]]
    #: Per step, the log-probability gap between the best and the second-best token.
    margins: list[float]


def reference_greedy(
    model_dir: pathlib.Path,
    adapter: LoraAdapter | None,
    prompt_ids: Sequence[int],
    max_tokens: int,
    *,
    k: int = 3,
) -> Reference:
    """Greedy decoding with ``transformers`` + ``peft`` (no EOS stop: use ``ignore_eos`` in the engine)."""
    import torch
    from peft import PeftModel
    from transformers import AutoModelForCausalLM

    model: Any = AutoModelForCausalLM.from_pretrained(
        str(model_dir), dtype=torch.float32, local_files_only=True
    )
    if adapter is not None:
        with tempfile.TemporaryDirectory(prefix="tensafe-vllm-ref-") as tmp:
            for name, data in adapter.files.items():
                (pathlib.Path(tmp) / name).write_bytes(data)
            model = PeftModel.from_pretrained(model, tmp)
    model.eval()
    ids = list(prompt_ids)
    out: list[int] = []
    logprobs: list[float] = []
    tops: list[dict[int, float]] = []
    margins: list[float] = []
    with torch.no_grad():
        for _ in range(max_tokens):
            logits = model(input_ids=torch.tensor([ids])).logits[0, -1].to(torch.float64)
            logp = torch.log_softmax(logits, dim=-1)
            values, indices = torch.topk(logp, max(k, 2))
            token = int(indices[0])
            tops.append({int(i): float(v) for v, i in zip(values[:k], indices[:k], strict=True)})
            margins.append(float(values[0] - values[1]))
            out.append(token)
            logprobs.append(float(logp[token]))
            ids.append(token)
    return Reference(out, logprobs, tops, margins)
