"""PrivacyBudget: exact refusal step, caching, resume."""

from __future__ import annotations

import json
import pickle

import pytest

from tensafe.privacy import BudgetExceededError, PrivacyBudget, PrivacyConfigError, compute_epsilon
from tensafe.privacy.accountants import base as accountant_base
from tensafe.privacy.accountants.builtin import RdpAccountant

PARAMS = {
    "target_epsilon": 1.2,
    "delta": 1e-5,
    "accountant": "rdp",
    "noise_multiplier": 1.0,
    "sample_rate": 0.01,
}


def _first_exceeding_step(accountant: str, target: float, sigma: float, q: float, delta: float) -> int:
    """Naive oracle: walk the steps one by one until ε exceeds the target."""
    n = 0
    while (
        compute_epsilon(
            accountant=accountant, noise_multiplier=sigma, sample_rate=q, steps=n + 1, delta=delta
        )
        <= target
    ):
        n += 1
    return n + 1


@pytest.mark.parametrize("accountant", ["rdp", "moments", pytest.param("pld", marks=pytest.mark.slow)])
def test_refuses_exactly_the_first_overspending_step(accountant: str) -> None:
    params = {**PARAMS, "accountant": accountant}
    budget = PrivacyBudget(**params)  # type: ignore[arg-type]
    with pytest.raises(BudgetExceededError) as info:
        for _ in range(100_000):
            budget.check_step()
            budget.record_step()
    refused = info.value.step
    assert refused == budget.steps + 1
    assert budget.spent_epsilon() <= 1.2 < budget.epsilon_after(refused)
    if accountant != "pld":  # The naive walk costs one accountant query per step.
        assert refused == _first_exceeding_step(accountant, 1.2, 1.0, 0.01, 1e-5)
    # The refusal is sticky and record_step fails closed too.
    with pytest.raises(BudgetExceededError):
        budget.record_step()
    assert budget.steps == refused - 1


def test_error_message_names_step_epsilon_and_target() -> None:
    budget = PrivacyBudget(**PARAMS)  # type: ignore[arg-type]
    budget.load_state_dict({**budget.state_dict(), "steps": 10_000})
    with pytest.raises(BudgetExceededError) as info:
        budget.check_step()
    err = info.value
    assert err.step == 10_001 and err.target_epsilon == 1.2 and err.epsilon > 1.2
    message = str(err)
    assert "step 10001" in message and f"ε={err.epsilon:.4f}" in message and "target ε=1.2" in message
    assert "\n" not in message
    clone = pickle.loads(pickle.dumps(err))
    assert (clone.step, clone.epsilon, str(clone)) == (err.step, err.epsilon, message)


def test_accountant_queries_grow_logarithmically(monkeypatch: pytest.MonkeyPatch) -> None:
    calls: list[tuple[object, ...]] = []
    original = RdpAccountant._compute.__func__  # type: ignore[attr-defined]

    def counting(cls, compositions, delta):  # type: ignore[no-untyped-def]
        calls.append(compositions)
        return original(cls, compositions, delta)

    accountant_base._cached_report.cache_clear()
    monkeypatch.setattr(RdpAccountant, "_compute", classmethod(counting))
    budget = PrivacyBudget(**{**PARAMS, "target_epsilon": 50.0})  # type: ignore[arg-type]
    for _ in range(3000):
        budget.check_step()
        budget.record_step()
    assert budget.steps == 3000
    assert len(calls) <= 15  # doubling look-ahead: about log2(3000) queries, not 3000
    before = len(calls)
    for _ in range(5):
        budget.spent_epsilon()
    assert len(calls) <= before + 1  # cached by step count


def test_epsilon_after_matches_compute_epsilon() -> None:
    budget = PrivacyBudget(**PARAMS)  # type: ignore[arg-type]
    assert budget.spent_epsilon() == 0.0
    assert budget.epsilon_after(123) == compute_epsilon(
        accountant="rdp", noise_multiplier=1.0, sample_rate=0.01, steps=123, delta=1e-5
    )
    with pytest.raises(PrivacyConfigError, match="steps must be >= 0"):
        budget.epsilon_after(-1)


def test_resume_from_state_dict() -> None:
    budget = PrivacyBudget(**PARAMS)  # type: ignore[arg-type]
    for _ in range(40):
        budget.record_step()
    state = json.loads(json.dumps(budget.state_dict()))
    resumed = PrivacyBudget(**PARAMS)  # type: ignore[arg-type]
    resumed.load_state_dict(state)
    assert resumed.steps == 40
    assert resumed.spent_epsilon() == budget.spent_epsilon()


@pytest.mark.parametrize(
    ("key", "value"),
    [
        ("noise_multiplier", 1.1),
        ("sample_rate", 0.02),
        ("delta", 1e-6),
        ("accountant", "pld"),
        ("target_epsilon", 2.0),
    ],
)
def test_resume_with_other_settings_is_refused(key: str, value: object) -> None:
    saved = PrivacyBudget(**PARAMS).state_dict()  # type: ignore[arg-type]
    other = PrivacyBudget(**{**PARAMS, key: value})  # type: ignore[arg-type]
    with pytest.raises(PrivacyConfigError, match=f"cannot resume: the saved budget has {key}="):
        other.load_state_dict(saved)


def test_malformed_state_is_refused() -> None:
    budget = PrivacyBudget(**PARAMS)  # type: ignore[arg-type]
    with pytest.raises(PrivacyConfigError, match="version"):
        budget.load_state_dict({"steps": 3})
    with pytest.raises(PrivacyConfigError, match="steps must be"):
        budget.load_state_dict({**budget.state_dict(), "steps": -3})


@pytest.mark.parametrize(
    ("key", "value"),
    [
        ("target_epsilon", 0.0),
        ("delta", 0.0),
        ("noise_multiplier", 0.0),
        ("sample_rate", 1.01),
        ("accountant", "x"),
    ],
)
def test_constructor_validation(key: str, value: object) -> None:
    with pytest.raises(PrivacyConfigError):
        PrivacyBudget(**{**PARAMS, key: value})  # type: ignore[arg-type]


def test_constructor_is_keyword_only() -> None:
    with pytest.raises(TypeError):
        PrivacyBudget(1.0, 1e-5, "rdp", 1.0, 0.01)  # type: ignore[misc]
