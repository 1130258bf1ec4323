"""Registry, spending records and input validation."""

from __future__ import annotations

import dataclasses
import math
from typing import ClassVar

import pytest

from tensafe.errors import TenSafeError
from tensafe.privacy import (
    BudgetExceededError,
    CertificateError,
    DpSgdEvent,
    EpsilonReport,
    PrivacyConfigError,
    PrivacyError,
    SamplingMethod,
    UnreachableBudgetError,
    UnsupportedEvent,
    UnsupportedEventError,
    available_accountants,
    compute_epsilon,
    create_accountant,
    register_accountant,
    validate_delta,
)
from tensafe.privacy.accountants import RdpAccountant, registry
from tensafe.privacy.events import event_from_dict

GOOD = {"accountant": "rdp", "noise_multiplier": 1.0, "sample_rate": 0.01, "steps": 10, "delta": 1e-5}


def test_error_tree() -> None:
    for cls in (
        PrivacyConfigError,
        BudgetExceededError,
        UnreachableBudgetError,
        UnsupportedEventError,
        CertificateError,
    ):
        assert issubclass(cls, PrivacyError)
    assert issubclass(PrivacyError, TenSafeError)
    assert issubclass(PrivacyError, ValueError)


def test_builtin_registry() -> None:
    assert available_accountants() == ("moments", "pld", "prv", "rdp")


def test_unknown_accountant_lists_choices() -> None:
    with pytest.raises(
        PrivacyConfigError, match="unknown accountant 'gdp'; choose one of: moments, pld, prv, rdp"
    ):
        create_accountant("gdp")


def test_register_refuses_duplicates_and_mismatched_names() -> None:
    with pytest.raises(PrivacyConfigError, match="already registered"):
        register_accountant("rdp", RdpAccountant)
    with pytest.raises(PrivacyConfigError, match="has name 'rdp'"):
        register_accountant("rdp2", RdpAccountant)
    with pytest.raises(PrivacyConfigError, match="not an Accountant"):
        register_accountant("x", int)  # type: ignore[arg-type]


def test_register_plugin_accountant(monkeypatch: pytest.MonkeyPatch) -> None:
    # Register into a copy of the registry so other tests see only the built-ins.
    monkeypatch.setattr(registry, "_ACCOUNTANTS", dict(registry._ACCOUNTANTS))

    class Doubled(RdpAccountant):
        name: ClassVar[str] = "test_doubled_rdp"

        @classmethod
        def _compute(cls, compositions, delta):  # type: ignore[no-untyped-def]
            base = RdpAccountant._compute(compositions, delta)
            return EpsilonReport(epsilon=2 * base.epsilon, delta=delta, accountant=cls.name)

    register_accountant("test_doubled_rdp", Doubled)
    assert "test_doubled_rdp" in available_accountants()
    doubled = compute_epsilon(**{**GOOD, "accountant": "test_doubled_rdp"})
    assert doubled == pytest.approx(2 * compute_epsilon(**GOOD))


def test_events_are_frozen() -> None:
    event = DpSgdEvent(noise_multiplier=1.0, sample_rate=0.1, steps=3)
    with pytest.raises(dataclasses.FrozenInstanceError):
        event.steps = 4  # type: ignore[misc]
    assert event.sampling_method is SamplingMethod.POISSON
    assert hash(event) == hash(DpSgdEvent(noise_multiplier=1.0, sample_rate=0.1, steps=3))


def test_event_round_trip() -> None:
    for event in (
        DpSgdEvent(noise_multiplier=1.0, sample_rate=0.1, steps=3, sampling_method="client_chosen_batches"),
        UnsupportedEvent(description="eval on train"),
    ):
        assert event_from_dict(event.to_dict()) == event


@pytest.mark.parametrize(
    "data",
    [
        None,
        [],
        {"event": "laplace"},
        {"event": "dp_sgd", "noise_multiplier": 1.0},
        {"event": "dp_sgd", "noise_multiplier": 1.0, "sample_rate": 0.1, "steps": 1, "sampling_method": "x"},
        {
            "event": "dp_sgd",
            "noise_multiplier": 1.0,
            "sample_rate": 2,
            "steps": 1,
            "sampling_method": "poisson",
        },
        {"event": "unsupported", "description": 3},
    ],
)
def test_event_from_dict_rejects(data: object) -> None:
    with pytest.raises(PrivacyConfigError):
        event_from_dict(data)


@pytest.mark.parametrize(
    ("field", "value", "message"),
    [
        ("sample_rate", 0.0, r"sample_rate must be in \(0, 1\], got 0"),
        ("sample_rate", 1.5, r"sample_rate must be in \(0, 1\], got 1.5"),
        ("sample_rate", -0.1, "sample_rate must be in"),
        ("sample_rate", math.nan, "sample_rate must be finite"),
        ("noise_multiplier", 0.0, "noise_multiplier must be > 0, got 0"),
        ("noise_multiplier", -1.0, "noise_multiplier must be > 0"),
        ("noise_multiplier", math.inf, "noise_multiplier must be finite"),
        ("noise_multiplier", "1.0", "noise_multiplier must be a number"),
        ("steps", -1, "steps must be >= 0, got -1"),
        ("steps", 2.5, "steps must be an integer"),
        ("steps", True, "steps must be an integer"),
        ("delta", 0.0, r"delta must be in \(0, 1\)"),
        ("delta", 1.0, r"delta must be in \(0, 1\)"),
        ("delta", 2.0, r"delta must be in \(0, 1\)"),
    ],
)
def test_compute_epsilon_validation(field: str, value: object, message: str) -> None:
    with pytest.raises(PrivacyConfigError, match=message) as info:
        compute_epsilon(**{**GOOD, field: value})  # type: ignore[arg-type]
    assert "\n" not in str(info.value)


def test_compute_epsilon_is_keyword_only() -> None:
    with pytest.raises(TypeError):
        compute_epsilon("rdp", 1.0, 0.01, 10, 1e-5)  # type: ignore[misc]


def test_zero_steps_spend_nothing() -> None:
    for name in available_accountants():
        assert compute_epsilon(**{**GOOD, "accountant": name, "steps": 0}) == 0.0


def test_validate_delta() -> None:
    assert validate_delta(1e-5, 60000) == 1e-5
    with pytest.raises(PrivacyConfigError, match=r"delta=0.001 is not below 1/N=0.001 for N=1000"):
        validate_delta(1e-3, 1000)
    with pytest.raises(PrivacyConfigError, match="not below 1/N"):
        validate_delta(0.5, 10)
    with pytest.raises(PrivacyConfigError, match="dataset_size must be a positive integer"):
        validate_delta(1e-5, 0)
    with pytest.raises(PrivacyConfigError, match="dataset_size must be a positive integer"):
        validate_delta(1e-5, True)  # type: ignore[arg-type]
    with pytest.raises(PrivacyConfigError, match="delta must be in"):
        validate_delta(0.0, 10)
