"""Private fine-tuning: base models, datasets, LoRA and DP-SGD.

Importing this package is cheap: the public names below are re-exported lazily, so torch
and transformers load only when a model, tokenizer or batch is actually needed.
"""

from __future__ import annotations

import importlib
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from tensafe.training.data import (
        Batch,
        TokenizedExample,
        collate,
        dataset_commitment,
        load_jsonl,
        tokenize_examples,
        train_eval_split,
    )
    from tensafe.training.errors import (
        DataError,
        EmptyDatasetError,
        ModelLoadError,
        TrainingConfigError,
        TrainingError,
        UnknownModelError,
    )
    from tensafe.training.lora import LoraSettings, apply_lora, load_adapter, save_adapter
    from tensafe.training.models import (
        ModelSpec,
        RegisteredModel,
        list_models,
        load_model_and_tokenizer,
        load_tokenizer,
        prepare_model,
        resolve_model,
    )
    from tensafe.training.synth import synthesize

_EXPORTS: dict[str, str] = {
    # errors
    "DataError": "tensafe.training.errors",
    "EmptyDatasetError": "tensafe.training.errors",
    "ModelLoadError": "tensafe.training.errors",
    "TrainingConfigError": "tensafe.training.errors",
    "TrainingError": "tensafe.training.errors",
    "UnknownModelError": "tensafe.training.errors",
    # models
    "ModelSpec": "tensafe.training.models",
    "RegisteredModel": "tensafe.training.models",
    "list_models": "tensafe.training.models",
    "load_model_and_tokenizer": "tensafe.training.models",
    "load_tokenizer": "tensafe.training.models",
    "prepare_model": "tensafe.training.models",
    "resolve_model": "tensafe.training.models",
    # data
    "Batch": "tensafe.training.data",
    "TokenizedExample": "tensafe.training.data",
    "collate": "tensafe.training.data",
    "dataset_commitment": "tensafe.training.data",
    "load_jsonl": "tensafe.training.data",
    "tokenize_examples": "tensafe.training.data",
    "train_eval_split": "tensafe.training.data",
    # synthetic data
    "synthesize": "tensafe.training.synth",
    # LoRA
    "LoraSettings": "tensafe.training.lora",
    "apply_lora": "tensafe.training.lora",
    "load_adapter": "tensafe.training.lora",
    "save_adapter": "tensafe.training.lora",
}

__all__ = [
    "Batch",
    "DataError",
    "EmptyDatasetError",
    "LoraSettings",
    "ModelLoadError",
    "ModelSpec",
    "RegisteredModel",
    "TokenizedExample",
    "TrainingConfigError",
    "TrainingError",
    "UnknownModelError",
    "apply_lora",
    "collate",
    "dataset_commitment",
    "list_models",
    "load_adapter",
    "load_jsonl",
    "load_model_and_tokenizer",
    "load_tokenizer",
    "prepare_model",
    "resolve_model",
    "save_adapter",
    "synthesize",
    "tokenize_examples",
    "train_eval_split",
]


def __getattr__(name: str) -> Any:
    module = _EXPORTS.get(name)
    if module is None:
        raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
    value = getattr(importlib.import_module(module), name)
    globals()[name] = value
    return value


def __dir__() -> list[str]:
    return sorted(set(globals()) | set(__all__))
