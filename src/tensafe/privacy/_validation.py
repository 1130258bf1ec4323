"""Range checks shared by every public entry point of :mod:`tensafe.privacy`.

Each check raises :class:`~tensafe.privacy.errors.PrivacyConfigError` with a one-line
message that names the parameter, the bad value and the accepted range. ``bool`` is
rejected where a number is expected (``True`` is an ``int`` in Python), and NaN or
infinity never pass.
"""

from __future__ import annotations

import math
import numbers

from tensafe.privacy.errors import PrivacyConfigError

__all__ = [
    "check_delta",
    "check_noise_multiplier",
    "check_sample_rate",
    "check_steps",
    "check_target_epsilon",
    "validate_delta",
]


def _real(name: str, value: object) -> float:
    if isinstance(value, bool) or not isinstance(value, numbers.Real):
        raise PrivacyConfigError(f"{name} must be a number, got {value!r}")
    result = float(value)
    if not math.isfinite(result):
        raise PrivacyConfigError(f"{name} must be finite, got {value!r}")
    return result


def check_noise_multiplier(value: object) -> float:
    """Return σ as a float, or raise unless it is finite and strictly positive."""
    sigma = _real("noise_multiplier", value)
    if sigma <= 0.0:
        raise PrivacyConfigError(f"noise_multiplier must be > 0, got {sigma:g}")
    return sigma


def check_sample_rate(value: object) -> float:
    """Return q as a float, or raise unless 0 < q <= 1."""
    q = _real("sample_rate", value)
    if not 0.0 < q <= 1.0:
        raise PrivacyConfigError(f"sample_rate must be in (0, 1], got {q:g}")
    return q


def check_steps(value: object) -> int:
    """Return the step count, or raise unless it is an integer >= 0."""
    if isinstance(value, bool) or not isinstance(value, numbers.Integral):
        raise PrivacyConfigError(f"steps must be an integer, got {value!r}")
    steps = int(value)
    if steps < 0:
        raise PrivacyConfigError(f"steps must be >= 0, got {steps}")
    return steps


def check_delta(value: object) -> float:
    """Return δ as a float, or raise unless 0 < δ < 1."""
    delta = _real("delta", value)
    if not 0.0 < delta < 1.0:
        raise PrivacyConfigError(f"delta must be in (0, 1), got {delta:g}")
    return delta


def check_target_epsilon(value: object) -> float:
    """Return the target ε, or raise unless it is finite and strictly positive."""
    eps = _real("target_epsilon", value)
    if eps <= 0.0:
        raise PrivacyConfigError(f"target_epsilon must be > 0, got {eps:g}")
    return eps


def validate_delta(delta: float, dataset_size: int) -> float:
    """Check that δ is meaningful for a data set of ``dataset_size`` examples.

    A mechanism that publishes one whole random record satisfies (0, 1/N)-DP, so a
    guarantee with δ >= 1/N says nothing useful. TenSafe refuses such a δ; the usual
    choice is δ <= 1/(10·N) or smaller.

    Args:
        delta: The δ the run will report.
        dataset_size: N, the number of training examples (privacy units).

    Returns:
        ``delta`` as a float.

    Raises:
        PrivacyConfigError: If δ is outside (0, 1), N is not a positive integer, or
            δ >= 1/N.
    """
    d = check_delta(delta)
    if isinstance(dataset_size, bool) or not isinstance(dataset_size, numbers.Integral) or dataset_size < 1:
        raise PrivacyConfigError(f"dataset_size must be a positive integer, got {dataset_size!r}")
    n = int(dataset_size)
    if d >= 1.0 / n:
        raise PrivacyConfigError(
            f"delta={d:g} is not below 1/N={1.0 / n:g} for N={n} examples: such a δ allows "
            f"publishing whole records; use delta <= {1.0 / (10 * n):.1e} (1/(10·N)) or smaller"
        )
    return d
