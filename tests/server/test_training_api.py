"""The official ``tinker==0.38.0`` SDK trains, saves, loads and samples through a live server.

Oracles: the tiny model loaded independently with ``transformers`` (a fresh LoRA adapter
has ``B = 0``, so its log-probabilities are the base model's), the SDK's own decoders,
and :func:`tensafe.privacy.compute_epsilon` for the certificate.
"""

from __future__ import annotations

import dataclasses
import math
import pathlib
from typing import Any

import numpy as np
import pytest
from sqlalchemy import select

from server.conftest import TINY_MODEL, LiveServer, ServerEnv
from tensafe.server.privacy import OperatorPrivacy, set_tenant_policy

tinker = pytest.importorskip("tinker", reason="the official tinker SDK is a test dependency (tinker==0.38.0)")

#: A loose operator floor so that a few steps on the tiny model make progress.
LOOSE = OperatorPrivacy(
    target_epsilon=50.0, delta=1e-3, clip_norm=10.0, dataset_size=64, expected_batch_size=8, max_steps=40
)
TOKENS = [[1, 17, 23, 42, 99, 7], [1, 5, 6, 7, 8, 9], [1, 300, 301, 302, 303, 304]]


def _datum(tokens: list[int], **inputs: Any) -> Any:
    return tinker.types.Datum(
        model_input=tinker.types.ModelInput.from_ints(tokens[:-1]),
        loss_fn_inputs={"target_tokens": tokens[1:], **inputs},
    )


def _rl_datum(tokens: list[int]) -> Any:
    n = len(tokens) - 1
    return _datum(tokens, logprobs=[-10.0] * n, advantages=[1.0] * n)


def _base_logprobs(model_dir: pathlib.Path, tokens: list[int]) -> np.ndarray:
    import torch
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(str(model_dir), dtype=torch.float32)
    model.eval()
    with torch.no_grad():
        logits = model(torch.tensor([tokens[:-1]])).logits[0]
    lp = torch.log_softmax(logits.double(), dim=-1)
    return lp[torch.arange(len(tokens) - 1), torch.tensor(tokens[1:])].numpy()


@pytest.fixture
def loose_server(start_server: Any) -> LiveServer:
    server: LiveServer = start_server(privacy=LOOSE)
    return server


