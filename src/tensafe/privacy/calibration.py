"""One-shot ε computation and noise calibration for Poisson-sampled DP-SGD."""

from __future__ import annotations

import math

from tensafe.privacy._validation import (
    check_delta,
    check_noise_multiplier,
    check_sample_rate,
    check_steps,
    check_target_epsilon,
)
from tensafe.privacy.accountants.base import EpsilonReport
from tensafe.privacy.accountants.registry import create_accountant, get_accountant_class
from tensafe.privacy.errors import PrivacyConfigError, UnreachableBudgetError
from tensafe.privacy.events import DpSgdEvent, SamplingMethod

__all__ = [
    "MAX_NOISE_MULTIPLIER",
    "MIN_NOISE_MULTIPLIER",
    "calibrate_noise",
    "compute_epsilon",
    "epsilon_report",
]

#: The largest σ :func:`calibrate_noise` tries before declaring a target unreachable.
MAX_NOISE_MULTIPLIER = 1e4
#: The smallest σ :func:`calibrate_noise` returns, however generous the target.
MIN_NOISE_MULTIPLIER = 0.05
_MAX_ITERATIONS = 200


def epsilon_report(
    *, accountant: str, noise_multiplier: float, sample_rate: float, steps: int, delta: float
) -> EpsilonReport:
    """Return ε and accountant details for ``steps`` Poisson-sampled DP-SGD steps.

    Args:
        accountant: A registered accountant name (``rdp``, ``moments``, ``pld``, ``prv``).
        noise_multiplier: σ > 0.
        sample_rate: q in (0, 1].
        steps: T >= 0.
        delta: δ in (0, 1).

    Raises:
        PrivacyConfigError: If any argument is out of range or the accountant is unknown.
    """
    cls = get_accountant_class(accountant)
    event = DpSgdEvent(
        noise_multiplier=check_noise_multiplier(noise_multiplier),
        sample_rate=check_sample_rate(sample_rate),
        steps=check_steps(steps),
        sampling_method=SamplingMethod.POISSON,
    )
    return cls().compose(event).get_report(check_delta(delta))


def compute_epsilon(
    *, accountant: str, noise_multiplier: float, sample_rate: float, steps: int, delta: float
) -> float:
    """Return ε at δ after ``steps`` Poisson-sampled DP-SGD steps with σ and q.

    For ``prv`` this is the accountant's upper bound. Results are cached, so repeated
    calls with the same arguments are cheap.

    Raises:
        PrivacyConfigError: If any argument is out of range or the accountant is unknown.
    """
    return epsilon_report(
        accountant=accountant,
        noise_multiplier=noise_multiplier,
        sample_rate=sample_rate,
        steps=steps,
        delta=delta,
    ).epsilon


def calibrate_noise(
    *,
    target_epsilon: float,
    delta: float,
    sample_rate: float,
    steps: int,
    accountant: str,
    tolerance: float = 1e-3,
) -> float:
    """Return the smallest σ (within ``tolerance``) whose ε after ``steps`` is at most the target.

    Bisection on :func:`compute_epsilon`, which decreases as σ grows. The result always
    satisfies ``compute_epsilon(σ) <= target_epsilon``; the search stops once
    ``compute_epsilon(σ) >= target_epsilon · (1 - tolerance)``, or when σ is pinned
    to 1e-9 relative precision. σ is never below :data:`MIN_NOISE_MULTIPLIER`.

    Args:
        target_epsilon: ε budget, > 0.
        delta: δ in (0, 1).
        sample_rate: q in (0, 1].
        steps: T >= 1.
        accountant: A registered accountant name.
        tolerance: Relative slack below the target that is accepted, in (0, 1).

    Raises:
        PrivacyConfigError: If an argument is out of range.
        UnreachableBudgetError: If even σ = :data:`MAX_NOISE_MULTIPLIER` exceeds the target.
    """
    target = check_target_epsilon(target_epsilon)
    d = check_delta(delta)
    q = check_sample_rate(sample_rate)
    t = check_steps(steps)
    get_accountant_class(accountant)
    if t < 1:
        raise PrivacyConfigError("steps must be >= 1 to calibrate noise (0 steps spend no privacy)")
    if isinstance(tolerance, bool) or not isinstance(tolerance, int | float) or not 0.0 < tolerance < 1.0:
        raise PrivacyConfigError(f"tolerance must be in (0, 1), got {tolerance!r}")

    def eps(sigma: float) -> float:
        event = DpSgdEvent(noise_multiplier=sigma, sample_rate=q, steps=t)
        return create_accountant(accountant).compose(event).get_epsilon(d)

    # Bracket: eps(lo) > target >= eps(hi).
    hi = 1.0
    while eps(hi) > target:
        if hi >= MAX_NOISE_MULTIPLIER:
            raise UnreachableBudgetError(
                f"target ε={target:g} at δ={d:g} is unreachable with the {accountant} accountant: even "
                f"noise_multiplier={MAX_NOISE_MULTIPLIER:g} gives ε={eps(hi):.4g} after {t} steps at "
                f"sample_rate={q:g}; raise the target or δ, or use fewer steps or a smaller sample rate"
            )
        hi = min(hi * 2.0, MAX_NOISE_MULTIPLIER)
    lo = hi / 2.0
    while eps(lo) <= target:
        if lo <= MIN_NOISE_MULTIPLIER:
            return MIN_NOISE_MULTIPLIER
        hi = lo
        lo = max(lo / 2.0, MIN_NOISE_MULTIPLIER)
    # Safeguarded false position (Illinois variant) on log ε against log σ, which is
    # close to linear, so a handful of accountant queries suffice; a bisection step is
    # taken whenever the interpolation is unusable. The bracket invariant holds
    # throughout, so the returned ``hi`` always satisfies ε(hi) <= target.
    log_target = math.log(target)
    f_lo = math.log(eps(lo)) - log_target
    e_hi = eps(hi)
    f_hi = math.log(e_hi) - log_target if e_hi > 0.0 else -math.inf
    side = 0
    for _ in range(_MAX_ITERATIONS):
        if eps(hi) >= target * (1.0 - tolerance) or (hi - lo) <= 1e-9 * hi:
            break
        x_lo, x_hi = math.log(lo), math.log(hi)
        if math.isfinite(f_hi) and f_lo > f_hi:
            x = x_hi - f_hi * (x_hi - x_lo) / (f_hi - f_lo)
            width = x_hi - x_lo
            x = min(max(x, x_lo + 1e-3 * width), x_hi - 1e-3 * width)
        else:
            x = (x_lo + x_hi) / 2.0
        mid = math.exp(x)
        e_mid = eps(mid)
        f_mid = math.log(e_mid) - log_target if e_mid > 0.0 else -math.inf
        if e_mid > target:
            lo, f_lo = mid, f_mid
            if side == -1:
                f_hi /= 2.0  # Illinois: halve the stale end so it cannot stall.
            side = -1
        else:
            hi, f_hi = mid, f_mid
            if side == 1:
                f_lo /= 2.0
            side = 1
    return hi
