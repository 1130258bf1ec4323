"""Protobuf bodies of the Tinker protocol: forward/backward requests and results, samples.

The schema (field numbers and wire types of the ``tinker_public`` proto3 package, as the
``tinker==0.38.0`` SDK encodes them) is built here in code, in a private descriptor
pool, so neither ``protoc`` nor the SDK is needed. ``tests/server/test_wire.py`` checks
it field by field against the SDK's own descriptor and with byte-exact vectors.

Only the ``protobuf`` runtime and NumPy are imported (no torch).
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

import numpy as np
from google.protobuf import descriptor_pb2, descriptor_pool, message_factory
from google.protobuf.message import DecodeError, Message

from tensafe.errors import TenSafeError

__all__ = [
    "MAX_DECOMPRESSED_BYTES",
    "ForwardBackwardRequest",
    "WireDatum",
    "WireFormatError",
    "WireSpan",
    "decode_forward_backward_request",
    "encode_forward_backward_output",
    "encode_sample_response",
    "message_bytes",
    "message_class",
]

#: Largest forward/backward body accepted after zstd decompression (bytes).
MAX_DECOMPRESSED_BYTES = 256 * 1024 * 1024

_PACKAGE = "tensafe_tinker_wire"
_F = descriptor_pb2.FieldDescriptorProto

# (name, number, type, label, type_name or "", oneof name or "", proto3 optional)
_FieldSpec = tuple[str, int, int, int, str, str, bool]

_OPT, _REP = _F.LABEL_OPTIONAL, _F.LABEL_REPEATED
_BYTES, _STR, _I32, _I64, _U32, _BOOL, _DBL, _MSG, _ENUM = (
    _F.TYPE_BYTES,
    _F.TYPE_STRING,
    _F.TYPE_INT32,
    _F.TYPE_INT64,
    _F.TYPE_UINT32,
    _F.TYPE_BOOL,
    _F.TYPE_DOUBLE,
    _F.TYPE_MESSAGE,
    _F.TYPE_ENUM,
)


def _f(
    name: str,
    number: int,
    ftype: int,
    label: int = _OPT,
    type_name: str = "",
    oneof: str = "",
    opt: bool = False,
) -> _FieldSpec:
    return (name, number, ftype, label, type_name, oneof, opt)


_MESSAGES: dict[str, list[_FieldSpec]] = {
    "SampleResponse": [
        _f("sequences", 1, _MSG, _REP, "SampledSequence"),
        _f("prompt_logprobs", 2, _BYTES, opt=True),
        _f("topk_prompt_logprobs", 3, _MSG, type_name="TopkLogprobs", opt=True),
        _f("prompt_cache_hit_tokens", 4, _I32),
        _f("target_prompt_logprobs", 5, _MSG, type_name="Tensor", opt=True),
        _f("prompt_alt_tokens", 6, _MSG, type_name="PromptAltTokens", opt=True),
    ],
    "PromptAltTokens": [
        _f("tokens", 1, _MSG, type_name="Tensor"),
        _f("logprobs", 2, _MSG, type_name="Tensor"),
    ],
    "SampledSequence": [
        _f("stop_reason", 1, _ENUM, type_name="StopReason"),
        _f("tokens", 2, _BYTES),
        _f("logprobs", 3, _BYTES, opt=True),
        _f("topk_sampled_logprobs", 4, _MSG, type_name="TopkLogprobs", opt=True),
    ],
    "TopkLogprobs": [
        _f("token_ids", 1, _BYTES),
        _f("logprobs", 2, _BYTES),
        _f("k", 3, _U32),
        _f("length", 4, _U32),
    ],
    "SparseCsr": [_f("values", 1, _BYTES), _f("crow_indices", 2, _BYTES), _f("col_indices", 3, _BYTES)],
    "Tensor": [
        _f("dense", 1, _BYTES, oneof="encoding"),
        _f("sparse_csr", 2, _MSG, type_name="SparseCsr", oneof="encoding"),
        _f("dtype", 3, _ENUM, type_name="DType"),
        _f("shape", 4, _I64, _REP),
    ],
    "BatchedTensor": [
        _f("data", 1, _BYTES),
        _f("offsets", 2, _BYTES),
        _f("dtype", 3, _ENUM, type_name="DType"),
        _f("trailing_shape", 4, _I64, _REP),
    ],
    "ArrayRecord": [
        _f("type_tag", 1, _STR),
        _f("fields", 2, _MSG, _REP, "map:string:BatchedTensor"),
        _f("num_datums", 3, _I64),
    ],
    "ForwardBackwardOutput": [
        _f("loss_fn_output_type", 1, _STR),
        _f("loss_fn_outputs", 2, _MSG, _REP, "ArrayRecord"),
        _f("metrics", 3, _MSG, _REP, "map:string:double"),
    ],
    "ForwardBackwardRequest": [
        _f("model_id", 1, _STR),
        _f("seq_id", 2, _I32),
        _f("data", 3, _MSG, _REP, "Datum"),
        _f("loss_fn", 4, _STR),
        _f("loss_fn_config", 5, _MSG, _REP, "map:string:double"),
        _f("forward_only", 6, _BOOL),
        _f("loss_fn_config_v2", 7, _MSG, _REP, "map:string:LossConfigValue"),
    ],
    "LossConfigValue": [_f("number", 1, _DBL, oneof="value"), _f("text", 2, _STR, oneof="value")],
    "Datum": [
        _f("model_input", 1, _MSG, _REP, "Chunk"),
        _f("loss_fn_inputs", 2, _MSG, _REP, "map:string:Tensor"),
        _f("model_input_spans", 3, _MSG, _REP, "ProvenanceSpan"),
        _f("loss_fn_input_spans", 4, _MSG, _REP, "ProvenanceSpan"),
    ],
    "ProvenanceSpan": [
        _f("prompt_tokens", 1, _MSG, type_name="PromptProvenanceSpan", oneof="span"),
        _f("sampled_tokens", 2, _MSG, type_name="SampledProvenanceSpan", oneof="span"),
    ],
    "PromptProvenanceSpan": [_f("sequence_id", 1, _STR), _f("offset", 2, _I64), _f("length", 3, _I64)],
    "SampledProvenanceSpan": [_f("sequence_id", 1, _STR), _f("offset", 2, _I64), _f("length", 3, _I64)],
    "Chunk": [
        _f("encoded_text", 1, _MSG, type_name="EncodedTextChunk", oneof="chunk"),
        _f("image", 2, _MSG, type_name="ImageChunk", oneof="chunk"),
        _f("dmel", 3, _MSG, type_name="DmelChunk", oneof="chunk"),
    ],
    "EncodedTextChunk": [_f("tokens", 1, _BYTES)],
    "ImageChunk": [
        _f("data", 1, _BYTES),
        _f("format", 2, _STR),
        _f("expected_tokens", 3, _I32, opt=True),
        _f("override_dimensions", 4, _MSG, type_name="ImageDimensions", opt=True),
    ],
    "ImageDimensions": [_f("width", 1, _U32), _f("height", 2, _U32)],
    "DmelChunk": [_f("dmel", 1, _BYTES)],
}

_ENUMS: dict[str, list[tuple[str, int]]] = {
    "StopReason": [("STOP_REASON_STOP", 0), ("STOP_REASON_LENGTH", 1)],
    "DType": [
        ("DTYPE_UNSPECIFIED", 0),
        ("DTYPE_FLOAT32", 1),
        ("DTYPE_INT64", 2),
        ("DTYPE_INT32", 3),
        ("DTYPE_BFLOAT16", 4),
    ],
}

_SCALARS = {"string": _STR, "double": _DBL}


def _entry_name(field_name: str) -> str:
    return "".join(part.capitalize() for part in field_name.split("_")) + "Entry"


def _build_file() -> descriptor_pb2.FileDescriptorProto:
    fd = descriptor_pb2.FileDescriptorProto(
        name="tensafe_tinker_wire.proto", package=_PACKAGE, syntax="proto3"
    )
    for ename, values in _ENUMS.items():
        enum = fd.enum_type.add(name=ename)
        for vname, number in values:
            enum.value.add(name=vname, number=number)
    for mname, fields in _MESSAGES.items():
        msg = fd.message_type.add(name=mname)
        oneofs: list[str] = []
        for name, number, ftype, label, type_name, oneof, opt in fields:
            fdp = msg.field.add(name=name, number=number, type=ftype, label=label)
            if type_name.startswith("map:"):
                _, key, value = type_name.split(":")
                entry = msg.nested_type.add(name=_entry_name(name))
                entry.options.map_entry = True
                entry.field.add(name="key", number=1, type=_SCALARS[key], label=_OPT)
                vfield = entry.field.add(name="value", number=2, label=_OPT)
                if value in _SCALARS:
                    vfield.type = _SCALARS[value]
                else:
                    vfield.type, vfield.type_name = _MSG, f".{_PACKAGE}.{value}"
                fdp.type_name = f".{_PACKAGE}.{mname}.{entry.name}"
            elif type_name:
                fdp.type_name = f".{_PACKAGE}.{type_name}"
            group = f"_{name}" if opt else oneof
            if group:
                if group not in oneofs:
                    oneofs.append(group)
                    msg.oneof_decl.add(name=group)
                fdp.oneof_index = oneofs.index(group)
                if opt:
                    fdp.proto3_optional = True
        # proto3 requires synthetic oneofs (optional fields) to come after real ones.
        real = [o for o in oneofs if not o.startswith("_")]
        order = real + [o for o in oneofs if o.startswith("_")]
        if order != oneofs:
            del msg.oneof_decl[:]
            for name in order:
                msg.oneof_decl.add(name=name)
            for fdp in msg.field:
                if fdp.HasField("oneof_index"):
                    fdp.oneof_index = order.index(oneofs[fdp.oneof_index])
    return fd


_POOL = descriptor_pool.DescriptorPool()
_FILE = _POOL.Add(_build_file())


def message_class(name: str) -> type[Message]:
    """Return the generated message class for ``name`` (e.g. ``"ForwardBackwardOutput"``)."""
    cls: type[Message] = message_factory.GetMessageClass(_POOL.FindMessageTypeByName(f"{_PACKAGE}.{name}"))
    return cls


class WireFormatError(TenSafeError, ValueError):
    """A protobuf body is malformed or violates the protocol's rules (a user error, HTTP 400)."""


