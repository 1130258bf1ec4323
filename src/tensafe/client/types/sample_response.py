"""``SampleResponse``: the sequences of one ``sample`` call."""

from __future__ import annotations

from tensafe.client.types._base import ResponseModel
from tensafe.client.types.sampled_sequence import SampledSequence

__all__ = ["SampleResponse"]


class SampleResponse(ResponseModel):
    """Sampled sequences and, when asked for, the prompt's logprobs (``None`` at position 0)."""

    sequences: list[SampledSequence]
    prompt_logprobs: list[float | None] | None = None
