"""Tinker-compatible LoRA training runtime with platform-enforced DP-SGD.

Plain Python (dataclasses, lists, NumPy arrays); the server translates the wire protocol to
these types. See ``docs/runtime.md``; the DP policy is :class:`tensafe.privacy.DpPolicy`.
Names are re-exported lazily so that importing this package does not load torch.
"""

from __future__ import annotations

import importlib
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from tensafe.training.runtime.errors import (
        USER_ERRORS,
        BudgetExceededError,
        InvalidRequestError,
        SessionStateError,
        StateFormatError,
        StepLimitError,
        TrainingRuntimeError,
    )
    from tensafe.training.runtime.losses import LOSS_FUNCTIONS
    from tensafe.training.runtime.session import LORA_ALPHA, LoraTrainingSession, SamplingSession
    from tensafe.training.runtime.state import STATE_FORMAT, STATE_VERSION
    from tensafe.training.runtime.types import (
        AdamParams,
        Datum,
        ForwardBackwardResult,
        SampledSequence,
        SampleResult,
    )

_EXPORTS: dict[str, str] = {
    "USER_ERRORS": "errors",
    "BudgetExceededError": "errors",
    "InvalidRequestError": "errors",
    "SessionStateError": "errors",
    "StateFormatError": "errors",
    "StepLimitError": "errors",
    "TrainingRuntimeError": "errors",
    "LOSS_FUNCTIONS": "losses",
    "LORA_ALPHA": "session",
    "LoraTrainingSession": "session",
    "SamplingSession": "session",
    "STATE_FORMAT": "state",
    "STATE_VERSION": "state",
    "AdamParams": "types",
    "Datum": "types",
    "ForwardBackwardResult": "types",
    "SampleResult": "types",
    "SampledSequence": "types",
}

__all__ = [
    "LORA_ALPHA",
    "LOSS_FUNCTIONS",
    "STATE_FORMAT",
    "STATE_VERSION",
    "USER_ERRORS",
    "AdamParams",
    "BudgetExceededError",
    "Datum",
    "ForwardBackwardResult",
    "InvalidRequestError",
    "LoraTrainingSession",
    "SampleResult",
    "SampledSequence",
    "SamplingSession",
    "SessionStateError",
    "StateFormatError",
    "StepLimitError",
    "TrainingRuntimeError",
]


def __getattr__(name: str) -> Any:
    module = _EXPORTS.get(name)
    if module is None:
        raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
    value = getattr(importlib.import_module(f"{__name__}.{module}"), name)
    globals()[name] = value
    return value


def __dir__() -> list[str]:
    return sorted(set(globals()) | set(__all__))
