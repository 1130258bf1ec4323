"""``SampledSequence``: one sampled completion."""

from __future__ import annotations

from typing import Literal

from tensafe.client.types._base import ResponseModel

__all__ = ["SampledSequence"]


class SampledSequence(ResponseModel):
    """Tokens, their logprobs, and why sampling stopped (``stop`` or ``length``)."""

    stop_reason: Literal["stop", "length"]
    tokens: list[int]
    logprobs: list[float] | None = None
    sequence_id: str | None = None
