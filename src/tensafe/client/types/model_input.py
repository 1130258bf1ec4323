"""``ModelInput``: the token sequence fed to the model, as a list of chunks."""

from __future__ import annotations

from collections.abc import Iterable

from pydantic import Field

from tensafe.client.types._base import RequestModel
from tensafe.client.types.encoded_text_chunk import EncodedTextChunk

__all__ = ["ModelInput"]


class ModelInput(RequestModel):
    """A prompt or training input: the concatenation of its chunks (text models only)."""

    chunks: list[EncodedTextChunk] = Field(default_factory=list)

    @classmethod
    def from_ints(cls, tokens: Iterable[int]) -> ModelInput:
        """Build an input of one chunk from token ids."""
        return cls(chunks=[EncodedTextChunk(tokens=[int(t) for t in tokens])])

    @classmethod
    def empty(cls) -> ModelInput:
        """An input without tokens."""
        return cls(chunks=[])

    def to_ints(self) -> list[int]:
        """Return every token id, chunk after chunk."""
        return [t for chunk in self.chunks for t in chunk.tokens]

    @property
    def length(self) -> int:
        """Number of tokens."""
        return sum(chunk.length for chunk in self.chunks)

    def append_int(self, token: int) -> ModelInput:
        """Return a copy with ``token`` appended."""
        return ModelInput.from_ints([*self.to_ints(), int(token)])
