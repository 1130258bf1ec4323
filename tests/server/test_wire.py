"""The protobuf codec matches the official SDK's schema and its own encoder/decoder.

Oracles: the ``tinker==0.38.0`` SDK's descriptor (field by field), its request encoder
(``forward_backward_request_to_proto``) and its response decoders, plus the byte-exact
82-byte ForwardBackwardOutput vector recorded in the protocol reference (section 4.3).
"""

from __future__ import annotations

import math

import numpy as np
import pytest
from google.protobuf import descriptor_pb2
from hypothesis import given, settings
from hypothesis import strategies as st

from tensafe.protocol.wire import (
    WireFormatError,
    decode_forward_backward_request,
    encode_forward_backward_output,
    encode_sample_response,
    message_class,
)

tinker = pytest.importorskip("tinker")
from tinker import types  # noqa: E402
from tinker.proto import request_conv, response_conv  # noqa: E402
from tinker.proto import tinker_public_pb2 as sdk_pb  # noqa: E402

#: ForwardBackwardOutput with one datum's logprobs [-1.0, -0.5] and loss:sum = 0.5.
VECTOR_FB_OUTPUT = bytes.fromhex(
    "0a0b41727261795265636f7264122e122a0a086c6f6770726f6273121e0a08000080bf000000bf1210000000000000"
    "00000800000000000000180118011a130a086c6f73733a73756d11000000000000e03f"
)


def _fields(desc: descriptor_pb2.DescriptorProto) -> list[tuple[str, int, int, int, bool]]:
    return sorted((f.name, f.number, f.type, f.label, f.proto3_optional) for f in desc.field)


def test_schema_matches_the_sdk_descriptor_field_by_field() -> None:
    sdk = descriptor_pb2.FileDescriptorProto()
    sdk_pb.DESCRIPTOR.CopyToProto(sdk)
    ours = {}
    for name in [m.name for m in sdk.message_type]:
        if name in ("SamplingParams", "StopStrings", "StopTokens"):
            continue  # JSON in SDK 0.38.0; not part of our schema.
        proto = descriptor_pb2.DescriptorProto()
        message_class(name).DESCRIPTOR.CopyToProto(proto)
        ours[name] = proto
    for sdk_msg in sdk.message_type:
        if sdk_msg.name in ours:
            assert _fields(ours[sdk_msg.name]) == _fields(sdk_msg), sdk_msg.name


def test_the_recorded_output_vector_is_reproduced_byte_for_byte() -> None:
    encoded = encode_forward_backward_output(
        [{"logprobs": np.array([-1.0, -0.5], dtype=np.float32)}], {"loss:sum": 0.5}
    )
    assert encoded == VECTOR_FB_OUTPUT


def _sdk_request(datums: list[types.Datum], loss_fn: str = "ppo", config: dict | None = None) -> bytes:
    req = types.ForwardBackwardRequest(
        forward_backward_input=types.ForwardBackwardInput(
            data=datums, loss_fn=loss_fn, loss_fn_config=config
        ),
        model_id="s:train:0",
        seq_id=7,
    )
    return request_conv.forward_backward_request_to_proto(req).SerializeToString()


def test_decodes_what_the_sdk_encodes_dense_sparse_and_zstd() -> None:
    import torch
    import zstandard

    dense = types.Datum(
        model_input=types.ModelInput.from_ints([5, 6]),
        loss_fn_inputs={"target_tokens": [6, 7], "weights": [0.0, 1.0], "clip_low_threshold": [0.8, 0.8]},
    )
    target = torch.zeros((3, 4), dtype=torch.int64)
    target[1, 2] = 9
    weights = torch.zeros((3, 4), dtype=torch.float32)
    weights[1, 2] = 1.0
    sparse = types.Datum(
        model_input=types.ModelInput(
            chunks=[types.EncodedTextChunk(tokens=[1, 2]), types.EncodedTextChunk(tokens=[3])]
        ),
        loss_fn_inputs={"target_tokens": target, "weights": weights},
    )
    body = _sdk_request([dense, sparse], config={"clip_high_threshold": 1.3, "loss_id": "abc"})
    for raw, encoding in ((body, None), (zstandard.ZstdCompressor().compress(body), "zstd")):
        req = decode_forward_backward_request(raw, content_encoding=encoding)
        assert (req.model_id, req.seq_id, req.loss_fn, req.forward_only) == ("s:train:0", 7, "ppo", False)
        assert req.loss_fn_config == {"clip_high_threshold": pytest.approx(1.3), "loss_id": "abc"}
        first, second = req.data
        assert first.tokens.tolist() == [5, 6]
        assert first.loss_fn_inputs["target_tokens"].dtype == np.int64
        assert first.loss_fn_inputs["weights"].tolist() == [0.0, 1.0]
        assert second.tokens.tolist() == [1, 2, 3]
        assert np.array_equal(second.loss_fn_inputs["target_tokens"], target.numpy())
        assert np.array_equal(second.loss_fn_inputs["weights"], weights.numpy())


