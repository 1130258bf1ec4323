"""Provenance spans and ``record_stability_info`` in the TenSafe SDK, as ``tinker==0.38.0`` has them.

Oracles: the official SDK's own ``Datum.with_provenance`` and protobuf request encoder
(``forward_backward_request_to_proto``), decoded by the server's codec
(:func:`tensafe.protocol.wire.decode_forward_backward_request`, which the TenSafe encoder's
bytes must decode to exactly the same datums); the official SDK's checks for the refusals.
No server: ``record_stability_info`` is checked on the bodies the SDK sends to a recording
transport (the end-to-end run is ``tests/server/test_client_sdk_stable_reinforce.py``).
"""

from __future__ import annotations

from collections.abc import Iterator
from typing import Any

import httpx
import numpy as np
import pydantic
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

import tensafe.client as ts
from tensafe.client import types
from tensafe.client._http import Transport
from tensafe.client._wire import decode_sample_response, encode_forward_backward_request
from tensafe.protocol.wire import (
    WireFormatError,
    WireSpan,
    decode_forward_backward_request,
    encode_sample_response,
)

tinker = pytest.importorskip("tinker", reason="the official tinker SDK is a test dependency (tinker==0.38.0)")
from tinker import types as tt  # noqa: E402
from tinker.proto import request_conv  # noqa: E402

KEY = "tml-" + "k" * 43
RUN = "s-1:train:0"


def _official_bytes(datums: list[Any]) -> bytes:
    req = tt.ForwardBackwardRequest(
        forward_backward_input=tt.ForwardBackwardInput(
            data=datums, loss_fn="stable_reinforce", loss_fn_config={"kl_coeff": 0.01}
        ),
        model_id=RUN,
        seq_id=3,
    )
    return bytes(request_conv.forward_backward_request_to_proto(req).SerializeToString())


def _ours_bytes(datums: list[types.Datum]) -> bytes:
    return encode_forward_backward_request(
        model_id=RUN, seq_id=3, data=datums, loss_fn="stable_reinforce", loss_fn_config={"kl_coeff": 0.01}
    )


def _rl_inputs(prompt: list[int], sampled: list[int]) -> dict[str, Any]:
    n = len(prompt) + len(sampled) - 1
    return {
        "target_tokens": [0] * (len(prompt) - 1) + sampled,
        "logprobs": [0.0] * n,
        "advantages": [1.0] * n,
    }


def _same_datums(a: bytes, b: bytes) -> None:
    da, db = decode_forward_backward_request(a), decode_forward_backward_request(b)
    assert (da.model_id, da.seq_id, da.loss_fn, dict(da.loss_fn_config)) == (
        db.model_id,
        db.seq_id,
        db.loss_fn,
        dict(db.loss_fn_config),
    )
    assert len(da.data) == len(db.data)
    for x, y in zip(da.data, db.data, strict=True):
        np.testing.assert_array_equal(x.tokens, y.tokens)
        assert x.loss_fn_inputs.keys() == y.loss_fn_inputs.keys()
        for k in x.loss_fn_inputs:
            np.testing.assert_array_equal(x.loss_fn_inputs[k], y.loss_fn_inputs[k])
        assert x.model_input_spans == y.model_input_spans
        assert x.loss_fn_input_spans == y.loss_fn_input_spans