def test_sdk_full_flow(loose_server: LiveServer, server_env: ServerEnv, tiny_model_dir: pathlib.Path) -> None:
    key = server_env.tenant_key("acme")
    service = tinker.ServiceClient(base_url=loose_server.url, api_key=key)
    try:
        training = service.create_lora_training_client(base_model=TINY_MODEL, rank=4, seed=3).result()
        training.get_tokenizer()  # a local tokenizer directory (same host)

        # cross_entropy: logprobs equal the base model's (fresh LoRA), loss = -sum(w * lp).
        weights = [0.0, 1.0, 1.0, 1.0, 1.0]
        ce = training.forward_backward([_datum(TOKENS[0], weights=weights)], "cross_entropy").result()
        lp = np.asarray(ce.loss_fn_outputs[0]["logprobs"].to_numpy(), dtype=np.float64)
        oracle = _base_logprobs(tiny_model_dir, TOKENS[0])
        np.testing.assert_allclose(lp, oracle, rtol=1e-4, atol=1e-4)
        assert ce.metrics["loss:sum"] == pytest.approx(-float(np.dot(weights, oracle)), rel=1e-4)

        # every RL loss runs and reports name:reduction metrics (distinct datums: under DP each
        # privacy unit contributes once per step, and a repeat is refused).
        for i, (loss_fn, config) in enumerate(
            [("importance_sampling", None), ("ppo", None), ("cispo", None), ("dro", {"beta": 0.1})]
        ):
            tokens = [t + i for t in TOKENS[1]]
            out = training.forward_backward([_rl_datum(tokens)], loss_fn, loss_fn_config=config).result()
            assert len(out.loss_fn_outputs) == 1 and "loss:sum" in out.metrics, loss_fn
            assert math.isfinite(out.metrics["loss:sum"])
        with pytest.raises(tinker.RequestFailedError, match="beta"):
            training.forward_backward([_rl_datum([t + 20 for t in TOKENS[1]])], "dro").result()
        with pytest.raises(tinker.RequestFailedError, match="privacy unit may contribute once per step"):
            training.forward_backward([_rl_datum(TOKENS[1])], "ppo").result()  # a repeat of the first

        step = training.optim_step(tinker.types.AdamParams(learning_rate=1e-2)).result()
        assert step.metrics is not None and "grad_norm:mean" in step.metrics

        path = training.save_state("first").result().path
        assert path == f"tinker://{training.model_id}/weights/first"
        with pytest.raises(tinker.RequestFailedError, match="already exists"):
            training.save_state("first").result()

        # A client restored with its optimizer computes exactly what the original does.
        restored = service.create_training_client_from_state_with_optimizer(path).result()
        assert restored.model_id.endswith(":train:1")
        probe = [_datum(TOKENS[2], weights=[1.0] * 5)]
        a = training.forward(probe, "cross_entropy").result().loss_fn_outputs[0]["logprobs"].to_numpy()
        b = restored.forward(probe, "cross_entropy").result().loss_fn_outputs[0]["logprobs"].to_numpy()
        np.testing.assert_array_equal(a, b)
        assert not np.allclose(a, _base_logprobs(tiny_model_dir, TOKENS[2]), atol=1e-6)  # it trained
        # ... and its next step matches the original's next step (optimizer moments restored).
        for client in (training, restored):
            client.forward_backward(probe, "cross_entropy").result()
        weights_only = service.create_training_client_from_state(path).result()
        assert weights_only.model_id.endswith(":train:2")

        # Sampling from a snapshot; compute_logprobs agrees with forward's logprobs.
        sampler = training.save_weights_and_get_sampling_client().result()
        prompt = tinker.types.ModelInput.from_ints(TOKENS[2])
        params = tinker.types.SamplingParams(max_tokens=3, temperature=1.0, seed=11, stop=[])
        res = sampler.sample(prompt, num_samples=2, sampling_params=params).result()
        assert len(res.sequences) == 2
        assert all(len(s.tokens) == 3 and len(s.logprobs or []) == 3 for s in res.sequences)
        again = sampler.sample(prompt, num_samples=2, sampling_params=params).result()
        assert [s.tokens for s in again.sequences] == [s.tokens for s in res.sequences]  # seeded
        lps = sampler.compute_logprobs(prompt).result()
        assert lps[0] is None and len(lps) == len(TOKENS[2])
        fwd = training.forward(probe, "cross_entropy").result().loss_fn_outputs[0]["logprobs"].to_numpy()
        np.testing.assert_allclose(np.asarray(lps[1:], dtype=np.float64), fwd, rtol=1e-4, atol=1e-4)

        # Named sampler weights and a sampling client on them.
        spath = training.save_weights_for_sampler("s1").result().path
        assert spath == f"tinker://{training.model_id}/sampler_weights/s1"
        named = service.create_sampling_client(model_path=spath).result()
        named_lps = named.compute_logprobs(prompt).result()
        np.testing.assert_allclose(np.asarray(named_lps[1:], dtype=np.float64), fwd, rtol=1e-4, atol=1e-4)

        # REST: runs, checkpoints, weights info, deletion.
        rest = tinker.RestClient(base_url=loose_server.url, api_key=key)
        run = rest.get_training_run(training.model_id).result()
        assert run.last_checkpoint is not None and run.last_checkpoint.tinker_path == path
        assert run.last_sampler_checkpoint is not None and run.last_sampler_checkpoint.tinker_path == spath
        ids = {c.checkpoint_id for c in rest.list_checkpoints(training.model_id).result().checkpoints}
        assert ids == {"weights/first", "sampler_weights/s1"}
        assert rest.get_training_run_by_tinker_path(path).result().training_run_id == training.model_id
        info = rest.get_weights_info_by_tinker_path(path).result()
        assert info.base_model == TINY_MODEL and info.lora_rank == 4
        assert len(rest.list_user_checkpoints().result().checkpoints) == 2
        rest.delete_checkpoint_from_tinker_path(spath).result()
        ids = {c.checkpoint_id for c in rest.list_checkpoints(training.model_id).result().checkpoints}
        assert ids == {"weights/first"}
        assert len(rest.list_training_runs().result().training_runs) == 3
    finally:
        service.close("success").result()

    # Everything stored is encrypted: no plaintext safetensors header in the artifacts.
    blobs = list((server_env.settings.data_dir / "artifacts").rglob("*"))
    assert any(b.is_file() for b in blobs)
    for blob in blobs:
        if blob.is_file():
            assert b"lora/" not in blob.read_bytes() and b"adapter_config" not in blob.read_bytes()


