"""The cookbook's RL defaults through the official SDK: record_stability_info, stable_reinforce, gspo.

The datums are built exactly as ``tinker_cookbook.recipes.rl_loop`` 0.6.1 builds them
(``with_sampled_provenance`` is copied below verbatim, minus the logger). Oracles: the
losses' formulas evaluated by a naive per-token loop on the learner logprobs the server
returns and the sampler logprobs the SDK received (independent of the server's records),
the SDK's own client-side checks, and the database rows.

Attacks: spans naming another tenant's sequence, tokens that differ from the record, a
context that is not the recorded one, forged logprobs, a ``sampled_mask`` sent by the
client, an expired record, spans that do not tile, and a stable_reinforce datum without
spans.
"""

from __future__ import annotations

import datetime as _dt
import math
from typing import Any

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from sqlalchemy import select, update

from server.conftest import TINY_MODEL, LiveServer, ServerEnv
from tensafe.db import utcnow
from tensafe.server.privacy import OperatorPrivacy
from tensafe.server.retention import sweep_expired_stability_records
from tensafe.server.stability import StabilityRecord

tinker = pytest.importorskip("tinker", reason="the official tinker SDK is a test dependency (tinker==0.38.0)")
from tinker import types  # noqa: E402

LOOSE = OperatorPrivacy(
    target_epsilon=50.0, delta=1e-3, clip_norm=10.0, dataset_size=64, expected_batch_size=8, max_steps=40
)
PROMPT = [1, 17, 23, 42, 99, 7]
MAX_TOKENS = 4


def with_sampled_provenance(
    datum: types.Datum, prompt_length: int, num_sampled: int, sequence_id: str
) -> types.Datum:
    """``tinker_cookbook.recipes.rl_loop.with_sampled_provenance`` (0.6.1), verbatim."""
    return datum.with_provenance(
        model_input=[
            types.PromptProvenanceSpan(sequence_id=sequence_id, length=prompt_length),
            types.SampledProvenanceSpan(sequence_id=sequence_id, length=num_sampled - 1),
        ],
        loss_fn_inputs=[
            types.PromptProvenanceSpan(sequence_id=sequence_id, offset=1, length=prompt_length - 1),
            types.SampledProvenanceSpan(sequence_id=sequence_id, length=num_sampled),
        ],
    )


def _rl_datum(
    prompt: types.ModelInput,
    tokens: list[int],
    logprobs: list[float],
    advantage: float,
    *,
    gspo: bool = False,
) -> types.Datum:
    """The rl_loop datum of one sampled sequence (same padding and alignment)."""
    ob_len = prompt.length - 1
    model_input = prompt.append(types.EncodedTextChunk(tokens=tokens[:-1]))
    inputs: dict[str, Any] = {
        "target_tokens": [0] * ob_len + tokens,
        "logprobs": [0.0] * ob_len + logprobs,
        "advantages": [0.0] * ob_len + [advantage] * (model_input.length - ob_len),
    }
    if gspo:
        inputs["sequence_ratio_mask"] = [0.0] * ob_len + [1.0] * len(tokens)
    return types.Datum(model_input=model_input, loss_fn_inputs=inputs)


def _sr_reference(lp: np.ndarray, q: list[float], adv: float, ob_len: int, *, cap: float, kl: float) -> float:
    total = 0.0
    for t, qt in enumerate(q):
        x = float(lp[ob_len + t])
        y = float(np.float32(qt))
        r = math.exp(x - y)
        total += -min(r, cap) * x * adv + kl * (r - 1.0 - (x - y))
    return total


def _gspo_reference(lp: np.ndarray, q: list[float], adv: float, ob_len: int) -> float:
    diffs = [float(lp[ob_len + t]) - float(np.float32(qt)) for t, qt in enumerate(q)]
    s = math.exp(sum(diffs) / len(diffs))
    c = min(max(s, 0.8), 1.2)
    return -len(diffs) * min(s * adv, c * adv)


@pytest.fixture
def loose_server(start_server: Any) -> LiveServer:
    server: LiveServer = start_server(privacy=LOOSE)
    return server