def test_the_cookbook_datum_encodes_as_the_official_sdk_encodes_it() -> None:
    prompt, sampled, sid = [1, 2, 3], [7, 8], "s-1:sample:0:0:1"
    ours = types.Datum(
        model_input=types.ModelInput.from_ints(prompt).append(types.EncodedTextChunk(tokens=sampled[:-1])),
        loss_fn_inputs=_rl_inputs(prompt, sampled),
    ).with_provenance(
        model_input=[
            types.PromptProvenanceSpan(sequence_id=sid, length=3),
            types.SampledProvenanceSpan(sequence_id=sid, length=1),
        ],
        loss_fn_inputs=[
            types.PromptProvenanceSpan(sequence_id=sid, offset=1, length=2),
            types.SampledProvenanceSpan(sequence_id=sid, length=2),
        ],
    )
    official = tt.Datum(
        model_input=tt.ModelInput.from_ints(prompt).append(tt.EncodedTextChunk(tokens=sampled[:-1])),
        loss_fn_inputs=_rl_inputs(prompt, sampled),
    ).with_provenance(
        model_input=[
            tt.PromptProvenanceSpan(sequence_id=sid, length=3),
            tt.SampledProvenanceSpan(sequence_id=sid, length=1),
        ],
        loss_fn_inputs=[
            tt.PromptProvenanceSpan(sequence_id=sid, offset=1, length=2),
            tt.SampledProvenanceSpan(sequence_id=sid, length=2),
        ],
    )
    plain_ours = types.Datum(
        model_input=types.ModelInput.from_ints([4, 5]), loss_fn_inputs=_rl_inputs([4, 5], [6])
    )
    plain_official = tt.Datum(
        model_input=tt.ModelInput.from_ints([4, 5]), loss_fn_inputs=_rl_inputs([4, 5], [6])
    )
    body = _ours_bytes([ours, plain_ours])
    _same_datums(body, _official_bytes([official, plain_official]))
    first, second = decode_forward_backward_request(body).data
    assert first.model_input_spans == (
        WireSpan(kind="prompt", sequence_id=sid, offset=0, length=3),
        WireSpan(kind="sampled", sequence_id=sid, offset=0, length=1),
    )
    assert first.loss_fn_input_spans == (
        WireSpan(kind="prompt", sequence_id=sid, offset=1, length=2),
        WireSpan(kind="sampled", sequence_id=sid, offset=0, length=2),
    )
    assert second.model_input_spans is None and second.loss_fn_input_spans is None


_ids = st.text(alphabet="abcdefgh:0123456789", min_size=1, max_size=20)
_span = st.tuples(st.booleans(), _ids, st.integers(0, 50), st.integers(0, 6))


@settings(max_examples=60, deadline=None)
@given(model=st.lists(_span, min_size=1, max_size=6), loss=st.lists(_span, min_size=1, max_size=6))
def test_any_tiling_spans_decode_as_the_official_sdks(
    model: list[tuple[bool, str, int, int]], loss: list[tuple[bool, str, int, int]]
) -> None:
    n_in, n_out = sum(s[3] for s in model), sum(s[3] for s in loss)

    def ours(spans: list[tuple[bool, str, int, int]]) -> list[Any]:
        return [
            (types.PromptProvenanceSpan if p else types.SampledProvenanceSpan)(
                sequence_id=i, offset=o, length=n
            )
            for p, i, o, n in spans
        ]

    def official(spans: list[tuple[bool, str, int, int]]) -> list[Any]:
        return [
            (tt.PromptProvenanceSpan if p else tt.SampledProvenanceSpan)(sequence_id=i, offset=o, length=n)
            for p, i, o, n in spans
        ]

    tokens, targets = list(range(1, n_in + 1)), list(range(n_out))
    a = types.Datum(model_input=types.ModelInput.from_ints(tokens), loss_fn_inputs={"target_tokens": targets})
    b = tt.Datum(model_input=tt.ModelInput.from_ints(tokens), loss_fn_inputs={"target_tokens": targets})
    a = a.with_provenance(model_input=ours(model), loss_fn_inputs=ours(loss))
    b = b.with_provenance(model_input=official(model), loss_fn_inputs=official(loss))
    if n_in == 0 or n_out == 0:
        return  # an empty model input is refused by the server codec for both SDKs alike
    _same_datums(_ours_bytes([a]), _official_bytes([b]))
    # The pydantic form round-trips (the span kind is kept by its ``type``).
    assert types.Datum.model_validate(a.model_dump()) == a


def _datum(n_in: int = 4, n_out: int = 4) -> types.Datum:
    return types.Datum(
        model_input=types.ModelInput.from_ints(list(range(1, n_in + 1))),
        loss_fn_inputs={"target_tokens": list(range(n_out))},
    )


