"""What an adversarial client tries against the privacy statement, through the real API.

Each test performs the attack with an SDK against a live server (SQLite and PostgreSQL) and
checks that it is refused or accounted for, with an independent oracle for ε
(``dp_accounting``'s RDP accountant on the Gaussian mechanism the run really was):

* declaring a tiny expected batch size and sending large batches (batches the client chose
  get no sampling amplification);
* repeating a privacy unit within one step, within a request and across requests;
* a failing request that would leave partial clipped sums behind;
* saving, loading and branching a run to reset the budget;
* deterministic mode passing for private, and publishing training state;
* redrawing a server-sampled batch through a failure, and registering the same data set again;
* reading the training data back from the audit log through unkeyed hashes.
"""

from __future__ import annotations

import hashlib
import json
from typing import Any

import httpx
import numpy as np
import pytest
from sqlalchemy import func, select

import tensafe.client as ts
from server.conftest import TINY_MODEL, LiveServer, ServerEnv
from tensafe.client.types import AdamParams, Datum, ModelInput
from tensafe.privacy import DpCertificate, compute_epsilon
from tensafe.server.models import PrivacySpend, TrainingModel
from tensafe.server.privacy import OperatorPrivacy

tinker = pytest.importorskip("tinker", reason="the official tinker SDK is a test dependency (tinker==0.38.0)")

FLOOR = OperatorPrivacy(
    target_epsilon=50.0, delta=1e-3, clip_norm=10.0, dataset_size=64, expected_batch_size=8, max_steps=40
)
ADAM = AdamParams(learning_rate=1e-3)


@pytest.fixture
def server(start_server: Any) -> LiveServer:
    srv: LiveServer = start_server(privacy=FLOOR)
    return srv


def _tokens(i: int, n: int = 6) -> list[int]:
    return [1, *(((i * 7 + j * 13) % 900) + 20 for j in range(n - 1))]


def _tinker_datum(tokens: list[int], weights: list[float] | None = None) -> Any:
    inputs: dict[str, Any] = {"target_tokens": tokens[1:]}
    if weights is not None:
        inputs["weights"] = weights
    return tinker.types.Datum(
        model_input=tinker.types.ModelInput.from_ints(tokens[:-1]), loss_fn_inputs=inputs
    )


def _ts_datum(tokens: list[int]) -> Datum:
    return Datum(
        model_input=ModelInput.from_ints(tokens[:-1]),
        loss_fn_inputs={"target_tokens": tokens[1:], "weights": [1.0] * (len(tokens) - 1)},
    )


def _certificate(server: LiveServer, key: str, run_id: str) -> DpCertificate:
    response = httpx.get(
        f"{server.url}/api/v1/tensafe/training_runs/{run_id}/certificate", headers={"X-API-Key": key}
    )
    assert response.status_code == 200, response.text
    return DpCertificate.from_dict(response.json())


def _gaussian_epsilon(sigma: float, steps: int, delta: float) -> float:
    """The oracle: T compositions of the Gaussian mechanism (no subsampling), by dp_accounting."""
    from dp_accounting import dp_event, rdp

    acc = rdp.RdpAccountant()
    acc.compose(dp_event.GaussianDpEvent(sigma), steps)
    return float(acc.get_epsilon(delta))


# ------------------------------------------------------------------------ client-chosen batches


