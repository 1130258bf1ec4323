"""The DP plan (``plan_dp_sgd``): σ, q and budget from a policy, checked against independent calls.

The oracle for σ is :func:`calibrate_noise` called directly with the q the rule prescribes
(``B / N`` only when the engine samples, ``1`` for client-chosen batches); the oracle for the
budget is :func:`compute_epsilon`. Refusals are attacks a client or an operator could try.
"""

from __future__ import annotations

import math
from typing import Any

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from tensafe.privacy import (
    DpPolicy,
    DpPolicyError,
    DpSgdEvent,
    PolicyLoosenedError,
    PrivacyConfigError,
    PrivacyError,
    calibrate_noise,
    compute_epsilon,
    plan_dp_sgd,
)


def _policy(**overrides: Any) -> DpPolicy:
    values: dict[str, Any] = {
        "target_epsilon": 4.0,
        "delta": 1e-5,
        "clip_norm": 1.0,
        "dataset_size": 1000,
        "expected_batch_size": 10,
        "max_steps": 50,
    }
    values.update(overrides)
    return DpPolicy(**values)


@settings(max_examples=12, deadline=None)
@given(
    n=st.integers(min_value=200, max_value=50_000),
    b=st.integers(min_value=1, max_value=200),
    eps=st.floats(min_value=1.0, max_value=20.0),
    steps=st.integers(min_value=1, max_value=300),
    poisson=st.booleans(),
)
def test_calibrated_sigma_equals_calibrate_noise_with_the_prescribed_q(
    n: int, b: int, eps: float, steps: int, poisson: bool
) -> None:
    sampling = "server_poisson" if poisson else "client_chosen_batches"
    policy = _policy(
        target_epsilon=eps, dataset_size=n, expected_batch_size=b, max_steps=steps, sampling=sampling
    )
    q = b / n if poisson else 1.0
    try:
        expected = calibrate_noise(
            target_epsilon=eps, delta=1e-5, sample_rate=q, steps=steps, accountant="rdp"
        )
    except PrivacyError:
        with pytest.raises(DpPolicyError, match="cannot calibrate the noise"):
            plan_dp_sgd(policy=policy, dataset_size=n)
        return
    plan = plan_dp_sgd(policy=policy, dataset_size=n)
    assert plan.sample_rate == q  # exact: the same float division, or exactly 1
    assert plan.noise_multiplier == expected  # bit for bit
    assert plan.noise_origin == "calibrated"
    assert plan.engine_samples is poisson


def test_client_chosen_batches_never_get_amplification() -> None:
    # A client that declares a huge N and a tiny B still gets q = 1: it chooses the batches.
    policy = _policy(dataset_size=10**6, expected_batch_size=1, delta=1e-7)
    plan = plan_dp_sgd(policy=policy, dataset_size=10**6)
    assert plan.sample_rate == 1.0
    assert not plan.engine_samples
    amplified = calibrate_noise(target_epsilon=4.0, delta=1e-7, sample_rate=1e-6, steps=50, accountant="rdp")
    assert plan.noise_multiplier > 2 * amplified  # the honest σ is far larger
    budget = plan.new_budget()
    for _ in range(3):
        budget.check_step()
        budget.record_step()
    oracle = compute_epsilon(
        accountant="rdp", noise_multiplier=plan.noise_multiplier, sample_rate=1.0, steps=3, delta=1e-7
    )
    assert budget.spent_epsilon() == pytest.approx(oracle, rel=1e-12)


def test_budget_and_step_event_follow_the_plan() -> None:
    policy = _policy(sampling="server_poisson", dataset_size=None, noise_multiplier=1.1)
    plan = plan_dp_sgd(policy=policy, dataset_size=400)
    assert (plan.noise_multiplier, plan.sample_rate, plan.noise_origin) == (1.1, 10 / 400, "policy")
    assert plan.step_event() == DpSgdEvent(noise_multiplier=1.1, sample_rate=10 / 400, steps=1)
    budget = plan.new_budget()
    assert budget.target_epsilon == 4.0
    steps = 0
    with pytest.raises(PrivacyError, match="privacy budget exhausted"):
        while True:
            budget.check_step()
            budget.record_step()
            steps += 1
    # The refused step is the first whose ε (computed independently) exceeds the target.
    eps = compute_epsilon(
        accountant="rdp", noise_multiplier=1.1, sample_rate=10 / 400, steps=steps + 1, delta=1e-5
    )
    assert eps > 4.0
    assert (
        compute_epsilon(accountant="rdp", noise_multiplier=1.1, sample_rate=10 / 400, steps=steps, delta=1e-5)
        <= 4.0
    )


def test_a_saved_sigma_is_used_as_is() -> None:
    # A resumed run never recalibrates, even when the policy alone would give another σ.
    policy = _policy()
    fresh = plan_dp_sgd(policy=policy, dataset_size=1000)
    saved = plan_dp_sgd(policy=policy, dataset_size=1000, saved_noise_multiplier=fresh.noise_multiplier * 2)
    assert saved.noise_multiplier == fresh.noise_multiplier * 2
    assert saved.noise_origin == "saved"
    assert saved.sample_rate == fresh.sample_rate


@pytest.mark.parametrize(
    ("policy", "n", "message"),
    [
        (_policy(), 999, "registered data set has 999 examples but the DP policy says dataset_size=1000"),
        (_policy(sampling="server_poisson", dataset_size=None), 5, "expected_batch_size 10 exceeds"),
        (_policy(sampling="server_poisson", dataset_size=None, delta=1e-3), 2000, "delta"),
        (_policy(target_epsilon=1e-4, max_steps=10_000), 1000, "cannot calibrate the noise"),
        (_policy(), 0, "positive integer"),
        (_policy(), True, "positive integer"),
    ],
)
def test_refusals(policy: DpPolicy, n: Any, message: str) -> None:
    with pytest.raises(DpPolicyError, match=message) as info:
        plan_dp_sgd(policy=policy, dataset_size=n)
    assert "\n" not in str(info.value)


def test_policy_errors_are_privacy_config_errors() -> None:
    assert issubclass(DpPolicyError, PrivacyConfigError)
    assert issubclass(PolicyLoosenedError, DpPolicyError)
    with pytest.raises(PrivacyError):
        _policy(delta=math.nan)
    with pytest.raises(DpPolicyError, match="needs a DpPolicy"):
        plan_dp_sgd(policy={"target_epsilon": 1.0}, dataset_size=10)  # type: ignore[arg-type]
