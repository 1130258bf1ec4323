"""DP-SGD enforcement in the training runtime: clipping per Datum, chunks, budget, Poisson mode."""

from __future__ import annotations

import logging
import pathlib
from typing import Any

import numpy as np
import pytest
import torch

from tensafe.privacy import BudgetExceededError, DpPolicy, DpPolicyError, compute_epsilon
from tensafe.training.dp import CLIP_EPSILON
from tensafe.training.runtime import (
    USER_ERRORS,
    Datum,
    LoraTrainingSession,
    SessionStateError,
    StepLimitError,
)
from training._dp_helpers import ZeroNoise
from training._runtime_helpers import (
    ADAM,
    capture_grads,
    runtime_data,
    runtime_policy,
    runtime_session,
    trainable_weights,
)


def _naive_clipped_mean(
    s: LoraTrainingSession, data: list[Datum], clip: float, batch: int
) -> list[torch.Tensor]:
    """One backward per datum (unpadded), clip its flat gradient, sum, divide by the expected batch size."""
    params = [p for p in s.model.parameters() if p.requires_grad]
    total = [torch.zeros_like(p, dtype=torch.float64) for p in params]
    for d in data:
        logits = s.model(input_ids=torch.tensor([d.model_input])).logits[0].to(torch.float64)
        logp = torch.log_softmax(logits, dim=-1)
        targets = d.loss_fn_inputs["target_tokens"]
        weights = d.loss_fn_inputs["weights"]
        loss = -sum(logp[t, int(targets[t])] * float(weights[t]) for t in range(len(d.model_input)))
        grads = torch.autograd.grad(loss, params)
        norm = float(torch.sqrt(sum((g.to(torch.float64) ** 2).sum() for g in grads)))
        factor = min(1.0, clip / (norm + CLIP_EPSILON))
        for acc, g in zip(total, grads, strict=True):
            acc += g.to(torch.float64) * factor
    return [acc / batch for acc in total]


def test_dp_gradient_is_clipped_per_datum_and_normalised_by_the_policy_batch(
    tiny_model_dir: pathlib.Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    s = runtime_session(tiny_model_dir, runtime_policy(expected_batch_size=4))
    s._dp.engine.random_source = ZeroNoise()  # type: ignore[union-attr]  # expose the clipped sum
    captured = capture_grads(s, monkeypatch)
    data = runtime_data(5)
    expected = _naive_clipped_mean(s, data, clip=0.05, batch=4)
    fb = s.forward_backward(data, "cross_entropy")
    assert fb.metrics["dp_clipped:sum"] == 5.0  # every datum's norm exceeds the tiny clip norm
    s.optim_step(ADAM)
    for got, ref in zip(captured[0], expected, strict=True):
        torch.testing.assert_close(got.to(torch.float64), ref, rtol=2e-3, atol=1e-7)


def test_two_chunks_equal_one_chunk_and_noise_is_added_once(tiny_model_dir: pathlib.Path) -> None:
    data = runtime_data(6, seed=4)
    one = runtime_session(tiny_model_dir, runtime_policy(), max_microbatch_size=4)
    two = runtime_session(tiny_model_dir, runtime_policy(), max_microbatch_size=2)
    assert all(torch.equal(a, b) for a, b in zip(trainable_weights(one), trainable_weights(two), strict=True))
    r1 = one.forward_backward(data, "cross_entropy")
    r2a = two.forward_backward(data[:2], "cross_entropy")
    r2b = two.forward_backward(data[2:], "cross_entropy")
    assert r1.metrics["loss:sum"] == pytest.approx(
        r2a.metrics["loss:sum"] + r2b.metrics["loss:sum"], rel=1e-5
    )
    m1 = one.optim_step(ADAM)
    m2 = two.optim_step(ADAM)
    assert m1["examples:sum"] == m2["examples:sum"] == 6.0
    assert m1["grad_norm:mean"] == pytest.approx(m2["grad_norm:mean"], rel=1e-5)
    for a, b in zip(trainable_weights(one), trainable_weights(two), strict=True):
        torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-7)
    # With noise present, a second noise draw per chunk would have changed the result:
    assert one.privacy_spent()["steps"] == two.privacy_spent()["steps"] == 1


