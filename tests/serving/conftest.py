"""Fixtures shared by every serving test (engines, API, standalone server).

These fixtures are a contract for ``tests/serving/*``: keep their names and signatures.

* ``serving_model_dir`` (session): a local Hugging Face directory holding the tiny Llama of
  ``tests/training/conftest.py`` (same builder, seed 0) with the real SmolLM2 tokenizer and its
  chat template. Read-only.
* :data:`SERVING_MODEL` (``"tensafe-test/tiny-llama"``): the name the engine fixture serves that
  directory under (the same name ``tests/server/conftest.py`` registers in its catalog).
* ``make_lora_adapter(model_dir, *, rank=4, seed=0, targets=..., adapter_id=None,
  base_model_id=SERVING_MODEL, alpha=None)`` (session): a PEFT LoRA adapter for the model in
  ``model_dir`` whose ``A`` and ``B`` matrices are all random and non-zero (drawn from
  ``seed``), saved by ``peft`` itself and returned in memory as a
  :class:`~tensafe.serving.engine.LoraAdapter` (``adapter_config.json``,
  ``adapter_model.safetensors``). Different seeds give adapters whose greedy outputs differ.
* ``transformers_engine`` (function): a started
  :class:`~tensafe.serving.engines.transformers.TransformersEngine` on ``serving_model_dir``
  served as :data:`SERVING_MODEL` (4 LoRA slots, rank up to 8, 8 sequences, context 256),
  closed after the test. The engine is not bound to an event loop: use it from any
  ``asyncio.run`` / anyio test.
"""

from __future__ import annotations

import asyncio
import importlib.util
import json
import pathlib
import tempfile
from collections.abc import Callable, Iterator
from typing import Any

import pytest

from tensafe.serving.engine import LoraAdapter

__all__ = ["SERVING_MODEL"]

#: The name the ``transformers_engine`` fixture serves the tiny model under.
SERVING_MODEL = "tensafe-test/tiny-llama"
_TRAINING_CONFTEST = pathlib.Path(__file__).parent.parent / "training" / "conftest.py"
_DEFAULT_TARGETS = ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj")


def _training_helpers() -> Any:
    spec = importlib.util.spec_from_file_location("_tensafe_training_conftest_serving", _TRAINING_CONFTEST)
    assert spec is not None and spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


@pytest.fixture(scope="session")
def serving_model_dir(tmp_path_factory: pytest.TempPathFactory) -> pathlib.Path:
    """A local Hugging Face directory with the tiny Llama and the real SmolLM2 tokenizer."""
    from tensafe.training.models import load_tokenizer

    helpers = _training_helpers()
    tokenizer = load_tokenizer(helpers.REAL_MODEL_ID)
    directory = tmp_path_factory.mktemp("serving-tiny-llama")
    model = helpers.build_tiny_llama(len(tokenizer), pad_token_id=tokenizer.pad_token_id)
    model.save_pretrained(str(directory), safe_serialization=True)
    tokenizer.save_pretrained(str(directory))
    return directory


def build_lora_adapter(
    model_dir: pathlib.Path | str,
    *,
    rank: int = 4,
    seed: int = 0,
    targets: tuple[str, ...] = _DEFAULT_TARGETS,
    adapter_id: str | None = None,
    base_model_id: str = SERVING_MODEL,
    alpha: float | None = None,
) -> LoraAdapter:
    """A random, non-zero PEFT LoRA adapter for the model in ``model_dir``, in memory."""
    import torch
    from peft import LoraConfig, get_peft_model
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(str(model_dir), dtype=torch.float32, local_files_only=True)
    config = LoraConfig(
        r=rank,
        lora_alpha=alpha if alpha is not None else 2 * rank,
        lora_dropout=0.0,
        target_modules=list(targets),
        bias="none",
        task_type="CAUSAL_LM",
    )
    peft_model = get_peft_model(model, config)
    generator = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, param in peft_model.named_parameters():
            if "lora_A" in name:
                fan_in = param.shape[1]
                param.copy_(torch.randn(param.shape, generator=generator) / fan_in**0.5)
            elif "lora_B" in name:
                param.copy_(torch.randn(param.shape, generator=generator) * 0.5)
    peft_model.peft_config["default"].base_model_name_or_path = base_model_id
    with tempfile.TemporaryDirectory(prefix="tensafe-test-adapter-") as tmp:
        peft_model.save_pretrained(tmp, safe_serialization=True, save_embedding_layers=False)
        files = {
            name: (pathlib.Path(tmp) / name).read_bytes()
            for name in ("adapter_config.json", "adapter_model.safetensors")
        }
    assert json.loads(files["adapter_config.json"])["r"] == rank
    return LoraAdapter(
        adapter_id=adapter_id if adapter_id is not None else f"adapter-r{rank}-s{seed}",
        base_model_id=base_model_id,
        files=files,
    )


@pytest.fixture(scope="session")
def make_lora_adapter() -> Callable[..., LoraAdapter]:
    """``make_lora_adapter(model_dir, *, rank, seed, targets, ...)``: see :func:`build_lora_adapter`."""
    return build_lora_adapter


@pytest.fixture
def transformers_engine(serving_model_dir: pathlib.Path) -> Iterator[Any]:
    """A started ``TransformersEngine`` on the tiny model (4 slots, rank <= 8, 8 sequences, 256 tokens)."""
    from tensafe.serving.engines.transformers import TransformersEngine

    engine = asyncio.run(
        TransformersEngine.start(
            str(serving_model_dir),
            model_name=SERVING_MODEL,
            max_loras=4,
            max_lora_rank=8,
            max_num_seqs=8,
            max_model_len=256,
        )
    )
    try:
        yield engine
    finally:
        asyncio.run(engine.close())
