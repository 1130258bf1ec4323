"""``SamplingParams``: how to sample a completion."""

from __future__ import annotations

from pydantic import Field

from tensafe.client.types._base import RequestModel

__all__ = ["SamplingParams"]


class SamplingParams(RequestModel):
    """Sampling settings, sent as JSON (``None`` fields are omitted).

    ``stop`` is a string, a list of strings or a list of token ids; ``None`` stops at EOS and
    ``[]`` never stops early.
    """

    max_tokens: int | None = Field(default=None, ge=1)
    seed: int | None = None
    stop: str | list[str] | list[int] | None = None
    temperature: float = Field(default=1.0, ge=0)
    top_k: int = -1
    top_p: float = Field(default=1.0, gt=0, le=1)
