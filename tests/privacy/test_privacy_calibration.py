"""Noise calibration: round trips, the ε <= target guarantee, unreachable targets."""

from __future__ import annotations

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from tensafe.privacy import (
    PrivacyConfigError,
    UnreachableBudgetError,
    calibrate_noise,
    compute_epsilon,
)
from tensafe.privacy.calibration import MIN_NOISE_MULTIPLIER


@pytest.mark.slow
@settings(max_examples=25, deadline=None)
@given(
    target=st.floats(min_value=0.5, max_value=20.0),
    q=st.floats(min_value=1e-3, max_value=0.1),
    steps=st.integers(min_value=10, max_value=5000),
    delta=st.sampled_from([1e-4, 1e-5, 1e-6, 1e-8]),
)
def test_rdp_round_trip(target: float, q: float, steps: int, delta: float) -> None:
    common = {"delta": delta, "sample_rate": q, "steps": steps, "accountant": "rdp"}
    sigma = calibrate_noise(target_epsilon=target, **common)
    eps = compute_epsilon(noise_multiplier=sigma, **common)
    assert eps <= target
    if sigma > MIN_NOISE_MULTIPLIER:
        # Within tolerance of the target, and any noticeably smaller σ would overspend.
        assert eps >= target * (1 - 1e-3)
        assert compute_epsilon(noise_multiplier=sigma * 0.99, **common) > target


@pytest.mark.slow
@settings(max_examples=10, deadline=None)
@given(
    target=st.floats(min_value=0.5, max_value=10.0),
    q=st.floats(min_value=1e-3, max_value=0.1),
    steps=st.integers(min_value=10, max_value=3000),
)
def test_moments_needs_more_noise_than_rdp(target: float, q: float, steps: int) -> None:
    common = {"target_epsilon": target, "delta": 1e-5, "sample_rate": q, "steps": steps}
    assert calibrate_noise(accountant="moments", **common) >= calibrate_noise(accountant="rdp", **common)


@pytest.mark.parametrize("accountant", ["pld", "prv"])
def test_numerical_accountants_round_trip(accountant: str) -> None:
    common = {"delta": 1e-5, "sample_rate": 0.01, "steps": 500, "accountant": accountant}
    sigma = calibrate_noise(target_epsilon=2.0, tolerance=1e-2, **common)
    eps = compute_epsilon(noise_multiplier=sigma, **common)
    assert 2.0 * (1 - 1e-2) <= eps <= 2.0
    # Tighter accountants need less noise than RDP for the same target.
    assert sigma < calibrate_noise(target_epsilon=2.0, tolerance=1e-2, **{**common, "accountant": "rdp"})


def test_opacus_published_calibration() -> None:
    """Opacus' test_get_noise_multiplier_rdp_epochs: ε=8, δ=1e-5, q=0.04, 90 epochs -> σ≈1.416."""
    sigma = calibrate_noise(
        target_epsilon=8.0, delta=1e-5, sample_rate=0.04, steps=int(90 / 0.04), accountant="rdp"
    )
    assert sigma == pytest.approx(1.416, abs=5e-3)


def test_unreachable_target_is_explained() -> None:
    with pytest.raises(UnreachableBudgetError, match=r"target ε=0.001 at δ=1e-05 is unreachable") as info:
        calibrate_noise(target_epsilon=1e-3, delta=1e-5, sample_rate=0.5, steps=10000, accountant="rdp")
    assert "noise_multiplier=10000" in str(info.value)
    assert "\n" not in str(info.value)


def test_generous_target_returns_floor() -> None:
    sigma = calibrate_noise(target_epsilon=1e6, delta=1e-5, sample_rate=0.01, steps=1, accountant="rdp")
    assert sigma == MIN_NOISE_MULTIPLIER


@pytest.mark.parametrize(
    ("kwargs", "message"),
    [
        ({"target_epsilon": 0.0}, "target_epsilon must be > 0"),
        ({"target_epsilon": -1.0}, "target_epsilon must be > 0"),
        ({"steps": 0}, "steps must be >= 1 to calibrate"),
        ({"tolerance": 0.0}, r"tolerance must be in \(0, 1\)"),
        ({"tolerance": 1.0}, r"tolerance must be in \(0, 1\)"),
        ({"accountant": "nope"}, "unknown accountant"),
        ({"sample_rate": 0.0}, "sample_rate"),
        ({"delta": 1.0}, "delta"),
    ],
)
def test_calibration_validation(kwargs: dict[str, object], message: str) -> None:
    base: dict[str, object] = {
        "target_epsilon": 1.0,
        "delta": 1e-5,
        "sample_rate": 0.01,
        "steps": 100,
        "accountant": "rdp",
    }
    with pytest.raises(PrivacyConfigError, match=message):
        calibrate_noise(**{**base, **kwargs})  # type: ignore[arg-type]