_DTYPE_FLOAT32, _DTYPE_INT64, _DTYPE_INT32, _DTYPE_BF16 = 1, 2, 3, 4
_NP_OF: dict[int, np.dtype[Any]] = {
    _DTYPE_FLOAT32: np.dtype("<f4"),
    _DTYPE_INT64: np.dtype("<i8"),
    _DTYPE_INT32: np.dtype("<i4"),
}
_MAX_DATUMS = 65536
_MAX_ELEMENTS = 16 * 1024 * 1024


@dataclass(frozen=True)
class WireSpan:
    """A provenance span: ``length`` positions are ``[offset, offset + length)`` of a recorded sequence.

    Attributes:
        kind: ``"prompt"`` (the named sequence's sampling prompt) or ``"sampled"`` (its
            sampled tokens).
        sequence_id: A ``sample_sequence_ids`` entry of an ``asample`` answer.
        offset: First position within the prompt or the sampled tokens (>= 0).
        length: Number of positions (>= 0).
    """

    kind: str
    sequence_id: str
    offset: int
    length: int


@dataclass(frozen=True)
class WireDatum:
    """One datum of a forward/backward request.

    Attributes:
        tokens: The model input: every ``encoded_text`` chunk concatenated (int64).
        loss_fn_inputs: Dense arrays (``target_tokens`` int64, ``weights`` float32, ...).
        model_input_spans: Provenance runs tiling ``tokens`` (None: the datum has none).
        loss_fn_input_spans: Provenance runs tiling the rows of ``target_tokens``; present
            exactly when ``model_input_spans`` is.
    """

    tokens: np.ndarray
    loss_fn_inputs: Mapping[str, np.ndarray]
    model_input_spans: tuple[WireSpan, ...] | None = None
    loss_fn_input_spans: tuple[WireSpan, ...] | None = None


