"""Provenance spans in forward/backward bodies: decoded as the official SDK encodes them, checked.

Oracle: the ``tinker==0.38.0`` SDK's own request encoder (``forward_backward_request_to_proto``)
and its ``Datum.with_provenance``; malformed bodies are built with our own message classes.
"""

from __future__ import annotations

import pytest

from tensafe.protocol.wire import WireFormatError, WireSpan, decode_forward_backward_request, message_class

tinker = pytest.importorskip("tinker")
from tinker import types  # noqa: E402
from tinker.proto import request_conv  # noqa: E402


def _encode(datums: list[types.Datum]) -> bytes:
    req = types.ForwardBackwardRequest(
        forward_backward_input=types.ForwardBackwardInput(
            data=datums, loss_fn="stable_reinforce", loss_fn_config={"kl_coeff": 0.01}
        ),
        model_id="s:train:0",
        seq_id=3,
    )
    return request_conv.forward_backward_request_to_proto(req).SerializeToString()


def _rl_datum(prompt: list[int], sampled: list[int]) -> types.Datum:
    n = len(prompt) + len(sampled) - 1
    return types.Datum(
        model_input=types.ModelInput.from_ints(prompt + sampled[:-1]),
        loss_fn_inputs={
            "target_tokens": [0] * (len(prompt) - 1) + sampled,
            "logprobs": [0.0] * n,
            "advantages": [1.0] * n,
        },
    )


def test_the_sdk_spans_and_kl_coeff_decode() -> None:
    d = _rl_datum([1, 2, 3], [7, 8]).with_provenance(
        model_input=[
            types.PromptProvenanceSpan(sequence_id="s:sample:0:0:1", length=3),
            types.SampledProvenanceSpan(sequence_id="s:sample:0:0:1", length=1),
        ],
        loss_fn_inputs=[
            types.PromptProvenanceSpan(sequence_id="s:sample:0:0:1", offset=1, length=2),
            types.SampledProvenanceSpan(sequence_id="s:sample:0:0:1", length=2),
        ],
    )
    req = decode_forward_backward_request(_encode([d, _rl_datum([4, 5], [6])]))
    assert req.loss_fn_config == {"kl_coeff": pytest.approx(0.01)}
    first, second = req.data
    assert first.model_input_spans == (
        WireSpan(kind="prompt", sequence_id="s:sample:0:0:1", offset=0, length=3),
        WireSpan(kind="sampled", sequence_id="s:sample:0:0:1", offset=0, length=1),
    )
    assert first.loss_fn_input_spans == (
        WireSpan(kind="prompt", sequence_id="s:sample:0:0:1", offset=1, length=2),
        WireSpan(kind="sampled", sequence_id="s:sample:0:0:1", offset=0, length=2),
    )
    assert second.model_input_spans is None and second.loss_fn_input_spans is None


def _raw(model_spans: list[tuple[str, str, int, int]], loss_spans: list[tuple[str, str, int, int]]) -> bytes:
    msg = message_class("ForwardBackwardRequest")()
    msg.model_id, msg.loss_fn = "s:train:0", "stable_reinforce"
    datum = msg.data.add()
    datum.model_input.add().encoded_text.tokens = (1).to_bytes(4, "little") * 3
    target = datum.loss_fn_inputs["target_tokens"]
    target.dtype = 2
    target.dense = (0).to_bytes(8, "little") * 3
    for field, spans in (("model_input_spans", model_spans), ("loss_fn_input_spans", loss_spans)):
        for kind, sid, offset, length in spans:
            arm = getattr(getattr(datum, field).add(), kind)
            arm.sequence_id, arm.offset, arm.length = sid, offset, length
    return bytes(msg.SerializeToString())


P, S = "prompt_tokens", "sampled_tokens"


@pytest.mark.parametrize(
    ("model_spans", "loss_spans", "message"),
    [
        ([(P, "a", 0, 3)], [], "come as a pair"),
        ([], [(S, "a", 0, 3)], "come as a pair"),
        ([(P, "a", 0, 2)], [(S, "a", 0, 3)], "model_input_spans cover 2 positions but model_input has 3"),
        ([(P, "a", 0, 3)], [(S, "a", 0, 4)], "loss_fn_input_spans cover 4 positions but target_tokens has 3"),
        ([(P, "a", -1, 3)], [(S, "a", 0, 3)], "offset and length must be >= 0"),
        ([(P, "", 0, 3)], [(S, "a", 0, 3)], "sequence_id must be"),
        ([(P, "x" * 301, 0, 3)], [(S, "a", 0, 3)], "sequence_id must be"),
    ],
)
def test_spans_that_do_not_pair_or_tile_are_refused(
    model_spans: list[tuple[str, str, int, int]], loss_spans: list[tuple[str, str, int, int]], message: str
) -> None:
    with pytest.raises(WireFormatError, match=message):
        decode_forward_backward_request(_raw(model_spans, loss_spans))


def test_a_span_with_neither_arm_is_refused() -> None:
    msg = message_class("ForwardBackwardRequest")()
    datum = msg.data.add()
    datum.model_input.add().encoded_text.tokens = (1).to_bytes(4, "little")
    datum.model_input_spans.add()
    datum.loss_fn_input_spans.add().sampled_tokens.length = 0
    with pytest.raises(WireFormatError, match="neither prompt_tokens nor sampled_tokens"):
        decode_forward_backward_request(bytes(msg.SerializeToString()))
