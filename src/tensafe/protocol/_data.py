"""Training data and prompts on the wire: ``TensorData``, prompt chunks, ``ModelInput``, ``Datum``.

One definition for the server (which validates ``/asample`` prompts with it) and the SDK
(which builds prompts and training data with it; forward/backward data then travel as
protobuf, :mod:`tensafe.protocol.wire`). NumPy is the only dependency beyond pydantic.

Provenance spans (``tinker==0.38.0``'s ``PromptProvenanceSpan`` / ``SampledProvenanceSpan``)
say where the positions of a datum come from: which sampled sequence's prompt or sampled
tokens. ``stable_reinforce`` needs them to find the stability information the server
recorded when sampling with ``record_stability_info``. The server decodes them as
:class:`tensafe.protocol.wire.WireSpan` and checks them again.
"""

from __future__ import annotations

from collections.abc import Iterable, Sequence
from typing import Annotated, Any, Final, Literal, Self

import numpy as np
from pydantic import Field, StringConstraints, field_validator, model_validator

from tensafe.protocol._base import WireRequest

__all__ = [
    "MAX_SEQUENCE_ID_LENGTH",
    "Datum",
    "EncodedTextChunk",
    "MediaChunk",
    "ModelInput",
    "ModelInputChunk",
    "PromptProvenanceSpan",
    "ProvenanceSpan",
    "ProvenanceSpans",
    "SampledProvenanceSpan",
    "TensorData",
]

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

    def append(self, chunk: ModelInputChunk) -> ModelInput:
        """Return a copy with ``chunk`` appended (as the Tinker SDK's ``ModelInput.append``)."""
        return ModelInput(chunks=[*self.chunks, chunk])

    def append_int(self, token: int) -> ModelInput:
        """Return a copy with ``token`` appended."""
        return ModelInput.from_ints([*self.to_ints(), int(token)])


#: Longest ``sequence_id`` a provenance span may name (the server refuses longer ones).
MAX_SEQUENCE_ID_LENGTH: Final = 300

#: A ``SampledSequence.sequence_id`` (an entry of an ``asample`` answer's ``sample_sequence_ids``).
SequenceId = Annotated[str, StringConstraints(min_length=1, max_length=MAX_SEQUENCE_ID_LENGTH)]
_Count = Annotated[int, Field(ge=0, le=2**62)]


class PromptProvenanceSpan(WireRequest):
    """A run of ``length`` datum positions that are positions ``[offset, offset + length)`` of the
    prompt of the sampling request that produced ``sequence_id``.

    Runs tile the field they annotate (see :meth:`Datum.with_provenance`): every position is
    in exactly one run and position comes from order. ``length`` and ``offset`` must be
    >= 0 and ``sequence_id`` non-empty (a ``ValidationError``, a ``ValueError``, otherwise).
    """

    sequence_id: SequenceId
    offset: _Count = 0
    length: _Count
    type: Literal["prompt_tokens"] = "prompt_tokens"


class SampledProvenanceSpan(WireRequest):
    """A run of ``length`` datum positions that are positions ``[offset, offset + length)`` of the
    sampled tokens of ``sequence_id``.

    Two sampled sequences back to back are two adjacent runs, each naming its own sequence.
    """

    sequence_id: SequenceId
    offset: _Count = 0
    length: _Count
    type: Literal["sampled_tokens"] = "sampled_tokens"


#: One provenance run (the ``type`` names the protobuf arm: ``prompt_tokens`` or ``sampled_tokens``).
ProvenanceSpan = Annotated[PromptProvenanceSpan | SampledProvenanceSpan, Field(discriminator="type")]
#: Consecutive runs tiling one field of a :class:`Datum` (see :meth:`Datum.with_provenance`).
ProvenanceSpans = list[ProvenanceSpan]


class Datum(WireRequest):
    """A training example.

    ``loss_fn_inputs`` values may be :class:`TensorData`, NumPy arrays or plain lists; lists
    are converted as the Tinker SDK does: ``target_tokens`` to int64, ``weights``,
    ``advantages``, ``logprobs``, the clip thresholds and ``sequence_ratio_mask`` to
    float32. Any other key needs an explicit ``TensorData`` or array.

    ``model_input_spans`` / ``loss_fn_input_spans`` (provenance, as in ``tinker==0.38.0``)
    come as a pair: both or neither (a ``ValidationError`` otherwise). Attach them with
    :meth:`with_provenance`, which also checks that they tile their fields.
    """

    model_input: ModelInput
    loss_fn_inputs: dict[str, TensorData] = Field(default_factory=dict)
    model_input_spans: ProvenanceSpans | None = Field(default=None, max_length=1_000_000)
    """Provenance of the input tokens: consecutive runs tiling ``model_input``."""
    loss_fn_input_spans: ProvenanceSpans | None = Field(default=None, max_length=1_000_000)
    """Attribution of the loss rows: consecutive runs tiling ``loss_fn_inputs["target_tokens"]``."""

    @model_validator(mode="after")
    def _spans_come_as_a_pair(self) -> Self:
        if (self.model_input_spans is None) != (self.loss_fn_input_spans is None):
            raise ValueError(
                "model_input_spans and loss_fn_input_spans come as a pair: set both or neither "
                "(use Datum.with_provenance)"
            )
        return self

    def with_provenance(
        self, model_input: Sequence[ProvenanceSpan], loss_fn_inputs: Sequence[ProvenanceSpan]
    ) -> Datum:
        """Return a copy carrying provenance for both span-annotated fields.

        ``model_input`` runs tile the input tokens (their lengths sum to
        ``self.model_input.length``), ``loss_fn_inputs`` runs tile the rows of
        ``loss_fn_inputs["target_tokens"]`` (checked when the datum has one; its first
        dimension, as the server counts it). A miscounted partition thus fails here rather
        than as a request error.

        Raises:
            ValueError: The runs do not tile their field, or an entry is not a span.
        """
        _check_tiling("model_input", model_input, self.model_input.length)
        targets = self.loss_fn_inputs.get("target_tokens")
        if targets is not None:
            shape = targets.shape if targets.shape is not None else [len(targets.data)]
            if len(shape) >= 1:
                _check_tiling("loss_fn_inputs", loss_fn_inputs, int(shape[0]))
        return Datum(
            model_input=self.model_input,
            loss_fn_inputs=self.loss_fn_inputs,
            model_input_spans=list(model_input),
            loss_fn_input_spans=list(loss_fn_inputs),
        )

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


def _check_tiling(kwarg: str, spans: Sequence[Any], expected_length: int) -> None:
    for span in spans:
        if not isinstance(span, (PromptProvenanceSpan, SampledProvenanceSpan)):
            raise ValueError(
                f"with_provenance {kwarg} entries must be PromptProvenanceSpan or SampledProvenanceSpan, "
                f"got {type(span).__name__}"
            )
    total = sum(span.length for span in spans)
    if total != expected_length:
        raise ValueError(
            f"with_provenance {kwarg} spans cover {total} positions but the field has {expected_length}; "
            "the runs must tile it exactly"
        )
