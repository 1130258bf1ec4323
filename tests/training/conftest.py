"""Tiny model fixtures shared by every training test (models, data, LoRA, DP-SGD).

These fixtures are a stable contract: other test modules under ``tests/training`` rely on
their names, scopes and shapes.

* ``tiny_tokenizer`` (session): the real SmolLM2 tokenizer with its chat template, extracted
  from the bundled GGUF once (a few seconds) and cached; the model is never converted.
* ``tiny_llama_config`` (function): a ``LlamaConfig`` with hidden 32, 2 layers, 4 heads,
  2 KV heads, intermediate 64, the real tokenizer's vocabulary (49,152) and tied embeddings.
* ``tiny_llama`` (function): a fresh ``LlamaForCausalLM`` built from that config with
  ``torch.manual_seed(0)``, float32, eval mode: identical weights on every call.
* ``tiny_llama_factory`` (session): ``factory(seed=0)`` builds a fresh tiny model like
  ``tiny_llama`` (same weights for the same seed), for tests that need several copies.
* ``tiny_model_dir`` (session): a local Hugging Face model directory (safetensors, config,
  tokenizer files) holding the ``tiny_llama`` weights, usable wherever a model name is
  accepted (``load_model_and_tokenizer(str(tiny_model_dir))``). Treat it as read-only.
"""

from __future__ import annotations

import pathlib
from collections.abc import Callable
from typing import Any

import pytest

TINY_HIDDEN = 32
TINY_LAYERS = 2
TINY_HEADS = 4
TINY_KV_HEADS = 2
TINY_INTERMEDIATE = 64
TINY_SEED = 0
REAL_MODEL_ID = "HuggingFaceTB/SmolLM2-135M-Instruct"


def build_tiny_llama_config(vocab_size: int, *, pad_token_id: int | None = None) -> Any:
    """Return the tiny ``LlamaConfig`` used by the fixtures."""
    from transformers import LlamaConfig

    return LlamaConfig(
        vocab_size=vocab_size,
        hidden_size=TINY_HIDDEN,
        num_hidden_layers=TINY_LAYERS,
        num_attention_heads=TINY_HEADS,
        num_key_value_heads=TINY_KV_HEADS,
        intermediate_size=TINY_INTERMEDIATE,
        max_position_embeddings=512,
        tie_word_embeddings=True,
        pad_token_id=pad_token_id,
        bos_token_id=1,
        eos_token_id=2,
    )


def build_tiny_llama(vocab_size: int, *, seed: int = TINY_SEED, pad_token_id: int | None = None) -> Any:
    """Return a deterministic, randomly initialised tiny ``LlamaForCausalLM`` (float32, eval)."""
    import torch
    from transformers import LlamaForCausalLM

    config = build_tiny_llama_config(vocab_size, pad_token_id=pad_token_id)
    torch.manual_seed(seed)
    model = LlamaForCausalLM(config).to(torch.float32)
    model.eval()
    return model


@pytest.fixture(scope="session")
def tiny_tokenizer() -> Any:
    """The real SmolLM2 tokenizer (GGUF-extracted, cached), without the model."""
    from tensafe.training.models import load_tokenizer

    return load_tokenizer(REAL_MODEL_ID)


@pytest.fixture
def tiny_llama_config(tiny_tokenizer: Any) -> Any:
    """Tiny ``LlamaConfig`` over the real tokenizer's vocabulary."""
    return build_tiny_llama_config(len(tiny_tokenizer), pad_token_id=tiny_tokenizer.pad_token_id)


@pytest.fixture
def tiny_llama(tiny_tokenizer: Any) -> Any:
    """Fresh tiny ``LlamaForCausalLM`` with seed-0 weights (same weights on every call)."""
    return build_tiny_llama(len(tiny_tokenizer), pad_token_id=tiny_tokenizer.pad_token_id)


@pytest.fixture(scope="session")
def tiny_llama_factory(tiny_tokenizer: Any) -> Callable[..., Any]:
    """Builder of fresh tiny models: ``tiny_llama_factory(seed=0)``."""

    def factory(seed: int = TINY_SEED) -> Any:
        return build_tiny_llama(len(tiny_tokenizer), seed=seed, pad_token_id=tiny_tokenizer.pad_token_id)

    return factory


@pytest.fixture(scope="session")
def tiny_model_dir(tmp_path_factory: pytest.TempPathFactory, tiny_tokenizer: Any) -> pathlib.Path:
    """A local Hugging Face directory holding the tiny model and the real tokenizer."""
    directory = tmp_path_factory.mktemp("tiny-llama")
    model = build_tiny_llama(len(tiny_tokenizer), pad_token_id=tiny_tokenizer.pad_token_id)
    model.save_pretrained(str(directory), safe_serialization=True)
    tiny_tokenizer.save_pretrained(str(directory))
    return directory
