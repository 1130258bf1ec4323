"""Plain data types of the runtime API (no HTTP, pydantic or protobuf).

They mirror the Tinker SDK's types: a :class:`Datum` is a token sequence plus per-token
loss inputs; position ``i`` of ``model_input`` predicts ``target_tokens[i]``.
"""

from __future__ import annotations

import dataclasses
import math
from collections.abc import Mapping
from typing import Literal

import numpy as np

from tensafe.training.runtime.errors import InvalidRequestError

__all__ = [
    "AdamParams",
    "Datum",
    "ForwardBackwardResult",
    "SampleResult",
    "SampledSequence",
    "StopReason",
]

StopReason = Literal["stop", "length"]


@dataclasses.dataclass(frozen=True)
class Datum:
    """One training example (the privacy unit under DP).

    Attributes:
        model_input: The input token ids (the concatenation of the wire chunks).
        loss_fn_inputs: Named per-token arrays (``target_tokens``, ``weights``,
            ``logprobs``, ``advantages``, ...), dense, shape ``[N]`` or ``[N, K]`` with
            ``N = len(model_input)``.
    """

    model_input: list[int]
    loss_fn_inputs: Mapping[str, np.ndarray]


@dataclasses.dataclass(frozen=True)
class ForwardBackwardResult:
    """Result of :meth:`LoraTrainingSession.forward_backward` (or ``forward``).

    Attributes:
        loss_fn_outputs: One mapping per datum, in order; ``"logprobs"`` holds the learner's
            float32 log-probabilities of ``target_tokens`` (same shape).
        metrics: ``name:reduction`` keys, e.g. ``"loss:sum"``.
        loss_fn_output_type: Record type name for the wire (``"ArrayRecord"``).
    """

    loss_fn_outputs: list[dict[str, np.ndarray]]
    metrics: dict[str, float]
    loss_fn_output_type: str = "ArrayRecord"


@dataclasses.dataclass(frozen=True, kw_only=True)
class AdamParams:
    """Hyper-parameters of one AdamW step (Tinker's ``AdamParams``).

    Attributes:
        learning_rate: Step size (>= 0).
        beta1: First-moment decay in [0, 1).
        beta2: Second-moment decay in [0, 1).
        eps: Denominator term (> 0).
        weight_decay: Decoupled weight decay (>= 0), as ``torch.optim.AdamW``.
        grad_clip_norm: Clip the global gradient norm to this value; 0 disables.
    """

    learning_rate: float = 1e-4
    beta1: float = 0.9
    beta2: float = 0.95
    eps: float = 1e-12
    weight_decay: float = 0.0
    grad_clip_norm: float = 0.0

    def __post_init__(self) -> None:
        for name in ("learning_rate", "beta1", "beta2", "eps", "weight_decay", "grad_clip_norm"):
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, int | float) or not math.isfinite(value):
                raise InvalidRequestError(f"adam_params.{name} must be a finite number, got {value!r}")
            object.__setattr__(self, name, float(value))
        if self.learning_rate < 0 or self.weight_decay < 0 or self.grad_clip_norm < 0:
            raise InvalidRequestError(
                "adam_params learning_rate, weight_decay and grad_clip_norm must be >= 0"
            )
        if not (0 <= self.beta1 < 1 and 0 <= self.beta2 < 1):
            raise InvalidRequestError("adam_params beta1 and beta2 must be in [0, 1)")
        if self.eps <= 0:
            raise InvalidRequestError("adam_params.eps must be > 0")


@dataclasses.dataclass(frozen=True)
class SampledSequence:
    """One generated continuation.

    Attributes:
        tokens: The generated token ids (a matched stop token is included).
        logprobs: The model's log-probability of each generated token under the unmodified
            distribution (temperature 1, no top-k/top-p filtering), as the learner computes it.
        stop_reason: ``"stop"`` (a stop token/string or EOS) or ``"length"`` (``max_tokens``).
    """

    tokens: list[int]
    logprobs: list[float]
    stop_reason: StopReason


@dataclasses.dataclass(frozen=True)
class SampleResult:
    """Result of a sampling request.

    Attributes:
        sequences: ``num_samples`` sequences.
        prompt_logprobs: With ``include_prompt_logprobs``: one entry per prompt token, ``None``
            for the first; otherwise ``None``.
        topk_prompt_logprobs: With ``topk_prompt_logprobs=k``: per prompt position the ``k``
            most likely ``(token, logprob)`` pairs, ``None`` for the first; otherwise ``None``.
    """

    sequences: list[SampledSequence]
    prompt_logprobs: list[float | None] | None = None
    topk_prompt_logprobs: list[list[tuple[int, float]] | None] | None = None
