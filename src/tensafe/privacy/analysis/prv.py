"""Privacy random variable accounting of DP-SGD, computed by ``prv_accountant``.

``prv_accountant.PRVAccountant`` returns a lower bound, an estimate and an upper bound
of ε; the true ε lies in ``[lower, upper]`` and ``upper - estimate <= eps_error``.
TenSafe reports the upper bound as *the* ε (a guarantee, not an estimate), exactly as
``opacus.accountants.PRVAccountant`` does, and with Opacus' error settings
(``eps_error = 0.01``, ``delta_error = δ/1000``) so that the numbers agree with it.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

from prv_accountant import PoissonSubsampledGaussianMechanism, PRVAccountant

from tensafe.privacy.analysis import Composition

__all__ = ["DEFAULT_EPS_ERROR", "DELTA_ERROR_FRACTION", "PrvEpsilon", "epsilon_prv"]

#: Absolute error allowed in ε (Opacus' default).
DEFAULT_EPS_ERROR = 0.01
#: ``delta_error = δ · DELTA_ERROR_FRACTION`` (Opacus' default).
DELTA_ERROR_FRACTION = 1e-3


@dataclass(frozen=True)
class PrvEpsilon:
    """Bounds on ε from the PRV accountant (all clamped at 0)."""

    lower: float
    estimate: float
    upper: float


def epsilon_prv(
    compositions: Sequence[Composition], delta: float, eps_error: float = DEFAULT_EPS_ERROR
) -> PrvEpsilon:
    """Return the PRV accountant's ``(lower, estimate, upper)`` ε at δ."""
    prvs = [
        PoissonSubsampledGaussianMechanism(sampling_probability=q, noise_multiplier=sigma)
        for sigma, q, _ in compositions
    ]
    counts = [steps for _, _, steps in compositions]
    accountant = PRVAccountant(
        prvs=prvs,
        max_self_compositions=counts,
        eps_error=eps_error,
        delta_error=delta * DELTA_ERROR_FRACTION,
    )
    lower, estimate, upper = accountant.compute_epsilon(delta=delta, num_self_compositions=counts)
    return PrvEpsilon(
        lower=max(0.0, float(lower)), estimate=max(0.0, float(estimate)), upper=max(0.0, float(upper))
    )
