"""Rényi DP of Poisson-subsampled Gaussian DP-SGD, computed by ``dp_accounting``.

The RDP curve comes from ``dp_accounting.rdp.RdpAccountant`` composing
``PoissonSampledDpEvent(q, GaussianDpEvent(σ))`` events (add/remove-one neighbours).
Two conversions to (ε, δ) are offered:

* :func:`epsilon_tight` calls ``dp_accounting.rdp.rdp_privacy_accountant.compute_epsilon``,
  which uses ε = min_α [RDP(α) + log(1 - 1/α) - log(δ·α)/(α - 1)] (Balle et al. 2020,
  Proposition 12; Canonne et al. 2020). Opacus 1.x and TF Privacy since 2020 report this.
* :func:`epsilon_classic` uses ε = min_α [RDP(α) + log(1/δ)/(α - 1)] (Mironov 2017,
  Proposition 3), the conversion of the original moments accountant of Abadi et al.
  2016 and of TF Privacy before 2020. ``dp_accounting`` 0.6 no longer exposes it, so it
  is the one formula written here; it is looser (larger ε) and kept only so that legacy
  numbers can be reproduced (pinned against TF Privacy's published values in the tests).
"""

from __future__ import annotations

import math
from collections.abc import Sequence

import dp_accounting
import numpy as np
from dp_accounting.rdp import rdp_privacy_accountant as _rdp

from tensafe.privacy.analysis import Composition

__all__ = ["DEFAULT_ORDERS", "epsilon_classic", "epsilon_tight", "rdp_curve", "to_dp_event"]

#: The RDP orders α Opacus uses (``opacus.accountants.RDPAccountant.DEFAULT_ALPHAS``).
DEFAULT_ORDERS: tuple[float, ...] = tuple([1 + x / 10.0 for x in range(1, 100)] + list(range(12, 64)))


def to_dp_event(compositions: Sequence[Composition]) -> dp_accounting.DpEvent:
    """Return the ``dp_accounting`` event for a sequence of Poisson-subsampled Gaussian runs."""
    return dp_accounting.ComposedDpEvent(
        [
            dp_accounting.SelfComposedDpEvent(
                dp_accounting.PoissonSampledDpEvent(q, dp_accounting.GaussianDpEvent(sigma)), steps
            )
            for sigma, q, steps in compositions
        ]
    )


def rdp_curve(compositions: Sequence[Composition], orders: Sequence[float] = DEFAULT_ORDERS) -> np.ndarray:
    """Return the composed RDP ε(α) at each order, from ``dp_accounting``."""
    accountant = _rdp.RdpAccountant(
        orders=list(orders), neighboring_relation=dp_accounting.NeighboringRelation.ADD_OR_REMOVE_ONE
    )
    accountant.compose(to_dp_event(compositions))
    curve: np.ndarray = accountant.rdp
    return curve


def epsilon_tight(
    compositions: Sequence[Composition], delta: float, orders: Sequence[float] = DEFAULT_ORDERS
) -> tuple[float, float]:
    """Return ``(ε, optimal α)`` with the tight RDP-to-DP conversion of ``dp_accounting``."""
    eps, order = _rdp.compute_epsilon(list(orders), rdp_curve(compositions, orders), delta)
    return float(eps), float(order)


def epsilon_classic(
    compositions: Sequence[Composition], delta: float, orders: Sequence[float] = DEFAULT_ORDERS
) -> tuple[float, float]:
    """Return ``(ε, optimal α)`` with the classic conversion ε = min_α RDP(α) + log(1/δ)/(α - 1)."""
    alphas = np.asarray(orders, dtype=np.float64)
    eps = rdp_curve(compositions, orders) + math.log(1.0 / delta) / (alphas - 1.0)
    best = int(np.nanargmin(eps))
    return max(0.0, float(eps[best])), float(alphas[best])