def test_declared_tiny_batch_gets_the_epsilon_of_what_was_done(
    server: LiveServer, server_env: ServerEnv
) -> None:
    """A client declares expected_batch_size=1 and sends 256 datums per step: the certificate
    states the ε of 2 un-amplified Gaussian steps, never the Poisson ε of q = 1/N."""
    key = server_env.tenant_key("acme")
    service = tinker.ServiceClient(base_url=server.url, api_key=key)
    try:
        training = service.create_lora_training_client(
            base_model=TINY_MODEL,
            rank=2,
            user_metadata={
                "tensafe.dp.expected_batch_size": "1",
                "tensafe.dp.max_steps": "3",
                "tensafe.dp.target_epsilon": "2",
            },
        ).result()
        for step in range(2):
            batch = [_tinker_datum(_tokens(256 * step + i)) for i in range(256)]
            training.forward_backward(batch, "cross_entropy").result()
            metrics = training.optim_step(tinker.types.AdamParams(learning_rate=1e-4)).result().metrics
            assert metrics is not None and metrics["examples:sum"] == 256.0
    finally:
        service.close("success").result()
    cert = _certificate(server, key, training.model_id)
    cert.verify_signature(server_env.keys.deployment_verifying_key())
    assert cert.sampled_by == "client" and cert.amplification == "none" and cert.sample_rate == 1.0
    assert cert.expected_batch_size == 1 and cert.dataset_size_source == "defaulted"
    assert cert.steps == 2 and cert.epsilon is not None
    oracle = _gaussian_epsilon(float(cert.noise_multiplier or 0), 2, FLOOR.delta)
    assert cert.epsilon == pytest.approx(oracle, rel=1e-9)
    claimed = compute_epsilon(
        accountant="rdp",
        noise_multiplier=float(cert.noise_multiplier or 0),
        sample_rate=1 / FLOOR.dataset_size,
        steps=2,
        delta=FLOOR.delta,
    )
    assert cert.epsilon > 10 * claimed  # what a Poisson certificate at q = B/N would have understated


# ------------------------------------------------------------------------ one unit, once per step


def test_duplicate_datums_within_and_across_requests_are_refused(
    server: LiveServer, server_env: ServerEnv
) -> None:
    key = server_env.tenant_key("acme")
    service = tinker.ServiceClient(base_url=server.url, api_key=key)
    try:
        training = service.create_lora_training_client(base_model=TINY_MODEL, rank=2).result()
        a, b, c = _tokens(1), _tokens(2), _tokens(3)
        with pytest.raises(
            tinker.RequestFailedError, match="datum 2 repeats the tokens and targets of datum 0"
        ):
            training.forward_backward(
                [_tinker_datum(a), _tinker_datum(b), _tinker_datum(a, [2.0] * 5)], "cross_entropy"
            ).result()
        training.forward_backward([_tinker_datum(a), _tinker_datum(b)], "cross_entropy").result()
        with pytest.raises(
            tinker.RequestFailedError, match="earlier forward_backward of this optimizer step"
        ):
            training.forward_backward([_tinker_datum(c), _tinker_datum(b)], "cross_entropy").result()
        # A failing request with a good datum before the bad one leaves nothing behind: the good
        # datum (c) is still new in this step, and only a and b were counted.
        with pytest.raises(tinker.RequestFailedError):
            training.forward_backward(
                [_tinker_datum(c), _tinker_datum([1, 2, 10**6])], "cross_entropy"
            ).result()
        training.forward_backward([_tinker_datum(c)], "cross_entropy").result()
        metrics = training.optim_step(tinker.types.AdamParams(learning_rate=1e-3)).result().metrics
        assert metrics is not None and metrics["examples:sum"] == 3.0
        training.forward_backward([_tinker_datum(a)], "cross_entropy").result()  # a new step: allowed again
    finally:
        service.close("success").result()


# ------------------------------------------------------------------------ the budget is not rewound


def _train(client: ts.TrainingClient, steps: int, offset: int) -> None:
    for s in range(steps):
        client.forward_backward(
            [_ts_datum(_tokens(offset + 10 * s + i)) for i in range(4)], "cross_entropy"
        ).result()
        client.optim_step(ADAM).result()


