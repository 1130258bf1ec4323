"""``EncodedTextChunk``: a run of token ids inside a :class:`ModelInput`."""

from __future__ import annotations

from typing import Literal

from pydantic import Field

from tensafe.client.types._base import RequestModel

__all__ = ["EncodedTextChunk"]


class EncodedTextChunk(RequestModel):
    """Token ids (non-negative integers) of one piece of a prompt."""

    tokens: list[int] = Field(default_factory=list)
    type: Literal["encoded_text"] = "encoded_text"

    @property
    def length(self) -> int:
        """Number of tokens."""
        return len(self.tokens)