class _Run:
    """One tenant's training client, a stability-recording sampler and one sampled group."""

    def __init__(self, server: LiveServer, env: ServerEnv, tenant: str, *, record: bool = True) -> None:
        self.service = tinker.ServiceClient(base_url=server.url, api_key=env.tenant_key(tenant))
        self.training = self.service.create_lora_training_client(
            base_model=TINY_MODEL, rank=4, seed=1
        ).result()
        self.sampler = self.training.save_weights_and_get_sampling_client(
            record_stability_info=record
        ).result()
        self.prompt = types.ModelInput.from_ints(PROMPT)
        params = types.SamplingParams(max_tokens=MAX_TOKENS, temperature=1.0, seed=5, stop=[])
        self.result = self.sampler.sample(self.prompt, num_samples=3, sampling_params=params).result()
        self.seqs = self.result.sequences

    def datum(self, i: int, advantage: float, *, gspo: bool = False, provenance: bool = True) -> types.Datum:
        s = self.seqs[i]
        assert s.logprobs is not None and s.sequence_id is not None
        d = _rl_datum(self.prompt, list(s.tokens), list(s.logprobs), advantage, gspo=gspo)
        if provenance:
            d = with_sampled_provenance(d, self.prompt.length, len(s.tokens), s.sequence_id)
        return d

    def close(self) -> None:
        self.service.close("success").result()


def test_rl_loop_stable_reinforce_and_gspo_through_the_official_sdk(
    loose_server: LiveServer, server_env: ServerEnv
) -> None:
    run = _Run(loose_server, server_env, "acme")
    try:
        assert [s.sequence_id for s in run.seqs] == [
            f"{run.sampler._sampling_session_id}:0:{i}" for i in range(3)
        ]
        assert all(len(s.tokens) == MAX_TOKENS and s.logprobs is not None for s in run.seqs)
        ob_len = run.prompt.length - 1

        # stable_reinforce with the rl_loop datums and a KL term (loss_fn_config goes to both maps).
        datums = [run.datum(0, 1.0), run.datum(1, -0.5)]
        out = run.training.forward_backward(
            datums, "stable_reinforce", loss_fn_config={"kl_coeff": 0.05}
        ).result()
        expected = 0.0
        for i, adv in ((0, 1.0), (1, -0.5)):
            lp = np.asarray(out.loss_fn_outputs[i]["logprobs"].to_numpy(), dtype=np.float64)
            assert lp.shape == (ob_len + MAX_TOKENS,)
            expected += _sr_reference(lp, list(run.seqs[i].logprobs or []), adv, ob_len, cap=2.0, kl=0.05)
        assert out.metrics["loss:sum"] == pytest.approx(expected, rel=1e-4, abs=1e-5)

        # gspo, the other rl_loop choice (no provenance needed).
        g = run.training.forward_backward([run.datum(2, 0.75, gspo=True, provenance=False)], "gspo").result()
        lp2 = np.asarray(g.loss_fn_outputs[0]["logprobs"].to_numpy(), dtype=np.float64)
        ref = _gspo_reference(lp2, list(run.seqs[2].logprobs or []), 0.75, ob_len)
        assert g.metrics["loss:sum"] == pytest.approx(ref, rel=1e-4, abs=1e-5)

        step = run.training.optim_step(types.AdamParams(learning_rate=1e-3, beta1=0.9, beta2=0.95, eps=1e-8))
        assert "grad_norm:mean" in (step.result().metrics or {})

        # The records are sealed: no plaintext token run in the database rows.
        with server_env.sessions() as db:
            rows = db.execute(select(StabilityRecord)).scalars().all()
        assert {r.id for r in rows} == {s.sequence_id for s in run.seqs}
        assert {r.tenant_id for r in rows} == {"acme"}
        for r in rows:
            assert np.asarray(PROMPT, dtype="<i4").tobytes() not in r.blob
    finally:
        run.close()


def test_forged_logprobs_are_ignored_the_recorded_ones_are_used(
    loose_server: LiveServer, server_env: ServerEnv
) -> None:
    run = _Run(loose_server, server_env, "acme")
    try:
        s = run.seqs[0]
        ob_len = run.prompt.length - 1
        forged = [-30.0] * len(s.tokens)  # would put every ratio far above the cap
        d = with_sampled_provenance(
            _rl_datum(run.prompt, list(s.tokens), forged, 1.0),
            run.prompt.length,
            len(s.tokens),
            str(s.sequence_id),
        )
        out = run.training.forward([d], "stable_reinforce").result()
        lp = np.asarray(out.loss_fn_outputs[0]["logprobs"].to_numpy(), dtype=np.float64)
        honest = _sr_reference(lp, list(s.logprobs or []), 1.0, ob_len, cap=2.0, kl=0.0)
        with_forged = _sr_reference(lp, forged, 1.0, ob_len, cap=2.0, kl=0.0)
        assert abs(honest - with_forged) > 1e-2
        assert out.metrics["loss:sum"] == pytest.approx(honest, rel=1e-4, abs=1e-5)
    finally:
        run.close()


def _fails(future: Any, match: str) -> None:
    with pytest.raises((tinker.RequestFailedError, tinker.BadRequestError), match=match):
        future.result()