def test_save_load_and_branch_continue_one_budget(server: LiveServer, server_env: ServerEnv) -> None:
    """Save at step 2, load it twice (two branches), train each: every certificate covers every
    step trained on the data, and the last one's ε is that of all six steps."""
    key = server_env.tenant_key("acme")
    service = ts.ServiceClient(base_url=server.url, api_key=key)
    try:
        a = service.create_lora_training_client(base_model=TINY_MODEL, rank=2).result()
        _train(a, 2, 0)
        first = DpCertificate.from_dict(a.get_certificate())
        path = a.save_state("at-2").result().path
        b = service.create_training_client_from_state(path).result()
        _train(b, 2, 100)
        second = DpCertificate.from_dict(b.get_certificate())
        c = service.create_training_client_from_state_with_optimizer(
            path
        ).result()  # a branch of the same state
        _train(c, 2, 200)
        third = DpCertificate.from_dict(c.get_certificate())
        again_a = DpCertificate.from_dict(a.get_certificate())
        exported = c.save_weights_external("third").result()
        rest = service.create_rest_client()
        urls = rest.get_external_weights_urls(exported.path).result().urls
        shipped = DpCertificate.from_dict(httpx.get(urls["dp_certificate.json"]).json())
    finally:
        service.close()
    sigma = float(first.noise_multiplier or 0)
    assert [first.steps, second.steps, third.steps, again_a.steps, shipped.steps] == [2, 4, 6, 6, 6]
    for cert, steps in ((first, 2), (second, 4), (third, 6), (shipped, 6)):
        assert cert.noise_multiplier == sigma
        assert cert.epsilon == pytest.approx(_gaussian_epsilon(sigma, steps, FLOOR.delta), rel=1e-9)
    assert shipped.verify_signature(server_env.keys.deployment_verifying_key())
    with server_env.sessions() as db:
        ledgers = {db.get(TrainingModel, m.model_id).ledger_id for m in (a, b, c)}  # type: ignore[union-attr]
        assert len(ledgers) == 1 and None not in ledgers
        assert db.execute(select(func.count()).select_from(PrivacySpend)).scalar_one() == 6
    assert shipped.ledger_id in ledgers


def test_budget_is_enforced_across_a_lineage(start_server: Any, server_env: ServerEnv) -> None:
    """max_steps 3: a run that took 2 steps, saved, loaded and stepped twice more is refused at its
    4th step on the data, not allowed 3 fresh ones."""
    server = start_server(
        privacy=OperatorPrivacy(
            target_epsilon=50.0,
            delta=1e-3,
            clip_norm=10.0,
            dataset_size=64,
            expected_batch_size=8,
            max_steps=3,
        )
    )
    key = server_env.tenant_key("acme")
    service = ts.ServiceClient(base_url=server.url, api_key=key)
    try:
        a = service.create_lora_training_client(base_model=TINY_MODEL, rank=2).result()
        _train(a, 2, 0)
        path = a.save_state("s").result().path
        b = service.create_training_client_from_state(path).result()
        _train(b, 1, 50)
        b.forward_backward([_ts_datum(_tokens(900))], "cross_entropy").result()
        with pytest.raises(ts.RequestFailedError, match="3 optimizer steps"):
            b.optim_step(ADAM).result()
    finally:
        service.close()


# ------------------------------------------------------------------------ deterministic mode, publishing


