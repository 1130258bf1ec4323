"""DpPolicy: validation, tightening and combination (pure, no model)."""

from __future__ import annotations

import dataclasses
from typing import Any

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from tensafe.privacy import DpPolicy, DpPolicyError, PolicyLoosenedError


def _base(**overrides: Any) -> DpPolicy:
    values: dict[str, Any] = {
        "target_epsilon": 4.0,
        "delta": 1e-6,
        "clip_norm": 1.0,
        "accountant": "rdp",
        "noise_multiplier": 1.0,
        "dataset_size": 10_000,
        "expected_batch_size": 64,
        "max_steps": 1000,
    }
    values.update(overrides)
    return DpPolicy(**values)


@pytest.mark.parametrize(
    ("overrides", "message"),
    [
        ({"target_epsilon": 0.0}, "target_epsilon"),
        ({"target_epsilon": float("inf")}, "target_epsilon"),
        ({"delta": 1.0}, "delta"),
        ({"delta": 1e-3}, "δ"),  # delta >= 1/N is refused by tensafe.privacy
        ({"clip_norm": -1.0}, "clip_norm"),
        ({"accountant": "magic"}, "accountant"),
        ({"noise_multiplier": 0.0}, "noise_multiplier"),
        ({"sampling": "whatever"}, "sampling"),
        ({"expected_batch_size": 0}, "expected_batch_size"),
        ({"expected_batch_size": 20_000}, "exceeds dataset_size"),
        ({"dataset_size": None}, "needs dataset_size"),
        ({"noise_multiplier": None, "max_steps": None}, "max_steps"),
        ({"max_steps": True}, "max_steps"),
    ],
)
def test_invalid_policies_are_refused(overrides: dict[str, Any], message: str) -> None:
    with pytest.raises(DpPolicyError, match=message):
        _base(**overrides)


def test_policy_is_frozen_and_keyword_only() -> None:
    p = _base()
    with pytest.raises(dataclasses.FrozenInstanceError):
        p.target_epsilon = 100.0  # type: ignore[misc]
    with pytest.raises(TypeError):
        DpPolicy(4.0, 1e-6, 1.0)  # type: ignore[misc]


def test_server_poisson_does_not_need_a_dataset_size() -> None:
    p = _base(sampling="server_poisson", dataset_size=None)
    assert p.dataset_size is None
    assert p.sample_rate(1000) == pytest.approx(0.064)
    with pytest.raises(DpPolicyError, match="registered"):
        p.sample_rate()


def test_round_trip_and_unknown_fields() -> None:
    p = _base(sampling="server_poisson")
    assert DpPolicy.from_dict(p.to_dict()) == p
    with pytest.raises(DpPolicyError, match="unknown DP policy field"):
        DpPolicy.from_dict({**p.to_dict(), "secure_rng": False})
    with pytest.raises(DpPolicyError):
        DpPolicy.from_dict({"target_epsilon": 1.0})


@pytest.mark.parametrize(
    ("change", "field"),
    [
        ({"target_epsilon": 8.0}, "target_epsilon"),
        ({"delta": 1e-5}, "delta"),
        ({"clip_norm": 2.0}, "clip_norm"),
        ({"noise_multiplier": 0.5}, "noise_multiplier"),
        ({"noise_multiplier": None}, "noise_multiplier"),
        ({"dataset_size": 100_000}, "dataset_size"),
        ({"expected_batch_size": 128}, "expected_batch_size"),
        ({"max_steps": 2000}, "max_steps"),
        ({"max_steps": None}, "max_steps"),
        ({"accountant": "pld"}, "accountant"),
    ],
)
def test_tighten_refuses_loosening(change: dict[str, Any], field: str) -> None:
    with pytest.raises(PolicyLoosenedError, match=field):
        _base().tighten(**change)


def test_tighten_accepts_stricter_values_and_refuses_leaving_server_poisson() -> None:
    base = _base()
    tighter = base.tighten(target_epsilon=2.0, noise_multiplier=1.5, max_steps=10, sampling="server_poisson")
    assert tighter.target_epsilon == 2.0 and tighter.sampling == "server_poisson"
    with pytest.raises(PolicyLoosenedError, match="sampling"):
        tighter.tighten(sampling="client_chosen_batches")
    with pytest.raises(DpPolicyError, match="unknown DP policy field"):
        base.tighten(epsilon=1.0)
    # A calibrated policy (noise_multiplier None) may be given an explicit σ: the ε cap still holds.
    calibrated = _base(noise_multiplier=None)
    assert calibrated.tighten(noise_multiplier=0.3).noise_multiplier == 0.3


def test_stricter_of_takes_the_stricter_field_each() -> None:
    a = _base(target_epsilon=3.0, clip_norm=2.0, noise_multiplier=None, max_steps=500, expected_batch_size=32)
    b = _base(target_epsilon=5.0, clip_norm=0.5, noise_multiplier=1.2, sampling="server_poisson")
    c = DpPolicy.stricter_of(a, b)
    assert (c.target_epsilon, c.clip_norm, c.noise_multiplier, c.max_steps) == (3.0, 0.5, 1.2, 500)
    assert c.expected_batch_size == 32 and c.sampling == "server_poisson"
    assert c.is_at_least_as_strict_as(a) and c.is_at_least_as_strict_as(b)
    with pytest.raises(PolicyLoosenedError, match="accountants"):
        DpPolicy.stricter_of(a, _base(accountant="pld"))


_policies = st.builds(
    _base,
    target_epsilon=st.floats(0.1, 20),
    delta=st.sampled_from([1e-7, 1e-8, 1e-9]),
    clip_norm=st.floats(0.01, 10),
    noise_multiplier=st.one_of(st.none(), st.floats(0.3, 5)),
    dataset_size=st.integers(20_000, 10**6),
    expected_batch_size=st.integers(1, 1000),
    max_steps=st.integers(1, 10**5),
    sampling=st.sampled_from(["client_chosen_batches", "server_poisson"]),
)


@settings(max_examples=200, deadline=None)
@given(a=_policies, b=_policies)
def test_stricter_of_is_at_least_as_strict_as_both(a: DpPolicy, b: DpPolicy) -> None:
    c = DpPolicy.stricter_of(a, b)
    assert c.is_at_least_as_strict_as(a)
    assert c.is_at_least_as_strict_as(b)
    assert DpPolicy.stricter_of(b, a) == c
    # tightening a base to the combination is always accepted
    assert a.tighten(**c.to_dict()) == c
