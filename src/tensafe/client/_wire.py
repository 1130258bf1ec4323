"""Client half of the protobuf codec: encode forward/backward requests, decode results.

The schema is the one of :mod:`tensafe.protocol.wire` (shared with the server and
checked there against the official SDK's descriptor).
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from typing import Any

import numpy as np
from google.protobuf.message import DecodeError

from tensafe.client._exceptions import APIResponseValidationError
from tensafe.client.types import (
    Datum,
    ForwardBackwardOutput,
    SampledSequence,
    SampleResponse,
    TensorData,
)
from tensafe.protocol import ProvenanceSpan
from tensafe.protocol.wire import message_class

__all__ = ["decode_forward_backward_output", "decode_sample_response", "encode_forward_backward_request"]

_FLOAT32, _INT64 = 1, 2
_NP: dict[int, np.dtype[Any]] = {_FLOAT32: np.dtype("<f4"), _INT64: np.dtype("<i8")}


def encode_forward_backward_request(
    *,
    model_id: str,
    seq_id: int,
    data: Sequence[Datum],
    loss_fn: str,
    loss_fn_config: Mapping[str, float | str] | None = None,
    forward_only: bool = False,
) -> bytes:
    """Return the ``ForwardBackwardRequest`` protobuf body of a forward(/backward) call."""
    msg: Any = message_class("ForwardBackwardRequest")()
    msg.model_id = model_id
    msg.seq_id = seq_id
    msg.loss_fn = loss_fn
    msg.forward_only = forward_only
    for key, value in (loss_fn_config or {}).items():
        entry = msg.loss_fn_config_v2[key]
        if isinstance(value, str):
            entry.text = value
        else:
            entry.number = float(value)
    for datum in data:
        d = msg.data.add()
        for chunk in datum.model_input.chunks:
            if chunk.type != "encoded_text":
                raise ValueError(f"{chunk.type} chunks cannot be trained on: TenSafe serves text models only")
            d.model_input.add().encoded_text.tokens = np.asarray(chunk.tokens, dtype="<i4").tobytes()
        for name, tensor in datum.loss_fn_inputs.items():
            arr = tensor.to_numpy()
            t = d.loss_fn_inputs[name]
            if tensor.dtype == "int64":
                t.dense, t.dtype = np.ascontiguousarray(arr, dtype="<i8").tobytes(), _INT64
            else:
                t.dense, t.dtype = np.ascontiguousarray(arr, dtype="<f4").tobytes(), _FLOAT32
            t.shape.extend(int(s) for s in arr.shape)
        _write_spans(d.model_input_spans, datum.model_input_spans)
        _write_spans(d.loss_fn_input_spans, datum.loss_fn_input_spans)
    return bytes(msg.SerializeToString())


def _write_spans(field: Any, spans: Sequence[ProvenanceSpan] | None) -> None:
    """Append ``spans`` to a repeated ``ProvenanceSpan`` field (the arm named by each span's ``type``)."""
    for span in spans or ():
        arm = getattr(field.add(), span.type)  # "prompt_tokens" or "sampled_tokens"
        arm.sequence_id, arm.offset, arm.length = span.sequence_id, span.offset, span.length


def _parse(name: str, body: bytes) -> Any:
    msg: Any = message_class(name)()
    try:
        msg.ParseFromString(body)
    except DecodeError:
        raise APIResponseValidationError(f"the server sent a malformed {name} protobuf message") from None
    return msg


def _values(raw: bytes, dtype: np.dtype[Any], what: str) -> np.ndarray:
    if len(raw) % dtype.itemsize:
        raise APIResponseValidationError(f"{what}: truncated array in the server's answer")
    return np.frombuffer(raw, dtype=dtype)


def decode_forward_backward_output(body: bytes) -> ForwardBackwardOutput:
    """Decode a ``ForwardBackwardOutput`` protobuf result."""
    msg = _parse("ForwardBackwardOutput", body)
    outputs: list[dict[str, TensorData]] = []
    for record in msg.loss_fn_outputs:
        per_datum: list[dict[str, TensorData]] = [{} for _ in range(int(record.num_datums))]
        for name, batched in record.fields.items():
            dtype = _NP.get(int(batched.dtype))
            if dtype is None:
                raise APIResponseValidationError(f"output {name!r}: unsupported dtype {batched.dtype}")
            offsets = _values(batched.offsets, np.dtype("<i8"), name)
            if len(offsets) != len(per_datum) + 1:
                raise APIResponseValidationError(f"output {name!r}: offsets do not match the datums")
            trailing = [int(s) for s in batched.trailing_shape]
            width = math.prod(trailing) if trailing else 1
            for i, out in enumerate(per_datum):
                start, end = int(offsets[i]), int(offsets[i + 1])
                if not 0 <= start <= end <= len(batched.data):
                    raise APIResponseValidationError(f"output {name!r}: offsets out of range")
                values = _values(batched.data[start:end], dtype, name)
                if width == 0 or values.size % width:
                    raise APIResponseValidationError(f"output {name!r}: values do not fit the trailing shape")
                out[name] = TensorData.from_numpy(values.reshape([values.size // width, *trailing]))
        outputs.extend(per_datum)
    return ForwardBackwardOutput(
        loss_fn_output_type=msg.loss_fn_output_type,
        loss_fn_outputs=outputs,
        metrics={k: float(v) for k, v in msg.metrics.items()},
    )


def decode_sample_response(body: bytes, sequence_ids: Sequence[str] | None = None) -> SampleResponse:
    """Decode a ``SampleResponse`` protobuf result (NaN prompt logprobs become ``None``).

    ``sequence_ids`` (the ``sample_sequence_ids`` of the ``asample`` answer, fixed when the
    request was submitted) become the sequences' ``sequence_id``, in order, as the Tinker
    SDK attaches them.

    Raises:
        APIResponseValidationError: Malformed protobuf, or not one id per sequence.
    """
    msg = _parse("SampleResponse", body)
    if sequence_ids is not None and len(sequence_ids) != len(msg.sequences):
        raise APIResponseValidationError(
            f"the server sent {len(sequence_ids)} sequence ids for {len(msg.sequences)} sequences"
        )
    sequences = []
    for i, seq in enumerate(msg.sequences):
        tokens = _values(seq.tokens, np.dtype("<i4"), "sampled tokens").tolist()
        logprobs = (
            _values(seq.logprobs, np.dtype("<f4"), "sampled logprobs").tolist()
            if seq.HasField("logprobs")
            else None
        )
        sequences.append(
            SampledSequence(
                stop_reason="stop" if int(seq.stop_reason) == 0 else "length",
                tokens=tokens,
                logprobs=logprobs,
                sequence_id=sequence_ids[i] if sequence_ids is not None else None,
            )
        )
    prompt: list[float | None] | None = None
    if msg.HasField("prompt_logprobs"):
        raw = _values(msg.prompt_logprobs, np.dtype("<f4"), "prompt logprobs")
        prompt = [None if math.isnan(v) else float(v) for v in raw.tolist()]
    return SampleResponse(sequences=sequences, prompt_logprobs=prompt)