def test_budget_refusal_changes_nothing(tiny_model_dir: pathlib.Path) -> None:
    q, sigma, delta = 1.0, 8.0, 1e-5  # client-chosen batches: no amplification (q = 1)
    eps1 = compute_epsilon(accountant="rdp", noise_multiplier=sigma, sample_rate=q, steps=1, delta=delta)
    eps2 = compute_epsilon(accountant="rdp", noise_multiplier=sigma, sample_rate=q, steps=2, delta=delta)
    s = runtime_session(
        tiny_model_dir, runtime_policy(noise_multiplier=sigma, target_epsilon=(eps1 + eps2) / 2)
    )
    data = runtime_data(4)
    s.forward_backward(data, "cross_entropy")
    s.optim_step(ADAM)
    s.forward_backward(data, "cross_entropy")
    before = trainable_weights(s)
    opt_before = {k: v.clone() for p in s._optimizer.state.values() for k, v in p.items() if k == "exp_avg"}
    with pytest.raises(BudgetExceededError, match="step 2") as info:
        s.optim_step(ADAM)
    assert isinstance(info.value, USER_ERRORS)
    assert all(torch.equal(a, b) for a, b in zip(before, trainable_weights(s), strict=True))
    opt_after = {k: v for p in s._optimizer.state.values() for k, v in p.items() if k == "exp_avg"}
    assert all(torch.equal(opt_before[k], opt_after[k]) for k in opt_before)
    spent = s.privacy_spent()
    assert spent["steps"] == 1 and spent["epsilon"] == pytest.approx(eps1)
    cert = s.privacy_certificate()  # deterministic test noise: steps counted, no ε claimed
    assert cert.steps == 1 and cert.epsilon is None and not cert.private
    with pytest.raises(BudgetExceededError):  # still refused, still nothing changes
        s.optim_step(ADAM)
    assert all(torch.equal(a, b) for a, b in zip(before, trainable_weights(s), strict=True))


def test_max_steps_is_enforced(tiny_model_dir: pathlib.Path) -> None:
    s = runtime_session(tiny_model_dir, runtime_policy(max_steps=1))
    s.forward_backward(runtime_data(2), "cross_entropy")
    s.optim_step(ADAM)
    before = trainable_weights(s)
    with pytest.raises(StepLimitError, match="1 optimizer steps"):
        s.optim_step(ADAM)
    assert all(torch.equal(a, b) for a, b in zip(before, trainable_weights(s), strict=True))


def test_calibrated_noise_reaches_target_after_max_steps(tiny_model_dir: pathlib.Path) -> None:
    policy = runtime_policy(noise_multiplier=None, max_steps=3, target_epsilon=4.0)
    s = runtime_session(tiny_model_dir, policy)
    for _ in range(3):
        s.forward_backward(runtime_data(2), "cross_entropy")
        s.optim_step(ADAM)
    spent = s.privacy_spent()
    assert spent["epsilon"] <= 4.0
    assert spent["epsilon"] == pytest.approx(4.0, rel=0.01)  # calibrated, not wasteful
    with pytest.raises((StepLimitError, BudgetExceededError)):
        s.optim_step(ADAM)