@dataclass(frozen=True)
class ForwardBackwardRequest:
    """A decoded ``/forward_backward`` body."""

    model_id: str
    seq_id: int
    loss_fn: str
    forward_only: bool
    data: Sequence[WireDatum]
    loss_fn_config: Mapping[str, float | str] = field(default_factory=dict)


def _array(raw: bytes, dtype: np.dtype[Any], what: str) -> np.ndarray:
    if len(raw) % dtype.itemsize:
        raise WireFormatError(f"{what}: {len(raw)} bytes is not a whole number of {dtype.name} values")
    if len(raw) // dtype.itemsize > _MAX_ELEMENTS:
        raise WireFormatError(f"{what}: too many values")
    return np.frombuffer(raw, dtype=dtype).copy()


def _tensor(t: Any, what: str) -> np.ndarray:
    dtype = _NP_OF.get(int(t.dtype))
    if dtype is None or int(t.dtype) == _DTYPE_INT32:
        raise WireFormatError(f"{what}: dtype must be float32 or int64")
    shape = [int(s) for s in t.shape]
    if any(s < 0 for s in shape) or len(shape) > 2:
        raise WireFormatError(f"{what}: shape must have one or two non-negative dimensions")
    encoding = t.WhichOneof("encoding")
    if encoding == "sparse_csr":
        if len(shape) != 2:
            raise WireFormatError(f"{what}: a sparse CSR tensor needs a two-dimensional shape")
        rows, cols = shape
        values = _array(t.sparse_csr.values, dtype, what)
        crow = _array(t.sparse_csr.crow_indices, np.dtype("<i8"), what)
        col = _array(t.sparse_csr.col_indices, np.dtype("<i8"), what)
        if rows * cols > _MAX_ELEMENTS:
            raise WireFormatError(f"{what}: too many values")
        if (
            len(crow) != rows + 1
            or crow[0] != 0
            or np.any(np.diff(crow) < 0)
            or crow[-1] != len(values)
            or len(col) != len(values)
            or (len(col) and (col.min() < 0 or col.max() >= cols))
        ):
            raise WireFormatError(f"{what}: inconsistent sparse CSR indices")
        dense = np.zeros((rows, cols), dtype=dtype)
        row_of = np.repeat(np.arange(rows), np.diff(crow))
        dense[row_of, col] = values
        result: np.ndarray = dense
        return result
    values = _array(t.dense, dtype, what)
    if not shape:
        return values
    if int(np.prod(shape)) != values.size:
        raise WireFormatError(f"{what}: shape {shape} does not match {values.size} values")
    return values.reshape(shape)