def _spans(*lengths: int, sid: str = "a") -> list[Any]:
    return [types.SampledProvenanceSpan(sequence_id=sid, length=n) for n in lengths]


@pytest.mark.parametrize(
    ("model", "loss", "message"),
    [
        ([3], [4], "model_input spans cover 3 positions but the field has 4"),
        ([4], [2, 1], "loss_fn_inputs spans cover 3 positions but the field has 4"),
        ([2, 3], [4], "model_input spans cover 5 positions"),
    ],
)
def test_with_provenance_refuses_spans_that_do_not_tile(
    model: list[int], loss: list[int], message: str
) -> None:
    # The official SDK refuses the same partitions (its message, same numbers).
    with pytest.raises(ValueError, match=message.replace("the field", "the field")):
        _datum().with_provenance(model_input=_spans(*model), loss_fn_inputs=_spans(*loss))
    official = tt.Datum(
        model_input=tt.ModelInput.from_ints([1, 2, 3, 4]), loss_fn_inputs={"target_tokens": [0] * 4}
    )
    with pytest.raises(ValueError, match=message):
        official.with_provenance(
            model_input=[tt.SampledProvenanceSpan(sequence_id="a", length=n) for n in model],
            loss_fn_inputs=[tt.SampledProvenanceSpan(sequence_id="a", length=n) for n in loss],
        )


def test_with_provenance_checks_a_2d_target_by_its_rows_as_the_server_does() -> None:
    d = types.Datum(
        model_input=types.ModelInput.from_ints([1, 2, 3]),
        loss_fn_inputs={"target_tokens": types.TensorData.from_numpy(np.zeros((3, 2), dtype=np.int64))},
    )
    with pytest.raises(ValueError, match="loss_fn_inputs spans cover 6 positions but the field has 3"):
        d.with_provenance(model_input=_spans(3), loss_fn_inputs=_spans(6))
    assert d.with_provenance(model_input=_spans(3), loss_fn_inputs=_spans(3)).loss_fn_input_spans is not None


def test_spans_come_as_a_pair_and_are_checked_on_construction() -> None:
    d = _datum()
    with pytest.raises(pydantic.ValidationError, match="come as a pair"):
        types.Datum(model_input=d.model_input, loss_fn_inputs=d.loss_fn_inputs, model_input_spans=_spans(4))
    with pytest.raises(pydantic.ValidationError, match="come as a pair"):
        types.Datum(model_input=d.model_input, loss_fn_input_spans=_spans(4))
    with pytest.raises(ValueError, match="must be PromptProvenanceSpan or SampledProvenanceSpan"):
        d.with_provenance(model_input=[("a", 4)], loss_fn_inputs=_spans(4))  # type: ignore[list-item]
    for bad in ({"length": -1}, {"length": 1, "offset": -1}, {"length": 1, "sequence_id": ""}):
        with pytest.raises(pydantic.ValidationError):
            types.PromptProvenanceSpan(**{"sequence_id": "a", **bad})
    with pytest.raises(pydantic.ValidationError):  # the server refuses ids over 300 characters
        types.SampledProvenanceSpan(sequence_id="x" * 301, length=1)
    with pytest.raises(pydantic.ValidationError):  # frozen, as the official dataclasses
        types.SampledProvenanceSpan(sequence_id="a", length=1).length = 2  # type: ignore[misc]


def test_spans_built_around_with_provenance_still_reach_the_server_codec_and_are_refused_there() -> None:
    # A datum built directly (no tiling check) is sent as is; the server's codec refuses it.
    d = _datum()
    short = types.Datum(
        model_input=d.model_input,
        loss_fn_inputs=d.loss_fn_inputs,
        model_input_spans=_spans(2),
        loss_fn_input_spans=_spans(4),
    )
    with pytest.raises(WireFormatError, match="model_input_spans cover 2 positions but model_input has 4"):
        decode_forward_backward_request(_ours_bytes([short]))


# --------------------------------------------------------------------------- sequence ids


