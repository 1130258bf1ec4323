"""``tensafe train`` and the training runtime share one DP plan (σ, q, budget, engine normaliser).

Oracles: :func:`calibrate_noise` called directly (σ), the realised engine of each path, and
the plan built from the trainer's own configuration.
"""

from __future__ import annotations

import json
import pathlib
from typing import Any

import pytest

from tensafe.privacy import DpPolicy, DpPolicyError, calibrate_noise, plan_dp_sgd
from tensafe.training.config import load_config
from tensafe.training.dp import build_dp_sgd, deterministic_random_source
from tensafe.training.runtime import USER_ERRORS, LoraTrainingSession
from tensafe.training.trainer import dp_policy_of, train
from training._run_helpers import isolated_deployment, write_run
from training._runtime_helpers import runtime_data


def test_trainer_and_session_get_the_same_sigma_as_calibrate_noise(
    tmp_path: pathlib.Path, tiny_model_dir: pathlib.Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    # 200 training records, B = 20, 6 steps, ε = 8, δ = 1e-5 (write_run's defaults).
    isolated_deployment(monkeypatch, tmp_path / "deployment")
    cfg = load_config(write_run(tmp_path, tiny_model_dir))
    result = train(cfg, signer=None, show_progress=False)
    summary = json.loads(result.summary_path.read_text(encoding="utf-8"))
    oracle = calibrate_noise(target_epsilon=8.0, delta=1e-5, sample_rate=20 / 200, steps=6, accountant="rdp")
    assert summary["noise_multiplier"] == oracle
    assert summary["sample_rate"] == 20 / 200
    assert result.certificate.noise_multiplier == oracle

    # The same numbers as a server policy: the engine samples from a registered data set of 200.
    policy = DpPolicy(
        target_epsilon=8.0,
        delta=1e-5,
        clip_norm=1.0,
        sampling="server_poisson",
        expected_batch_size=20,
        max_steps=6,
    )
    session = LoraTrainingSession.create(
        base_model=str(tiny_model_dir), rank=4, dp=policy, seed=0, deterministic=True
    )
    session.register_dataset(runtime_data(200, seed=5))
    spent = session.privacy_spent()
    assert spent["noise_multiplier"] == oracle
    assert spent["sample_rate"] == 20 / 200
    # And the plan of the trainer's own configuration is the same plan.
    plan = plan_dp_sgd(policy=dp_policy_of(cfg, dataset_size=200, steps=6), dataset_size=200)
    assert (plan.noise_multiplier, plan.sample_rate, plan.engine_samples) == (oracle, 0.1, True)


def test_client_chosen_session_is_planned_with_q_one(tiny_model_dir: pathlib.Path) -> None:
    policy = DpPolicy(
        target_epsilon=8.0, delta=1e-5, clip_norm=1.0, dataset_size=200, expected_batch_size=20, max_steps=6
    )
    session = LoraTrainingSession.create(
        base_model=str(tiny_model_dir), rank=4, dp=policy, seed=0, deterministic=True
    )
    oracle = calibrate_noise(target_epsilon=8.0, delta=1e-5, sample_rate=1.0, steps=6, accountant="rdp")
    spent = session.privacy_spent()
    assert (spent["noise_multiplier"], spent["sample_rate"]) == (oracle, 1.0)


def test_engine_divides_by_exactly_b(tiny_llama: Any) -> None:
    # 7 / 200 * 200 != 7 in floating point: the normaliser is B itself, never q * N.
    assert 7 / 200 * 200 != 7
    model = tiny_llama
    for p in model.parameters():
        p.requires_grad_(False)
    model.model.layers[0].self_attn.q_proj.weight.requires_grad_(True)
    policy = DpPolicy(
        target_epsilon=8.0,
        delta=1e-3,
        clip_norm=1.0,
        noise_multiplier=1.0,
        sampling="server_poisson",
        expected_batch_size=7,
    )
    plan = plan_dp_sgd(policy=policy, dataset_size=200)
    engine, sampler = build_dp_sgd(plan, model, random_source=deterministic_random_source(0))
    try:
        assert engine.expected_batch_size == 7.0
        assert sampler is not None and sampler.sample_rate == 7 / 200 and sampler.n == 200
        assert engine.noise_multiplier == 1.0 and engine.clip_norm == 1.0
    finally:
        engine.close()
    client_policy = DpPolicy(**{**policy.to_dict(), "sampling": "client_chosen_batches", "dataset_size": 200})
    client = plan_dp_sgd(policy=client_policy, dataset_size=200)
    engine, sampler = build_dp_sgd(client, model, random_source=deterministic_random_source(0))
    engine.close()
    assert client.sample_rate == 1.0
    assert sampler is None  # the client chooses the batches: no engine sampler, no amplification


def test_a_policy_refusal_is_a_user_error(tiny_model_dir: pathlib.Path) -> None:
    policy = DpPolicy(
        target_epsilon=8.0,
        delta=1e-5,
        clip_norm=1.0,
        sampling="server_poisson",
        expected_batch_size=20,
        max_steps=6,
        dataset_size=100,
    )
    session = LoraTrainingSession.create(
        base_model=str(tiny_model_dir), rank=4, dp=policy, seed=0, deterministic=True
    )
    with pytest.raises(DpPolicyError, match="registered data set has 50 examples") as info:
        session.register_dataset(runtime_data(50, seed=1))
    assert isinstance(info.value, USER_ERRORS)  # the server answers 4xx, never 5xx
    assert not session.has_dp_state