#: Longest ``sequence_id`` a provenance span may name.
_MAX_SEQUENCE_ID = 300


def _spans(raw: Any, what: str) -> tuple[WireSpan, ...]:
    out = []
    for j, span in enumerate(raw):
        kind = span.WhichOneof("span")
        if kind is None:
            raise WireFormatError(f"{what} span {j}: neither prompt_tokens nor sampled_tokens")
        arm = getattr(span, kind)
        if not arm.sequence_id or len(arm.sequence_id) > _MAX_SEQUENCE_ID:
            raise WireFormatError(f"{what} span {j}: sequence_id must be 1 to {_MAX_SEQUENCE_ID} characters")
        if arm.offset < 0 or arm.length < 0:
            raise WireFormatError(f"{what} span {j}: offset and length must be >= 0")
        out.append(
            WireSpan(
                kind="prompt" if kind == "prompt_tokens" else "sampled",
                sequence_id=arm.sequence_id,
                offset=int(arm.offset),
                length=int(arm.length),
            )
        )
    return tuple(out)


def _provenance(
    datum: Any, index: int, length: int, targets: np.ndarray | None
) -> tuple[tuple[WireSpan, ...] | None, tuple[WireSpan, ...] | None]:
    """The datum's provenance spans, checked to come as a pair and to tile their fields."""
    if not datum.model_input_spans and not datum.loss_fn_input_spans:
        return None, None
    where = f"datum {index}"
    if not datum.model_input_spans or not datum.loss_fn_input_spans:
        raise WireFormatError(
            f"{where}: model_input_spans and loss_fn_input_spans come as a pair: set both or neither"
        )
    model = _spans(datum.model_input_spans, f"{where} model_input_spans")
    loss = _spans(datum.loss_fn_input_spans, f"{where} loss_fn_input_spans")
    if sum(s.length for s in model) != length:
        raise WireFormatError(
            f"{where}: model_input_spans cover {sum(s.length for s in model)} positions but model_input "
            f"has {length}; the spans must tile it exactly"
        )
    rows = None if targets is None or targets.ndim == 0 else int(targets.shape[0])
    if rows is not None and sum(s.length for s in loss) != rows:
        raise WireFormatError(
            f"{where}: loss_fn_input_spans cover {sum(s.length for s in loss)} positions but target_tokens "
            f"has {rows}; the spans must tile it exactly"
        )
    return model, loss