def test_attacks_on_provenance_are_refused(loose_server: LiveServer, server_env: ServerEnv) -> None:
    victim = _Run(loose_server, server_env, "victim")
    attacker = _Run(loose_server, server_env, "mallory")
    try:
        tc = attacker.training
        # 1. Another tenant's sequence, with its exact tokens: refused as unknown.
        stolen = victim.datum(0, 1.0)
        _fails(tc.forward_backward([stolen], "stable_reinforce"), "unknown or expired sequence_id")
        # ... and the victim's own request with the same datum works.
        assert victim.training.forward([stolen], "stable_reinforce").result().metrics["loss:sum"] is not None

        # 2. Sampled targets that differ from the record.
        s = attacker.seqs[0]
        tampered = list(s.tokens)
        tampered[-1] = (tampered[-1] + 1) % 1000
        d = with_sampled_provenance(
            _rl_datum(attacker.prompt, tampered, list(s.logprobs or []), 1.0),
            attacker.prompt.length,
            len(s.tokens),
            str(s.sequence_id),
        )
        _fails(tc.forward_backward([d], "stable_reinforce"), "differ from the sampled tokens")

        # 3. Model input that differs from the recorded prompt.
        other_prompt = types.ModelInput.from_ints([2, *PROMPT[1:]])
        d = with_sampled_provenance(
            _rl_datum(other_prompt, list(s.tokens), list(s.logprobs or []), 1.0),
            other_prompt.length,
            len(s.tokens),
            str(s.sequence_id),
        )
        _fails(tc.forward_backward([d], "stable_reinforce"), "differ from the recorded ones")

        # 4. Another sequence's stability data attached to targets whose context is not its own:
        #    the input names sequence 0 (correctly), the targets sequence 1.
        s0, s1 = attacker.seqs[0], attacker.seqs[1]
        assert list(s0.tokens[:-1]) != list(s1.tokens[:-1])  # seeded: the two samples differ
        base = _rl_datum(attacker.prompt, list(s0.tokens), list(s0.logprobs or []), 1.0)
        base = types.Datum(
            model_input=base.model_input,
            loss_fn_inputs={**base.loss_fn_inputs, "target_tokens": [0] * 5 + list(s1.tokens)},
        )
        d = base.with_provenance(
            model_input=[
                types.PromptProvenanceSpan(sequence_id=str(s0.sequence_id), length=len(PROMPT)),
                types.SampledProvenanceSpan(sequence_id=str(s0.sequence_id), length=MAX_TOKENS - 1),
            ],
            loss_fn_inputs=[
                types.PromptProvenanceSpan(sequence_id=str(s0.sequence_id), offset=1, length=len(PROMPT) - 1),
                types.SampledProvenanceSpan(sequence_id=str(s1.sequence_id), length=MAX_TOKENS),
            ],
        )
        _fails(tc.forward_backward([d], "stable_reinforce"), "not the recorded context")

        # 5. A span beyond the recorded tokens.
        d = attacker.datum(0, 1.0)
        d = types.Datum(
            model_input=d.model_input,
            loss_fn_inputs=d.loss_fn_inputs,
            model_input_spans=[
                types.PromptProvenanceSpan(sequence_id=str(s.sequence_id), offset=1, length=len(PROMPT)),
                types.SampledProvenanceSpan(sequence_id=str(s.sequence_id), length=MAX_TOKENS - 1),
            ],
            loss_fn_input_spans=d.loss_fn_input_spans,
        )
        _fails(tc.forward_backward([d], "stable_reinforce"), "lies outside")

        # 6. Spans that do not tile the input (the SDK's with_provenance would refuse; build directly).
        good = attacker.datum(0, 1.0)
        assert good.model_input_spans is not None
        short = types.Datum(
            model_input=good.model_input,
            loss_fn_inputs=good.loss_fn_inputs,
            model_input_spans=good.model_input_spans[:1],
            loss_fn_input_spans=good.loss_fn_input_spans,
        )
        _fails(tc.forward_backward([short], "stable_reinforce"), "must tile")

        # 7. A client-sent sampled_mask, and a stable_reinforce datum without spans.
        masked = types.Datum(
            model_input=good.model_input,
            loss_fn_inputs={
                **good.loss_fn_inputs,
                "sampled_mask": types.TensorData(data=[1.0] * 9, dtype="float32"),
            },
            model_input_spans=good.model_input_spans,
            loss_fn_input_spans=good.loss_fn_input_spans,
        )
        _fails(tc.forward_backward([masked], "stable_reinforce"), "derived by the server")
        _fails(
            tc.forward_backward([attacker.datum(0, 1.0, provenance=False)], "stable_reinforce"),
            "needs model_input_spans",
        )

        # Nothing of the refused requests entered the step: a clean request still works.
        ok = tc.forward_backward([attacker.datum(0, 1.0)], "stable_reinforce").result()
        assert math.isfinite(ok.metrics["loss:sum"])
    finally:
        attacker.close()
        victim.close()