def test_the_sdk_decodes_our_outputs_and_samples() -> None:
    outputs = [
        {"logprobs": np.array([-1.0, -2.0, -3.0], dtype=np.float32)},
        {"logprobs": np.array([-0.25], dtype=np.float32)},
    ]
    decoded = response_conv.deserialize_forward_backward_output(
        encode_forward_backward_output(outputs, {"loss:sum": 6.25, "tokens:sum": 4})
    )
    assert decoded.metrics == {"loss:sum": 6.25, "tokens:sum": 4.0}
    assert [o["logprobs"].tolist() for o in decoded.loss_fn_outputs] == [[-1.0, -2.0, -3.0], [-0.25]]

    sample = response_conv.deserialize_sample_response(
        encode_sample_response(
            [([4, 5], [-0.5, -1.5], "length"), ([6], [-0.125], "stop")], prompt_logprobs=[None, -2.0, -3.5]
        )
    )
    assert [s.tokens for s in sample.sequences] == [[4, 5], [6]]
    assert [s.logprobs for s in sample.sequences] == [[-0.5, -1.5], [-0.125]]
    assert [s.stop_reason for s in sample.sequences] == ["length", "stop"]
    assert sample.prompt_logprobs == [None, -2.0, -3.5]


def test_metric_keys_must_have_one_colon() -> None:
    with pytest.raises(ValueError, match="name:reduction"):
        encode_forward_backward_output([], {"loss": 1.0})


@pytest.mark.parametrize(
    ("mutate", "message"),
    [
        (lambda b: b[:-3], "not a valid"),
        (lambda b: b"\xff\xff\xff", "not a valid"),
    ],
)
def test_malformed_bodies_are_wire_format_errors(mutate, message) -> None:  # type: ignore[no-untyped-def]
    body = _sdk_request(
        [types.Datum(model_input=types.ModelInput.from_ints([1]), loss_fn_inputs={"target_tokens": [2]})]
    )
    with pytest.raises(WireFormatError, match=message):
        decode_forward_backward_request(mutate(body))


def test_inconsistent_tensors_and_bad_encodings_are_refused() -> None:
    msg = message_class("ForwardBackwardRequest")()
    datum = msg.data.add()
    datum.model_input.add().encoded_text.tokens = np.array([1, 2], dtype="<i4").tobytes()
    t = datum.loss_fn_inputs["weights"]
    t.dense = np.zeros(3, dtype="<f4").tobytes()
    t.dtype = 1
    t.shape.extend([2])
    with pytest.raises(WireFormatError, match="does not match"):
        decode_forward_backward_request(msg.SerializeToString())
    t.shape[:] = []
    t.sparse_csr.values = np.ones(1, dtype="<f4").tobytes()
    t.sparse_csr.crow_indices = np.array([0, 5], dtype="<i8").tobytes()
    t.sparse_csr.col_indices = np.array([0], dtype="<i8").tobytes()
    t.shape.extend([1, 2])
    with pytest.raises(WireFormatError, match="sparse CSR"):
        decode_forward_backward_request(msg.SerializeToString())
    with pytest.raises(WireFormatError, match="Content-Encoding"):
        decode_forward_backward_request(b"", content_encoding="br")
    with pytest.raises(WireFormatError, match="zstd"):
        decode_forward_backward_request(b"not zstd", content_encoding="zstd")
    image = message_class("ForwardBackwardRequest")()
    image.data.add().model_input.add().image.data = b"png"
    with pytest.raises(WireFormatError, match="image chunks"):
        decode_forward_backward_request(image.SerializeToString())


@settings(max_examples=300, deadline=None)
@given(st.binary(max_size=400))
def test_fuzz_arbitrary_bytes_decode_or_raise_wire_format_error(blob: bytes) -> None:
    try:
        req = decode_forward_backward_request(blob)
    except WireFormatError:
        return
    for datum in req.data:
        assert datum.tokens.dtype == np.int64
        assert all(isinstance(v, np.ndarray) for v in datum.loss_fn_inputs.values())


@settings(max_examples=100, deadline=None)
@given(
    st.lists(
        st.lists(st.floats(width=32, allow_nan=False, allow_infinity=False), min_size=0, max_size=6),
        min_size=1,
        max_size=5,
    ),
    st.floats(allow_nan=False, allow_infinity=False),
)
def test_property_sdk_roundtrip_of_outputs(rows: list[list[float]], loss: float) -> None:
    outputs = [{"logprobs": np.array(r, dtype=np.float32)} for r in rows]
    decoded = response_conv.deserialize_forward_backward_output(
        encode_forward_backward_output(outputs, {"loss:sum": loss})
    )
    assert [o["logprobs"].tolist() for o in decoded.loss_fn_outputs] == [
        np.array(r, dtype=np.float32).tolist() for r in rows
    ]
    assert math.isclose(decoded.metrics["loss:sum"], loss) or decoded.metrics["loss:sum"] == loss