def decode_forward_backward_request(
    body: bytes, *, content_encoding: str | None = None, max_datums: int = _MAX_DATUMS
) -> ForwardBackwardRequest:
    """Decode (and, for ``Content-Encoding: zstd``, decompress) a forward/backward body.

    Raises:
        WireFormatError: The body is not a valid request: bad compression or protobuf,
            image/audio chunks (text models only), dtypes or shapes that are inconsistent,
            token ids out of range, too many datums.
    """
    body = message_bytes(body, content_encoding)
    msg: Any = message_class("ForwardBackwardRequest")()
    try:
        msg.ParseFromString(body)
    except DecodeError:
        raise WireFormatError("the body is not a valid ForwardBackwardRequest protobuf message") from None
    if len(msg.data) > max_datums:
        raise WireFormatError(f"too many datums in one request ({len(msg.data)} > {max_datums})")
    config: dict[str, float | str] = {k: float(v) for k, v in msg.loss_fn_config.items()}
    for key, value in msg.loss_fn_config_v2.items():
        kind = value.WhichOneof("value")
        config[key] = value.text if kind == "text" else float(value.number)
    data = []
    for i, datum in enumerate(msg.data):
        parts = []
        for chunk in datum.model_input:
            kind = chunk.WhichOneof("chunk")
            if kind != "encoded_text":
                raise WireFormatError(
                    f"datum {i}: {kind or 'empty'} chunks are not supported (text models only)"
                )
            parts.append(_array(chunk.encoded_text.tokens, np.dtype("<i4"), f"datum {i} tokens"))
        tokens = np.concatenate(parts).astype(np.int64) if parts else np.zeros(0, dtype=np.int64)
        if tokens.size and tokens.min() < 0:
            raise WireFormatError(f"datum {i}: negative token id")
        inputs = {name: _tensor(t, f"datum {i} {name}") for name, t in datum.loss_fn_inputs.items()}
        model_spans, loss_spans = _provenance(datum, i, len(tokens), inputs.get("target_tokens"))
        data.append(
            WireDatum(
                tokens=tokens,
                loss_fn_inputs=inputs,
                model_input_spans=model_spans,
                loss_fn_input_spans=loss_spans,
            )
        )
    return ForwardBackwardRequest(
        model_id=msg.model_id,
        seq_id=int(msg.seq_id),
        loss_fn=msg.loss_fn,
        forward_only=bool(msg.forward_only),
        data=data,
        loss_fn_config=config,
    )


def message_bytes(body: bytes, content_encoding: str | None = None) -> bytes:
    """Return the uncompressed protobuf bytes of a body (decompressing ``zstd``).

    Raises:
        WireFormatError: Unsupported encoding or corrupt compressed data.
    """
    if content_encoding in (None, "", "identity"):
        return body
    if content_encoding.strip().lower() != "zstd":
        raise WireFormatError(f"unsupported Content-Encoding {content_encoding!r}: use zstd or none")
    return _unzstd(body)