def test_deterministic_server_certifies_nothing_and_publishes_nothing(
    start_server: Any, server_env: ServerEnv, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("TS_DETERMINISTIC", "1")
    server = start_server(privacy=FLOOR)
    key = server_env.tenant_key("acme")
    service = ts.ServiceClient(base_url=server.url, api_key=key)
    try:
        training = service.create_lora_training_client(base_model=TINY_MODEL, rank=2, seed=1234).result()
        _train(training, 1, 0)
        cert = DpCertificate.from_dict(training.get_certificate())
        sampler_path = training.save_weights_for_sampler("s").result().path
        rest = service.create_rest_client()
        with pytest.raises(ts.BadRequestError, match="deterministic"):
            rest.publish_checkpoint_from_tinker_path(sampler_path).result()
    finally:
        service.close()
    assert cert.private is False and cert.epsilon is None and cert.noise_rng == "deterministic"
    assert cert.statement.startswith("No differential privacy guarantee")


def test_training_state_is_never_published(server: LiveServer, server_env: ServerEnv) -> None:
    key = server_env.tenant_key("acme")
    service = ts.ServiceClient(base_url=server.url, api_key=key)
    try:
        training = service.create_lora_training_client(base_model=TINY_MODEL, rank=2).result()
        _train(training, 1, 0)
        state_path = training.save_state("w").result().path
        adapter_path = training.save_weights_for_sampler("a").result().path
        rest = service.create_rest_client()
        with pytest.raises(ts.BadRequestError, match="training-state"):
            rest.publish_checkpoint_from_tinker_path(state_path).result()
        rest.publish_checkpoint_from_tinker_path(adapter_path).result()  # the adapter of a DP run: allowed
    finally:
        service.close()


# ------------------------------------------------------------------------ server-side sampling


SERVER_SAMPLING = {"tensafe.dp.sampling": "server_poisson"}


def _dataset(n: int = 16) -> list[Datum]:
    return [_ts_datum(_tokens(5000 + i)) for i in range(n)]


def test_a_failed_step_does_not_redraw_its_batch(
    server: LiveServer, server_env: ServerEnv, monkeypatch: pytest.MonkeyPatch
) -> None:
    from tensafe.training.runtime import LoraTrainingSession

    draws: list[list[int] | None] = []
    original_sample = LoraTrainingSession.sample_batch
    original_fb = LoraTrainingSession.forward_backward
    failures = {"left": 1}

    def sample_batch(self: LoraTrainingSession) -> Any:
        batch = original_sample(self)
        draws.append(self.drawn_indices())
        return batch

    def forward_backward(self: LoraTrainingSession, *args: Any, **kwargs: Any) -> Any:
        if failures["left"]:
            failures["left"] -= 1
            raise RuntimeError("the worker fails after the batch was drawn and charged")
        return original_fb(self, *args, **kwargs)

    monkeypatch.setattr(LoraTrainingSession, "sample_batch", sample_batch)
    monkeypatch.setattr(LoraTrainingSession, "forward_backward", forward_backward)
    key = server_env.tenant_key("acme")
    service = ts.ServiceClient(base_url=server.url, api_key=key)
    try:
        training = service.create_lora_training_client(
            base_model=TINY_MODEL,
            rank=2,
            user_metadata={**SERVER_SAMPLING, "tensafe.dp.expected_batch_size": "8"},
        ).result()
        training.register_dataset(_dataset()).result()
        with server_env.sessions() as db:
            assert db.execute(select(func.count()).select_from(PrivacySpend)).scalar_one() == 0
        batch_was_empty = False
        while not batch_was_empty:
            with pytest.raises(ts.RequestFailedError):
                training.train_step("cross_entropy", ADAM).result()
            with server_env.sessions() as db:
                spend = db.execute(select(PrivacySpend)).scalars().one()
                assert spend.draw_blob is not None and spend.step_index == 0
                assert json.dumps(draws[-1]).encode() not in spend.draw_blob  # sealed, not plain
            training.train_step("cross_entropy", ADAM).result()
            batch_was_empty = True
    finally:
        service.close()
    assert len(draws) == 2 and draws[0] == draws[1]  # restored, not drawn again
    with server_env.sessions() as db:
        spends = db.execute(select(PrivacySpend)).scalars().all()
        assert [(s.step_index, s.draw_blob) for s in spends] == [(0, None)]  # charged once, draw cleared


def test_registering_the_same_data_set_again_continues_its_ledger(
    server: LiveServer, server_env: ServerEnv
) -> None:
    key = server_env.tenant_key("acme")
    service = ts.ServiceClient(base_url=server.url, api_key=key)
    data = _dataset()
    try:
        first = service.create_lora_training_client(
            base_model=TINY_MODEL, rank=2, user_metadata=SERVER_SAMPLING
        ).result()
        first.register_dataset(data).result()
        for _ in range(2):
            first.train_step("cross_entropy", ADAM).result()
        second = service.create_lora_training_client(
            base_model=TINY_MODEL, rank=2, user_metadata=SERVER_SAMPLING
        ).result()
        second.register_dataset(list(reversed(data))).result()  # the same examples, another order
        second.train_step("cross_entropy", ADAM).result()
        cert = DpCertificate.from_dict(second.get_certificate())
        other = service.create_lora_training_client(
            base_model=TINY_MODEL, rank=2, user_metadata=SERVER_SAMPLING
        ).result()
        other.register_dataset(data[:-1]).result()  # another data set: its own ledger
    finally:
        service.close()
    assert cert.steps == 3 and cert.amplification == "poisson_subsampling"
    with server_env.sessions() as db:
        ledgers = [db.get(TrainingModel, r.model_id).ledger_id for r in (first, second, other)]  # type: ignore[union-attr]
    assert ledgers[0] == ledgers[1] != ledgers[2]


# ------------------------------------------------------------------------ no unkeyed hashes of data


def test_audit_log_holds_no_unkeyed_hash_of_the_data(server: LiveServer, server_env: ServerEnv) -> None:
    """A reader of the audit log (or of the database) cannot confirm a guess of the training data by
    hashing it: every digest of a request, a result or a data set is keyed by the tenant's key,
    and it becomes unlinkable once the tenant is crypto-shredded."""
    from tensafe.audit import iter_records
    from tensafe.client._wire import encode_forward_backward_request
    from tensafe.keys import TenantShreddedError
    from tensafe.server.jobs import REQUEST_DIGEST_LABEL

    key = server_env.tenant_key("acme")
    service = ts.ServiceClient(base_url=server.url, api_key=key)
    data = _dataset()
    try:
        training = service.create_lora_training_client(
            base_model=TINY_MODEL, rank=2, user_metadata=SERVER_SAMPLING
        ).result()
        training.register_dataset(data).result()
        training.train_step("cross_entropy", ADAM).result()
    finally:
        service.close()
    body = encode_forward_backward_request(
        model_id=training.model_id, seq_id=1, data=data, loss_fn="cross_entropy", forward_only=True
    )
    with server_env.sessions() as db:
        records = list(iter_records(db, tenant="acme"))
    text = json.dumps([r.details for r in records])
    unkeyed = hashlib.sha256(body).hexdigest()
    old_request = hashlib.sha256(
        b"tensafe-request-v1\x00register_dataset\x00" + b'{"num_datums":16}\x00' + body
    )
    assert unkeyed not in text and old_request.hexdigest() not in text
    assert "sha256" not in text  # no field of a request, result or data set is a plain hash
    registered = next(r for r in records if r.action == "api.register_dataset")
    assert registered.details["request_digest"] == server_env.store.tenant_digest(
        "acme",
        label=REQUEST_DIGEST_LABEL,
        data=[b"register_dataset", b"\x00", b'{"num_datums":16}', b"\x00", body],
    )
    server_env.keys.shred_tenant("acme")
    with pytest.raises(TenantShreddedError):
        server_env.store.tenant_digest("acme", label=REQUEST_DIGEST_LABEL, data=body)


def test_numpy_oracle_agrees_with_dp_accounting() -> None:
    """Sanity of the oracle used above: the Gaussian mechanism composed T times has RDP
    T·α/(2σ²), and ε(δ) from it matches dp_accounting within its order grid."""
    sigma, steps, delta = 3.0, 5, 1e-5
    orders = np.concatenate([np.linspace(1.1, 10.9, 99), np.arange(12, 64)])
    rdp = steps * orders / (2 * sigma**2)
    # The conversion dp_accounting uses (Balle et al. 2020 / Canonne et al.), evaluated naively.
    eps = rdp + np.log1p(-1 / orders) - (np.log(delta) + np.log(orders)) / (orders - 1)
    assert float(eps.min()) == pytest.approx(_gaussian_epsilon(sigma, steps, delta), rel=1e-6)


# ------------------------------------------------------------------------ a database writer


@pytest.mark.parametrize("attack", ["delete a charge", "raise sigma"])
def test_a_database_writer_cannot_lower_the_certified_spend(
    server: LiveServer, server_env: ServerEnv, attack: str
) -> None:
    """The ledger table is mirrored in the signed audit chain: deleting a charge, or raising its σ
    to lower ε, makes the server refuse to certify instead of signing the smaller ε."""
    from sqlalchemy import delete, update

    key = server_env.tenant_key("acme")
    service = ts.ServiceClient(base_url=server.url, api_key=key)
    try:
        training = service.create_lora_training_client(base_model=TINY_MODEL, rank=2).result()
        _train(training, 3, 0)
        honest = DpCertificate.from_dict(training.get_certificate())
        with server_env.sessions.begin() as db:
            first = db.execute(select(func.min(PrivacySpend.id))).scalar_one()
            if attack == "delete a charge":
                db.execute(delete(PrivacySpend).where(PrivacySpend.id == first))
            else:
                db.execute(update(PrivacySpend).values(noise_multiplier=PrivacySpend.noise_multiplier * 10))
        response = httpx.get(
            f"{server.url}/api/v1/tensafe/training_runs/{training.model_id}/certificate",
            headers={"X-API-Key": key},
        )
    finally:
        service.close()
    assert honest.steps == 3
    assert response.status_code == 500
    assert response.json()["error"] == "ledger_integrity_error"
    assert "does not match the audit log" in response.json()["detail"]