def test_policy_is_enforced_and_client_can_only_tighten(
    loose_server: LiveServer, server_env: ServerEnv
) -> None:
    from tensafe.server.models import TrainingModel
    from tensafe.server.privacy import EffectivePolicy

    key = server_env.tenant_key("acme")
    with server_env.sessions.begin() as s:
        set_tenant_policy(
            s, "acme", target_epsilon=20.0, delta=1e-4, clip_norm=1.0, dataset_size=32, max_steps=2
        )
    service = tinker.ServiceClient(base_url=loose_server.url, api_key=key)
    try:
        with pytest.raises(tinker.BadRequestError, match="looser"):
            service.create_lora_training_client(
                base_model=TINY_MODEL, rank=2, user_metadata={"tensafe.dp.target_epsilon": "100"}
            ).result()
        with pytest.raises(tinker.BadRequestError, match="without differential privacy"):
            service.create_lora_training_client(
                base_model=TINY_MODEL, rank=2, user_metadata={"tensafe.dp.enabled": "false"}
            ).result()
        training = service.create_lora_training_client(
            base_model=TINY_MODEL, rank=2, user_metadata={"tensafe.dp.target_epsilon": "5"}
        ).result()
        with server_env.sessions() as s:
            row = s.get(TrainingModel, training.model_id)
            assert row is not None
            effective = EffectivePolicy.from_json(row.dp_policy).policy
        assert effective is not None
        assert (effective.target_epsilon, effective.delta, effective.clip_norm) == (5.0, 1e-4, 1.0)
        assert (effective.dataset_size, effective.expected_batch_size, effective.max_steps) == (32, 8, 2)
        batch = [_datum(TOKENS[0], weights=[1.0] * 5)]
        for _ in range(2):
            training.forward_backward(batch, "cross_entropy").result()
            training.optim_step(tinker.types.AdamParams(learning_rate=1e-3)).result()
        training.forward_backward(batch, "cross_entropy").result()
        with pytest.raises(tinker.RequestFailedError) as err:
            training.optim_step(tinker.types.AdamParams(learning_rate=1e-3)).result()
        assert "allows 2 optimizer steps" in str(err.value)
    finally:
        service.close("success").result()
    from tensafe.server.models import FutureRow

    with server_env.sessions() as s:
        failed = s.execute(select(FutureRow).where(FutureRow.state == "failed")).scalars().all()
    assert [f.error_category for f in failed if f.request_type == "optim_step"] == ["user"]


def test_budget_exhaustion_fails_the_step_as_user_error(start_server: Any, server_env: ServerEnv) -> None:
    # sigma fixed small: the second step would exceed the target epsilon.
    tight = dataclasses.replace(LOOSE, target_epsilon=1.0, dataset_size=16, expected_batch_size=8)
    server = start_server(privacy=tight)
    key = server_env.tenant_key("acme")
    service = tinker.ServiceClient(base_url=server.url, api_key=key)
    try:
        training = service.create_lora_training_client(
            base_model=TINY_MODEL, rank=2, user_metadata={"tensafe.dp.noise_multiplier": "0.8"}
        ).result()
        batch = [_datum(TOKENS[0], weights=[1.0] * 5)]
        with pytest.raises(tinker.RequestFailedError, match=r"(?i)budget|epsilon"):
            for _ in range(5):
                training.forward_backward(batch, "cross_entropy").result()
                training.optim_step(tinker.types.AdamParams(learning_rate=1e-3)).result()
    finally:
        service.close("success").result()


