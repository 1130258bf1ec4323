"""A supervised DP loop through the runtime lowers held-out loss and certifies the accountant's ε."""

from __future__ import annotations

import pathlib

import numpy as np
import pytest

from tensafe.privacy import DpCertificate, DpPolicy, compute_epsilon
from tensafe.training.runtime import AdamParams, Datum, LoraTrainingSession

SENTENCE = [310, 4021, 77, 1500, 9, 2600]
STEPS = 10


def _example(rng: np.random.Generator) -> Datum:
    tokens = [int(x) for x in rng.integers(1000, 40000, size=2)] + SENTENCE
    targets = np.array([*tokens[1:], SENTENCE[0]], dtype=np.int64)
    weights = np.zeros(len(tokens), dtype=np.float32)
    weights[1:] = 1.0  # the first target follows a random token: not learnable
    return Datum(tokens, {"target_tokens": targets, "weights": weights})


def _mean_loss(session: LoraTrainingSession, data: list[Datum]) -> float:
    total = session.forward(data, "cross_entropy").metrics["loss:sum"]
    return total / sum(float(d.loss_fn_inputs["weights"].sum()) for d in data)


@pytest.mark.slow
def test_supervised_dp_loop_lowers_held_out_loss(tiny_model_dir: pathlib.Path) -> None:
    rng = np.random.default_rng(0)
    train = [_example(rng) for _ in range(256)]
    held_out = [_example(rng) for _ in range(32)]
    policy = DpPolicy(
        target_epsilon=8.0,
        delta=1e-5,
        clip_norm=1.0,
        accountant="rdp",
        dataset_size=len(train),
        expected_batch_size=32,
        max_steps=STEPS,
    )
    session = LoraTrainingSession.create(
        base_model=str(tiny_model_dir),
        rank=8,
        dp=policy,
        seed=0,
        train_unembed=True,
    )
    before = _mean_loss(session, held_out)
    for _ in range(STEPS):
        batch = rng.choice(len(train), size=32, replace=False)
        session.forward_backward([train[i] for i in batch], "cross_entropy")
        metrics = session.optim_step(AdamParams(learning_rate=0.05))
    after = _mean_loss(session, held_out)
    # Secure (random) noise: over 6 runs the loss fell by 2.2 to 6.5 nats; 0.5 leaves a wide margin.
    assert after < before - 0.5, (before, after)

    spent = session.privacy_spent()
    cert = session.privacy_certificate()
    # The caller chose the batches: no amplification is claimed (sample rate 1).
    expected = compute_epsilon(
        accountant="rdp",
        noise_multiplier=spent["noise_multiplier"],
        sample_rate=1.0,
        steps=STEPS,
        delta=1e-5,
    )
    assert cert.steps == STEPS
    assert cert.epsilon == pytest.approx(expected, rel=1e-12)
    assert metrics["dp_epsilon:max"] == pytest.approx(expected, rel=1e-12)
    assert cert.epsilon is not None and cert.epsilon <= 8.0
    assert cert.recompute_epsilon() == pytest.approx(cert.epsilon)
    assert DpCertificate.from_dict(cert.to_dict()) == cert
