"""Serving: OpenAI-compatible multi-LoRA inference on a base model (issue 11).

Layers, bottom up: :mod:`.engine` (the engine interface) and its implementations under
:mod:`.engines`; the adapter registry (which adapters a caller may use, loading them from
verified packages or the caller's encrypted checkpoints, LRU residency, audit); the
OpenAI-compatible API (:mod:`.api`), mounted by ``tensafe server`` at ``/oai/api/v1`` and
served alone by ``tensafe serve``. See ``docs/serving.md``.
"""

from __future__ import annotations

from tensafe.serving.engine import (
    Engine,
    FinishReason,
    GenerationChunk,
    GenerationRequest,
    LoraAdapter,
    SamplingParams,
    TokenLogprob,
)
from tensafe.serving.errors import (
    AdapterRefusedError,
    EngineUnavailableError,
    InvalidGenerationRequestError,
    ModelNotFoundError,
    ServingError,
    ServingOverloadedError,
)

__all__ = [
    "AdapterRefusedError",
    "Engine",
    "EngineUnavailableError",
    "FinishReason",
    "GenerationChunk",
    "GenerationRequest",
    "InvalidGenerationRequestError",
    "LoraAdapter",
    "ModelNotFoundError",
    "SamplingParams",
    "ServingError",
    "ServingOverloadedError",
    "TokenLogprob",
]