def test_tenant_isolation_of_checkpoints_and_samplers(
    loose_server: LiveServer, server_env: ServerEnv
) -> None:
    import httpx

    key_a, key_b = server_env.tenant_key("acme"), server_env.tenant_key("globex")
    service = tinker.ServiceClient(base_url=loose_server.url, api_key=key_a)
    try:
        training = service.create_lora_training_client(base_model=TINY_MODEL, rank=2).result()
        path = training.save_state("mine").result().path
        spath = training.save_weights_for_sampler("mine").result().path
        service.create_sampling_client(model_path=spath).result()
    finally:
        service.close("success").result()

    other = tinker.ServiceClient(base_url=loose_server.url, api_key=key_b)
    try:
        with pytest.raises(tinker.NotFoundError):
            other.create_training_client_from_state(path).result()
        with pytest.raises(tinker.NotFoundError):
            other.create_sampling_client(model_path=spath).result()
        rest = tinker.RestClient(base_url=loose_server.url, api_key=key_b)
        with pytest.raises(tinker.NotFoundError):
            rest.get_weights_info_by_tinker_path(path).result()
        with pytest.raises(tinker.NotFoundError):
            rest.delete_checkpoint_from_tinker_path(path).result()
        assert rest.list_user_checkpoints().result().checkpoints == []
    finally:
        other.close("success").result()
    headers = {"X-API-Key": key_b}
    with httpx.Client(base_url=loose_server.url, headers=headers) as http:
        sid = training.model_id.split(":train:")[0]
        r = http.get(f"/api/v1/samplers/{sid}:sample:0")
        assert r.status_code == 404 and r.json()["error"] == "not_found"
        body = {
            "sampling_session_id": f"{sid}:sample:0",
            "seq_id": 0,
            "num_samples": 1,
            "prompt": {"chunks": [{"tokens": [1, 2], "type": "encoded_text"}]},
            "sampling_params": {"max_tokens": 2},
        }
        assert http.post("/api/v1/asample", json=body).status_code == 404


def test_unsupported_sampling_knobs_are_user_errors(loose_server: LiveServer, server_env: ServerEnv) -> None:
    import httpx

    key = server_env.tenant_key("acme")
    service = tinker.ServiceClient(base_url=loose_server.url, api_key=key)
    try:
        sampler = service.create_sampling_client(base_model=TINY_MODEL).result()
        prompt = tinker.types.ModelInput.from_ints([1, 2, 3])
        greedy = tinker.types.SamplingParams(max_tokens=2, temperature=0.0, stop=[])
        out = sampler.sample(prompt, 1, greedy).result()
        assert len(out.sequences[0].tokens) == 2
        rest = tinker.RestClient(base_url=loose_server.url, api_key=key)
        (session_id,) = rest.list_sessions().result().sessions
        (sampler_id,) = rest.get_session(session_id).result().sampler_ids
        assert rest.get_sampler(sampler_id).result().base_model == TINY_MODEL
    finally:
        service.close("success").result()
    with httpx.Client(base_url=loose_server.url, headers={"X-API-Key": key}) as http:
        body: dict[str, Any] = {
            "sampling_session_id": sampler_id,
            "seq_id": 5,
            "num_samples": 1,
            "prompt": {"chunks": [{"tokens": [1, 2], "type": "encoded_text"}]},
            "sampling_params": {"max_tokens": 2},
        }
        for knob, value in [
            ("topk_sample_logprobs", 3),
            ("prompt_alt_tokens_k", 2),
        ]:
            r = http.post("/api/v1/asample", json=body | {knob: value})
            assert r.status_code == 400 and knob in r.json()["detail"]
        r = http.post("/api/v1/asample", json=body | {"num_samples": 0})
        assert r.status_code == 422


SENTENCE = [310, 4021, 77, 1500, 9, 2600]


def _sentence_datum(rng: np.random.Generator) -> Any:
    tokens = [int(x) for x in rng.integers(1000, 40000, size=2)] + SENTENCE
    targets = [*tokens[1:], SENTENCE[0]]
    weights = [0.0] + [1.0] * (len(tokens) - 1)  # the first target follows a random token
    return tinker.types.Datum(
        model_input=tinker.types.ModelInput.from_ints(tokens),
        loss_fn_inputs={"target_tokens": targets, "weights": weights},
    )