def test_unrecorded_and_expired_sequences_are_refused_and_use_restarts_the_day(
    loose_server: LiveServer, server_env: ServerEnv
) -> None:
    plain = _Run(loose_server, server_env, "acme", record=False)
    try:
        _fails(plain.training.forward([plain.datum(0, 1.0)], "stable_reinforce"), "unknown or expired")
    finally:
        plain.close()

    run = _Run(loose_server, server_env, "acme")
    try:
        ids = [str(s.sequence_id) for s in run.seqs]
        with server_env.sessions() as db:
            first = {r.id: r.expires_at for r in db.execute(select(StabilityRecord)).scalars()}
        assert set(ids) <= set(first)
        assert all(_dt.timedelta(hours=23) < first[i] - utcnow() <= _dt.timedelta(days=1) for i in ids)
        # Use restarts the day of the sequences used (and only those).
        with server_env.sessions.begin() as db:
            db.execute(
                update(StabilityRecord)
                .where(StabilityRecord.id.in_(ids))
                .values(expires_at=utcnow() + _dt.timedelta(hours=1))
            )
        run.training.forward([run.datum(0, 1.0)], "stable_reinforce").result()
        with server_env.sessions() as db:
            now = {r.id: r.expires_at for r in db.execute(select(StabilityRecord)).scalars()}
        assert now[ids[0]] - utcnow() > _dt.timedelta(hours=23)
        assert now[ids[1]] - utcnow() < _dt.timedelta(hours=2)

        # An expired record is refused at once (before any sweep), then swept.
        with server_env.sessions.begin() as db:
            db.execute(
                update(StabilityRecord)
                .where(StabilityRecord.id == ids[1])
                .values(expires_at=utcnow() - _dt.timedelta(seconds=1))
            )
        _fails(run.training.forward([run.datum(1, 1.0)], "stable_reinforce"), "unknown or expired")
        assert sweep_expired_stability_records(server_env.sessions) == 1
        with server_env.sessions() as db:
            left = set(db.execute(select(StabilityRecord.id)).scalars())
        assert ids[1] not in left and ids[0] in left
    finally:
        run.close()


def test_a_record_moved_to_another_row_does_not_open(loose_server: LiveServer, server_env: ServerEnv) -> None:
    """Someone with write access to the database swaps two records' blobs: refused, not used."""
    run = _Run(loose_server, server_env, "acme")
    try:
        a, b = (str(s.sequence_id) for s in run.seqs[:2])
        with server_env.sessions.begin() as db:
            ra, rb = db.get(StabilityRecord, a), db.get(StabilityRecord, b)
            assert ra is not None and rb is not None
            ra.blob, rb.blob = rb.blob, ra.blob
        # A server-side integrity failure (not the client's fault), never a silent use.
        with pytest.raises(tinker.RequestFailedError, match="ArtifactIntegrityError"):
            run.training.forward([run.datum(0, 1.0)], "stable_reinforce").result()
    finally:
        run.close()


def test_stability_records_table_matches_the_migration(migrated_database_url: str) -> None:
    from alembic.autogenerate import compare_metadata
    from alembic.runtime.migration import MigrationContext

    from tensafe.db import Base, create_engine_from_url

    engine = create_engine_from_url(migrated_database_url)
    try:
        with engine.connect() as conn:
            diff = compare_metadata(
                MigrationContext.configure(conn, opts={"compare_type": True}), Base.metadata
            )
    finally:
        engine.dispose()
    assert [d for d in diff if "stability_records" in repr(d)] == []


@settings(max_examples=100, deadline=None)
@given(
    prompt=st.lists(st.integers(0, 2**31 - 1), min_size=1, max_size=20),
    sampled=st.lists(st.tuples(st.integers(0, 2**31 - 1), st.floats(-50, 0, width=32)), max_size=20),
)
def test_record_format_round_trips_and_refuses_damage(
    prompt: list[int], sampled: list[tuple[int, float]]
) -> None:
    from tensafe.server.stability import decode_record, encode_record

    tokens, logprobs = [t for t, _ in sampled], [lp for _, lp in sampled]
    data = encode_record(prompt, tokens, logprobs)
    got = decode_record(data)
    assert got.prompt.tolist() == prompt and got.tokens.tolist() == tokens
    assert got.logprobs.tolist() == [float(np.float32(x)) for x in logprobs]
    for bad in (data[:-1], data + b"\0", b"TSSR\x02" + data[5:]):
        with pytest.raises(ValueError):
            decode_record(bad)