def test_every_loss_function_runs_under_dp(tiny_model_dir: pathlib.Path) -> None:
    s = runtime_session(tiny_model_dir, runtime_policy())
    rng = np.random.default_rng(0)

    def rl(seed: int) -> list[Datum]:  # distinct datums per loss: each unit once per step
        return [
            Datum(
                model_input=d.model_input,
                loss_fn_inputs={
                    "target_tokens": d.loss_fn_inputs["target_tokens"],
                    "logprobs": rng.normal(-10, 0.3, size=len(d.model_input)).astype(np.float32),
                    "advantages": rng.normal(size=len(d.model_input)).astype(np.float32),
                },
            )
            for d in runtime_data(3, seed=seed)
        ]

    before = trainable_weights(s)
    for seed, (loss_fn, cfg) in enumerate(
        [
            ("importance_sampling", None),
            ("ppo", {"clip_low_threshold": 0.8, "clip_high_threshold": 1.2}),
            ("cispo", None),
            ("dro", {"beta": 0.1}),
        ],
        start=10,
    ):
        out = s.forward_backward(rl(seed), loss_fn, cfg)
        assert np.isfinite(out.metrics["loss:sum"])
    s.forward_backward(runtime_data(2), "cross_entropy")
    s.optim_step(ADAM)
    assert s.privacy_spent()["steps"] == 1
    assert not all(torch.equal(a, b) for a, b in zip(before, trainable_weights(s), strict=True))


def test_client_chosen_certificate_is_honest(tiny_model_dir: pathlib.Path) -> None:
    """The client chose the batches: the ε is that of the Gaussian mechanism at every step (q = 1),
    never the Poisson ε of q = B/N that the declared batch size would suggest."""
    from dp_accounting import dp_event, rdp

    s = LoraTrainingSession.create(base_model=str(tiny_model_dir), rank=2, dp=runtime_policy(), seed=3)
    for step in range(2):
        s.forward_backward(runtime_data(3, seed=step), "cross_entropy")
        s.optim_step(ADAM)
    cert = s.privacy_certificate()
    assert cert.sampling_method == "client_chosen_batches" and cert.sampled_by == "client"
    assert cert.amplification == "none" and cert.sample_rate == 1.0 and cert.private
    assert cert.expected_batch_size == 4 and cert.dataset_size == 1000
    assert cert.privacy_unit == "datum" and cert.noise_rng == "csprng"
    assert "the client chose the batches" in cert.statement
    oracle = rdp.RdpAccountant()
    oracle.compose(dp_event.GaussianDpEvent(1.0), 2)
    assert cert.epsilon == pytest.approx(oracle.get_epsilon(1e-5), rel=1e-12)
    poisson = compute_epsilon(accountant="rdp", noise_multiplier=1.0, sample_rate=0.004, steps=2, delta=1e-5)
    assert cert.epsilon > 5 * poisson  # what the old certificate would have claimed


def test_deterministic_certificate_is_not_private(tiny_model_dir: pathlib.Path) -> None:
    s = runtime_session(tiny_model_dir, runtime_policy())
    s.forward_backward(runtime_data(3), "cross_entropy")
    s.optim_step(ADAM)
    cert = s.privacy_certificate()
    assert cert.private is False and cert.epsilon is None and cert.noise_rng == "deterministic"
    assert cert.statement.startswith("No differential privacy guarantee")


def test_non_private_needs_explicit_opt_in(tiny_model_dir: pathlib.Path) -> None:
    with pytest.raises(DpPolicyError, match="allow_non_private"):
        LoraTrainingSession.create(base_model=str(tiny_model_dir), rank=2, dp=None)
    s = LoraTrainingSession.create(base_model=str(tiny_model_dir), rank=2, dp=None, allow_non_private=True)
    s.forward_backward(runtime_data(2), "cross_entropy")
    s.optim_step(ADAM)
    cert = s.privacy_certificate()
    assert cert.dp_enabled is False and cert.epsilon is None and cert.steps == 1
    assert s.privacy_spent() == {"dp_enabled": False, "epsilon": None, "steps": 1}


def test_deterministic_mode_warns_loudly(
    tiny_model_dir: pathlib.Path, caplog: pytest.LogCaptureFixture
) -> None:
    with caplog.at_level(logging.WARNING):
        runtime_session(tiny_model_dir, runtime_policy())
    assert "NO differential-privacy guarantee" in caplog.text