def test_sequence_ids_are_attached_in_order_and_a_count_mismatch_is_refused() -> None:
    body = encode_sample_response(
        [([5, 6], [-0.5, -0.25], "length"), ([7], [-1.0], "stop")], prompt_logprobs=None
    )
    res = decode_sample_response(body, ["r:0:0", "r:0:1"])
    assert [s.sequence_id for s in res.sequences] == ["r:0:0", "r:0:1"]
    assert [s.tokens for s in res.sequences] == [[5, 6], [7]]
    with pytest.raises(ts.APIResponseValidationError, match="1 sequence ids for 2 sequences"):
        decode_sample_response(body, ["r:0:0"])


# --------------------------------------------------------------------------- record_stability_info


class _Recorder:
    def __init__(self, ids: int | None = 1) -> None:
        self.sent: list[tuple[str, Any]] = []
        self.ids = ids

    def __call__(self, method: str, path: str, **kwargs: Any) -> httpx.Response:
        body = kwargs.get("json")
        self.sent.append((path, body))
        answer: dict[str, Any] = {"request_id": "req-1", "model_id": RUN}
        if path == "api/v1/create_session":
            answer = {"session_id": "s-1"}
        elif path == "api/v1/asample":
            if self.ids is not None:
                answer["sample_sequence_ids"] = [f"x:{i}" for i in range(self.ids)]
        elif path == "api/v1/create_sampling_session":
            answer = {"sampling_session_id": "s-1:sample:0"}
        elif path == "api/v1/get_info":
            answer = {"model_id": RUN, "model_data": {"model_name": "m"}}
        elif path == "api/v1/retrieve_future":
            answer = {"model_id": RUN, "sampling_session_id": "s-1:sample:9"}
        elif path.startswith("api/v1/samplers/"):
            answer = {"sampler_id": "s-1:sample:0", "base_model": "m"}
        return httpx.Response(200, json=answer, request=httpx.Request(method, "http://127.0.0.1/" + path))


@pytest.fixture
def recorder(monkeypatch: pytest.MonkeyPatch) -> Iterator[_Recorder]:
    rec = _Recorder()
    monkeypatch.setattr(Transport, "request", lambda self, method, path, **kw: rec(method, path, **kw))
    yield rec


def _asample_flags(rec: _Recorder) -> list[Any]:
    return [body["record_stability_info"] for path, body in rec.sent if path == "api/v1/asample"]


def test_record_stability_info_is_sent_on_every_sample_of_the_client(recorder: _Recorder) -> None:
    service = ts.ServiceClient(base_url="http://127.0.0.1:9", api_key=KEY)
    training = service.create_lora_training_client("m", rank=4).result(10)
    prompt, params = types.ModelInput.from_ints([1, 2]), types.SamplingParams(max_tokens=2)
    clients = [
        training.save_weights_and_get_sampling_client(record_stability_info=True).result(10),
        training.create_sampling_client("tinker://s-1:train:0/sampler_weights/w", record_stability_info=True),
        service.create_sampling_client(base_model="m", record_stability_info=True).result(10),
        training.save_weights_and_get_sampling_client().result(10),
        service.create_sampling_client(base_model="m").result(10),
    ]
    for client in clients:
        client.sample(prompt, 1, params)
        client.sample(prompt, 1, params)
    assert _asample_flags(recorder) == [True] * 6 + [False] * 4
    # The session request carries no flag: it is the client's, as in the Tinker SDK.
    sessions = [body for path, body in recorder.sent if path == "api/v1/create_sampling_session"]
    assert sessions and all("record_stability_info" not in body for body in sessions)
    service.close().result(10)


@pytest.mark.parametrize("ids", [None, 2])
def test_an_asample_answer_without_one_id_per_sample_is_refused(recorder: _Recorder, ids: int | None) -> None:
    recorder.ids = ids
    service = ts.ServiceClient(base_url="http://127.0.0.1:9", api_key=KEY)
    sampler = service.create_sampling_client(base_model="m", record_stability_info=True).result(10)
    with pytest.raises(ts.APIResponseValidationError, match="sample_sequence_ids"):
        sampler.sample(types.ModelInput.from_ints([1]), 1, types.SamplingParams(max_tokens=1))
    service.close().result(10)