def _unzstd(body: bytes) -> bytes:
    try:
        import zstandard
    except ImportError:  # pragma: no cover - zstandard is a dependency of the server extra
        raise WireFormatError("this server cannot decompress zstd bodies (install zstandard)") from None
    try:
        return bytes(zstandard.ZstdDecompressor().decompress(body, max_output_size=MAX_DECOMPRESSED_BYTES))
    except zstandard.ZstdError:
        raise WireFormatError("the zstd body is corrupt, or larger than allowed when decompressed") from None


def _check_metric_key(key: str) -> None:
    if key.count(":") != 1 or not all(key.split(":")):
        raise ValueError(f"metric key {key!r} must look like 'name:reduction' (the SDK requires one colon)")


def encode_forward_backward_output(
    outputs: Sequence[Mapping[str, np.ndarray]],
    metrics: Mapping[str, float],
    *,
    type_tag: str = "ArrayRecord",
) -> bytes:
    """Encode per-datum outputs (e.g. ``{"logprobs": float32[N]}``) and metrics.

    Every datum must have the same output names; each array may have any leading length
    and a trailing shape shared by all datums.

    Raises:
        ValueError: A metric key is not ``name:reduction`` or the outputs are inconsistent.
    """
    for key in metrics:
        _check_metric_key(key)
    msg: Any = message_class("ForwardBackwardOutput")()
    msg.loss_fn_output_type = type_tag
    for key, value in metrics.items():
        msg.metrics[key] = float(value)
    record = msg.loss_fn_outputs.add()  # its own type_tag stays empty, as in the reference vector
    record.num_datums = len(outputs)
    names = sorted(outputs[0]) if outputs else []
    for name in names:
        arrays = []
        for i, out in enumerate(outputs):
            if sorted(out) != names:
                raise ValueError(f"datum {i} has outputs {sorted(out)}, expected {names}")
            arrays.append(np.asarray(out[name]))
        trailing = arrays[0].shape[1:] if arrays and arrays[0].ndim > 1 else ()
        if any(a.shape[1:] != trailing and a.ndim > 1 for a in arrays):
            raise ValueError(f"output {name!r}: datums disagree on the trailing shape")
        is_float = np.issubdtype(arrays[0].dtype, np.floating)
        dtype, code = (np.dtype("<f4"), _DTYPE_FLOAT32) if is_float else (np.dtype("<i8"), _DTYPE_INT64)
        blobs = [np.ascontiguousarray(a, dtype=dtype).tobytes() for a in arrays]
        offsets = np.zeros(len(blobs) + 1, dtype="<i8")
        offsets[1:] = np.cumsum([len(b) for b in blobs])
        tensor = record.fields[name]
        tensor.data = b"".join(blobs)
        tensor.offsets = offsets.tobytes()
        tensor.dtype = code
        tensor.trailing_shape.extend(int(s) for s in trailing)
    return bytes(msg.SerializeToString(deterministic=True))


def encode_sample_response(
    sequences: Sequence[tuple[Sequence[int], Sequence[float], str]],
    *,
    prompt_logprobs: Sequence[float | None] | None = None,
) -> bytes:
    """Encode sampled sequences ``(tokens, logprobs, stop_reason)`` and prompt logprobs.

    ``stop_reason`` is ``"stop"`` or ``"length"``. ``None`` prompt logprobs (position 0)
    are sent as NaN, which the SDK turns back into ``None``.
    """
    msg: Any = message_class("SampleResponse")()
    for tokens, logprobs, stop in sequences:
        if len(tokens) != len(logprobs):
            raise ValueError("each sampled sequence needs one logprob per token")
        if stop not in ("stop", "length"):
            raise ValueError(f"stop_reason must be 'stop' or 'length', not {stop!r}")
        seq = msg.sequences.add()
        seq.stop_reason = 0 if stop == "stop" else 1
        seq.tokens = np.asarray(tokens, dtype="<i4").tobytes()
        seq.logprobs = np.asarray(logprobs, dtype="<f4").tobytes()
    if prompt_logprobs is not None:
        values = [np.nan if v is None else float(v) for v in prompt_logprobs]
        msg.prompt_logprobs = np.asarray(values, dtype="<f4").tobytes()
    return bytes(msg.SerializeToString(deterministic=True))