def test_secure_mode_noise_differs_between_runs(tiny_model_dir: pathlib.Path) -> None:
    results = []
    for _ in range(2):
        s = LoraTrainingSession.create(base_model=str(tiny_model_dir), rank=2, dp=runtime_policy(), seed=1)
        assert s.privacy_certificate().private
        s.forward_backward(runtime_data(2), "cross_entropy")
        s.optim_step(ADAM)
        results.append(trainable_weights(s))
    assert not all(torch.equal(a, b) for a, b in zip(results[0], results[1], strict=True))


# ---------------------------------------------------------------------------- server-side Poisson


def _poisson_policy(**overrides: Any) -> DpPolicy:
    values: dict[str, Any] = {
        "sampling": "server_poisson",
        "dataset_size": None,
        "expected_batch_size": 3,
    }
    values.update(overrides)
    return runtime_policy(**values)


def test_server_poisson_flow(tiny_model_dir: pathlib.Path) -> None:
    s = runtime_session(tiny_model_dir, _poisson_policy())
    examples = runtime_data(12, seed=7)
    with pytest.raises(SessionStateError, match="register_dataset"):
        s.forward_backward(examples[:1], "cross_entropy")
    s.register_dataset(examples)
    with pytest.raises(SessionStateError, match="already registered"):
        s.register_dataset(examples)
    batch = s.sample_batch()
    assert s.sample_batch() == batch  # stable until the step is taken
    drawn = {tuple(d.model_input) for d in batch}
    outsider = next(d for d in examples if tuple(d.model_input) not in drawn)
    with pytest.raises(SessionStateError, match="not an unused example"):
        s.forward_backward([outsider], "cross_entropy")
    if batch:
        with pytest.raises(SessionStateError, match="not trained on"):
            s.optim_step(ADAM)
        s.forward_backward(batch, "cross_entropy")
        with pytest.raises(SessionStateError, match="not an unused example"):
            s.forward_backward(batch[:1], "cross_entropy")  # each drawn example once per step
    s.optim_step(ADAM)
    sizes = []
    for _ in range(4):
        b = s.sample_batch()
        sizes.append(len(b))
        if b:
            s.forward_backward(b, "cross_entropy")
        s.optim_step(ADAM)  # empty batches are still steps (noise only)
    cert = s.privacy_certificate()
    assert cert.sampling_method == "poisson" and cert.sampled_by == "engine"
    assert cert.amplification == "poisson_subsampling" and cert.dataset_size_source == "registered"
    assert cert.steps == 5 and cert.dataset_size == 12 and cert.sample_rate == 3 / 12
    assert not cert.private  # deterministic test noise: the statement says there is no guarantee
    # forward (no gradient) is not restricted to the drawn batch
    assert len(s.forward(examples[:2], "cross_entropy").loss_fn_outputs) == 2


def test_server_poisson_batches_are_reproducible_in_deterministic_mode(tiny_model_dir: pathlib.Path) -> None:
    draws = []
    for _ in range(2):
        s = runtime_session(tiny_model_dir, _poisson_policy())
        s.register_dataset(runtime_data(30, seed=1))
        seq = []
        for _ in range(3):
            b = s.sample_batch()
            seq.append([tuple(d.model_input) for d in b])
            if b:
                s.forward_backward(b, "cross_entropy")
            s.optim_step(ADAM)
        draws.append(seq)
    assert draws[0] == draws[1]


def test_register_dataset_checks_mode_and_size(tiny_model_dir: pathlib.Path) -> None:
    s = runtime_session(tiny_model_dir, runtime_policy())
    with pytest.raises(SessionStateError, match="server_poisson"):
        s.register_dataset(runtime_data(3))
    with pytest.raises(SessionStateError):
        s.sample_batch()
    p = runtime_session(tiny_model_dir, _poisson_policy(dataset_size=20))
    with pytest.raises(DpPolicyError, match="dataset_size=20"):
        p.register_dataset(runtime_data(12))
