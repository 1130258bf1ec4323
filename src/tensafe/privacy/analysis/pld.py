"""Privacy loss distribution accounting of DP-SGD, computed by ``dp_accounting.pld``."""

from __future__ import annotations

from collections.abc import Sequence

import dp_accounting
from dp_accounting.pld import pld_privacy_accountant as _pld

from tensafe.privacy.analysis import Composition
from tensafe.privacy.analysis.rdp import to_dp_event

__all__ = ["DEFAULT_VALUE_DISCRETIZATION_INTERVAL", "epsilon_pld"]

#: ``dp_accounting``'s default grid step of the privacy-loss values (pessimistic rounding).
DEFAULT_VALUE_DISCRETIZATION_INTERVAL = 1e-4


def epsilon_pld(
    compositions: Sequence[Composition],
    delta: float,
    value_discretization_interval: float = DEFAULT_VALUE_DISCRETIZATION_INTERVAL,
) -> float:
    """Return ε at δ from ``dp_accounting.pld.PLDAccountant`` (pessimistic discretisation)."""
    accountant = _pld.PLDAccountant(
        neighboring_relation=dp_accounting.NeighboringRelation.ADD_OR_REMOVE_ONE,
        value_discretization_interval=value_discretization_interval,
    )
    accountant.compose(to_dp_event(compositions))
    return max(0.0, float(accountant.get_epsilon(delta)))
