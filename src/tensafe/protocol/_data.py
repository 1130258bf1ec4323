"""Training data and prompts on the wire: ``TensorData``, prompt chunks, ``ModelInput``, ``Datum``.

One definition for the server (which validates ``/asample`` prompts with it) and the SDK
(which builds prompts and training data with it; forward/backward data then travel as
protobuf, :mod:`tensafe.protocol.wire`). NumPy is the only dependency beyond pydantic.
"""

from __future__ import annotations

from collections.abc import Iterable
from typing import Annotated, Any, Literal

import numpy as np
from pydantic import Field, field_validator

from tensafe.protocol._base import WireRequest

__all__ = ["Datum", "EncodedTextChunk", "MediaChunk", "ModelInput", "ModelInputChunk", "TensorData"]

#: A token id: a non-negative int32.
TokenId = Annotated[int, Field(ge=0, le=2**31 - 1)]

#: Plain lists under these keys become int64 (all other known keys become float32).
_INT_KEYS = frozenset({"target_tokens"})
_FLOAT_KEYS = frozenset(
    {"weights", "advantages", "logprobs", "clip_low_threshold", "clip_high_threshold", "sequence_ratio_mask"}
)


class TensorData(WireRequest):
    """A flat list of values with a dtype and an optional shape (absent: 1-D)."""

    data: list[int] | list[float] = Field(default_factory=list)
    dtype: Literal["int64", "float32"]
    shape: list[int] | None = None

    @classmethod
    def from_numpy(cls, array: Any) -> TensorData:
        """Build from a NumPy array (integers become int64, the rest float32)."""
        arr = np.asarray(array)
        if np.issubdtype(arr.dtype, np.integer) or arr.dtype == np.bool_:
            return cls(data=arr.astype(np.int64).ravel().tolist(), dtype="int64", shape=list(arr.shape))
        return cls(data=arr.astype(np.float32).ravel().tolist(), dtype="float32", shape=list(arr.shape))

    def to_numpy(self) -> np.ndarray:
        """Return the values as a NumPy array of the right dtype and shape."""
        arr = np.asarray(self.data, dtype=np.int64 if self.dtype == "int64" else np.float32)
        return arr.reshape(self.shape) if self.shape is not None else arr

    def tolist(self) -> list[Any]:
        """Return the values as (nested) Python lists."""
        result: list[Any] = self.to_numpy().tolist()
        return result


class EncodedTextChunk(WireRequest):
    """Token ids (non-negative int32) of one piece of a prompt: the only chunk text models use."""

    tokens: list[TokenId] = Field(default_factory=list, max_length=1_000_000)
    type: Literal["encoded_text"] = "encoded_text"

    @property
    def length(self) -> int:
        """Number of tokens."""
        return len(self.tokens)


class MediaChunk(WireRequest):
    """An image, image pointer or audio chunk: part of Tinker's schema, refused (400) by TenSafe's
    text-only engine after validation, with a message that names the chunk type."""

    type: Literal["image", "image_asset_pointer", "audio"]
    tokens: list[TokenId] = Field(default_factory=list, max_length=1_000_000)
    data: Any = None
    format: Any = None
    location: Any = None
    expected_tokens: Any = None

    @property
    def length(self) -> int:
        """Number of tokens the chunk declares (0: unknown)."""
        return len(self.tokens)


#: A prompt chunk (``type`` absent means ``encoded_text``).
ModelInputChunk = EncodedTextChunk | MediaChunk


class ModelInput(WireRequest):
    """A prompt or training input: the concatenation of its chunks."""

    chunks: list[ModelInputChunk] = Field(default_factory=list, max_length=10_000)

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


class Datum(WireRequest):
    """A training example.

    ``loss_fn_inputs`` values may be :class:`TensorData`, NumPy arrays or plain lists; lists
    are converted as the Tinker SDK does: ``target_tokens`` to int64, ``weights``,
    ``advantages``, ``logprobs``, the clip thresholds and ``sequence_ratio_mask`` to
    float32. Any other key needs an explicit ``TensorData`` or array.
    """

    model_input: ModelInput
    loss_fn_inputs: dict[str, TensorData] = Field(default_factory=dict)

    @field_validator("loss_fn_inputs", mode="before")
    @classmethod
    def _convert(cls, value: Any) -> Any:
        if not isinstance(value, dict):
            return value
        out: dict[str, Any] = {}
        for key, item in value.items():
            if isinstance(item, (TensorData, dict)):
                out[key] = item
            elif key in _INT_KEYS:
                arr = np.asarray(item, dtype=np.int64)
                out[key] = TensorData(data=arr.ravel().tolist(), dtype="int64", shape=list(arr.shape))
            elif key in _FLOAT_KEYS:
                arr = np.asarray(item, dtype=np.float32)
                out[key] = TensorData(data=arr.ravel().tolist(), dtype="float32", shape=list(arr.shape))
            elif isinstance(item, np.ndarray):
                out[key] = TensorData.from_numpy(item)
            else:
                raise ValueError(f"loss_fn_inputs[{key!r}]: pass a TensorData or a NumPy array for this key")
        return out