@pytest.mark.slow
def test_supervised_dp_loop_through_the_api_lowers_held_out_loss(
    start_server: Any, server_env: ServerEnv
) -> None:
    from tensafe.privacy import compute_epsilon
    from tensafe.server.models import TrainingModel
    from tensafe.server.privacy import model_certificate, model_privacy_spent

    steps, n, batch_size = 10, 256, 32
    server = start_server()  # the operator's default floor (epsilon 8, delta 1e-5, C 1)
    key = server_env.tenant_key("acme")
    with server_env.sessions.begin() as s:
        set_tenant_policy(
            s,
            "acme",
            target_epsilon=8.0,
            delta=1e-5,
            clip_norm=1.0,
            dataset_size=n,
            expected_batch_size=batch_size,
            max_steps=steps,
        )
    rng = np.random.default_rng(0)
    train = [_sentence_datum(rng) for _ in range(n)]
    held_out = [_sentence_datum(rng) for _ in range(32)]
    held_weight = sum(sum(d.loss_fn_inputs["weights"].data) for d in held_out)
    service = tinker.ServiceClient(base_url=server.url, api_key=key)
    try:
        training = service.create_lora_training_client(
            base_model=TINY_MODEL, rank=8, seed=0, train_unembed=True
        ).result()

        def held_out_loss() -> float:
            return (
                float(training.forward(held_out, "cross_entropy").result().metrics["loss:sum"]) / held_weight
            )

        before = held_out_loss()
        for _ in range(steps):
            picked = rng.choice(n, size=batch_size, replace=False)
            training.forward_backward([train[i] for i in picked], "cross_entropy").result()
            metrics = training.optim_step(tinker.types.AdamParams(learning_rate=0.05)).result().metrics
        after = held_out_loss()
        assert after < before - 0.5, (before, after)
    finally:
        service.close("success").result()
    with server_env.sessions() as s:
        row = s.get(TrainingModel, training.model_id)
        assert row is not None
        spent, cert = model_privacy_spent(row), model_certificate(row)
    assert spent is not None and cert is not None
    # The client chose the batches: no sampling amplification (q = 1), whatever it declared.
    expected = compute_epsilon(
        accountant="rdp",
        noise_multiplier=spent["noise_multiplier"],
        sample_rate=1.0,
        steps=steps,
        delta=1e-5,
    )
    assert cert.steps == steps and cert.epsilon == pytest.approx(expected, rel=1e-12)
    assert cert.epsilon <= 8.0 and cert.recompute_epsilon() == pytest.approx(cert.epsilon)
    assert metrics is not None and metrics["dp_epsilon:max"] == pytest.approx(expected, rel=1e-12)
    assert cert.sampling_method == "client_chosen_batches" and cert.sampled_by == "client"
    assert cert.amplification == "none" and cert.sample_rate == 1.0


def test_a_failed_request_keeps_the_accumulated_gradients(
    loose_server: LiveServer, server_env: ServerEnv
) -> None:
    key = server_env.tenant_key("acme")
    service = tinker.ServiceClient(base_url=loose_server.url, api_key=key)
    try:
        training = service.create_lora_training_client(base_model=TINY_MODEL, rank=2).result()
        training.save_state("taken").result()
        batch = [_datum(TOKENS[0], weights=[1.0] * 5), _datum(TOKENS[1], weights=[1.0] * 5)]
        training.forward_backward(batch, "cross_entropy").result()
        with pytest.raises(tinker.RequestFailedError, match="already exists"):
            training.save_state("taken").result()
        with pytest.raises(tinker.RequestFailedError, match="loss"):
            training.forward_backward(batch, "no_such_loss").result()
        metrics = training.optim_step(tinker.types.AdamParams(learning_rate=1e-3)).result().metrics
        assert metrics is not None and metrics["examples:sum"] == 2.0
    finally:
        service.close("success").result()
