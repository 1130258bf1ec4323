"""The cookbook's RL defaults through TenSafe's own SDK: ``record_stability_info`` and stable_reinforce.

The same flow as ``test_stable_reinforce.py`` (which drives the official SDK), with
``tensafe.client``: sample with ``record_stability_info``, build the ``rl_loop`` datums with
``Datum.with_provenance``, train with ``stable_reinforce``. Oracles: the loss evaluated by
a naive per-token loop on the learner logprobs the server returns and the sampler logprobs
the SDK received, the sequence ids the server derives (``{sampling session}:{seq}:{i}``),
and the server's refusals (a sequence not recorded, a datum without spans).
"""

from __future__ import annotations

import math
from typing import Any

import numpy as np
import pytest

from server.conftest import TINY_MODEL, LiveServer, ServerEnv
from tensafe import client as ts
from tensafe.client import types
from tensafe.server.privacy import OperatorPrivacy

LOOSE = OperatorPrivacy(
    target_epsilon=50.0, delta=1e-3, clip_norm=10.0, dataset_size=64, expected_batch_size=8, max_steps=40
)
PROMPT = [1, 17, 23, 42, 99, 7]
MAX_TOKENS = 4


def _rl_datum(prompt: types.ModelInput, seq: types.SampledSequence, advantage: float) -> types.Datum:
    """The ``rl_loop`` datum of one sampled sequence, with ``with_sampled_provenance``'s spans."""
    assert seq.logprobs is not None and seq.sequence_id is not None
    tokens, ob_len = list(seq.tokens), prompt.length - 1
    model_input = prompt.append(types.EncodedTextChunk(tokens=tokens[:-1]))
    datum = types.Datum(
        model_input=model_input,
        loss_fn_inputs={
            "target_tokens": [0] * ob_len + tokens,
            "logprobs": [0.0] * ob_len + list(seq.logprobs),
            "advantages": [0.0] * ob_len + [advantage] * (model_input.length - ob_len),
        },
    )
    sid = seq.sequence_id
    return datum.with_provenance(
        model_input=[
            types.PromptProvenanceSpan(sequence_id=sid, length=prompt.length),
            types.SampledProvenanceSpan(sequence_id=sid, length=len(tokens) - 1),
        ],
        loss_fn_inputs=[
            types.PromptProvenanceSpan(sequence_id=sid, offset=1, length=prompt.length - 1),
            types.SampledProvenanceSpan(sequence_id=sid, length=len(tokens)),
        ],
    )


def _stable_reinforce(lp: np.ndarray, q: list[float], adv: float, ob_len: int, *, kl: float) -> float:
    """Naive loop: sum_t -min(r_t, 2) * logp_t * A + kl * (r_t - 1 - log r_t), r_t = exp(logp_t - q_t)."""
    total = 0.0
    for t, qt in enumerate(q):
        x, y = float(lp[ob_len + t]), float(np.float32(qt))
        r = math.exp(x - y)
        total += -min(r, 2.0) * x * adv + kl * (r - 1.0 - (x - y))
    return total


def _fails(future: Any, match: str) -> None:
    with pytest.raises((ts.RequestFailedError, ts.BadRequestError), match=match):
        future.result(timeout=120)


@pytest.mark.slow
def test_tensafe_sdk_samples_with_stability_info_and_trains_stable_reinforce(
    start_server: Any, server_env: ServerEnv
) -> None:
    server: LiveServer = start_server(privacy=LOOSE)
    service = ts.ServiceClient(base_url=server.url, api_key=server_env.tenant_key("acme"))
    try:
        training = service.create_lora_training_client(base_model=TINY_MODEL, rank=4, seed=1).result(
            timeout=120
        )
        sampler = training.save_weights_and_get_sampling_client(record_stability_info=True).result(
            timeout=120
        )
        assert sampler.record_stability_info
        prompt = types.ModelInput.from_ints(PROMPT)
        params = types.SamplingParams(max_tokens=MAX_TOKENS, temperature=1.0, seed=5, stop=[])
        seqs = sampler.sample(prompt, 3, params).result(timeout=120).sequences
        assert [s.sequence_id for s in seqs] == [f"{sampler.sampling_session_id}:0:{i}" for i in range(3)]
        assert all(len(s.tokens) == MAX_TOKENS and s.logprobs is not None for s in seqs)
        ob_len = prompt.length - 1

        out = training.forward_backward(
            [_rl_datum(prompt, seqs[0], 1.0), _rl_datum(prompt, seqs[1], -0.5)],
            "stable_reinforce",
            loss_fn_config={"kl_coeff": 0.05},
        ).result(timeout=120)
        expected = 0.0
        for i, adv in ((0, 1.0), (1, -0.5)):
            lp = np.asarray(out.loss_fn_outputs[i]["logprobs"].to_numpy(), dtype=np.float64)
            assert lp.shape == (ob_len + MAX_TOKENS,)
            expected += _stable_reinforce(lp, list(seqs[i].logprobs or []), adv, ob_len, kl=0.05)
        assert out.metrics["loss:sum"] == pytest.approx(expected, rel=1e-4, abs=1e-5)
        step = training.optim_step(types.AdamParams(learning_rate=1e-3, eps=1e-8)).result(timeout=120)
        assert "grad_norm:mean" in (step.metrics or {})

        # A named sampler opened with the flag through the ServiceClient records too.
        path = training.save_weights_for_sampler("w1").result(timeout=120).path
        assert path is not None
        named = service.create_sampling_client(model_path=path, record_stability_info=True).result(
            timeout=120
        )
        (seq,) = named.sample(prompt, 1, params).result(timeout=120).sequences
        assert seq.sequence_id == f"{named.sampling_session_id}:0:0"
        lp = training.forward([_rl_datum(prompt, seq, 1.0)], "stable_reinforce").result(timeout=120)
        assert math.isfinite(lp.metrics["loss:sum"])

        # Without the flag nothing is recorded: the server refuses the sequence.
        plain = training.save_weights_and_get_sampling_client().result(timeout=120)
        (unrecorded,) = plain.sample(prompt, 1, params).result(timeout=120).sequences
        assert unrecorded.sequence_id is not None
        _fails(
            training.forward([_rl_datum(prompt, unrecorded, 1.0)], "stable_reinforce"), "unknown or expired"
        )
        # And a stable_reinforce datum without spans is refused.
        bare = _rl_datum(prompt, seqs[2], 1.0)
        bare = types.Datum(model_input=bare.model_input, loss_fn_inputs=bare.loss_fn_inputs)
        _fails(training.forward_backward([bare], "stable_reinforce"), "needs model_input_spans")
    finally:
        service.close("success").result(timeout=60)
