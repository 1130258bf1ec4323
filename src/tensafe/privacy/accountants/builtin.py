"""The built-in accountants: ``rdp``, ``moments``, ``pld`` and ``prv``."""

from __future__ import annotations

from typing import ClassVar

from tensafe.privacy.accountants.base import Accountant, EpsilonReport
from tensafe.privacy.analysis import Composition
from tensafe.privacy.analysis import pld as _pld
from tensafe.privacy.analysis import prv as _prv
from tensafe.privacy.analysis import rdp as _rdp

__all__ = ["MomentsAccountant", "PldAccountant", "PrvAccountant", "RdpAccountant"]


class RdpAccountant(Accountant):
    """Rényi DP with the tight conversion (``dp_accounting``, Opacus' α grid).

    Matches ``opacus.accountants.RDPAccountant`` and current TF Privacy. The default.
    """

    name: ClassVar[str] = "rdp"
    title: ClassVar[str] = "RDP accountant"

    @classmethod
    def _compute(cls, compositions: tuple[Composition, ...], delta: float) -> EpsilonReport:
        eps, order = _rdp.epsilon_tight(compositions, delta)
        return EpsilonReport(epsilon=eps, delta=delta, accountant=cls.name, details={"optimal_order": order})


class MomentsAccountant(Accountant):
    """The legacy moments accountant: the same RDP curve, classic (looser) conversion.

    Reproduces Abadi et al. 2016 and TF Privacy before 2020; for comparison with old
    results only, since its ε is always at least the ``rdp`` one.
    """

    name: ClassVar[str] = "moments"
    title: ClassVar[str] = "moments accountant"

    @classmethod
    def _compute(cls, compositions: tuple[Composition, ...], delta: float) -> EpsilonReport:
        eps, order = _rdp.epsilon_classic(compositions, delta)
        return EpsilonReport(epsilon=eps, delta=delta, accountant=cls.name, details={"optimal_order": order})


class PldAccountant(Accountant):
    """Privacy loss distributions (``dp_accounting.pld``); near-tight, ~0.1-0.5 s per query."""

    name: ClassVar[str] = "pld"
    title: ClassVar[str] = "PLD accountant"

    @classmethod
    def _compute(cls, compositions: tuple[Composition, ...], delta: float) -> EpsilonReport:
        eps = _pld.epsilon_pld(compositions, delta)
        return EpsilonReport(epsilon=eps, delta=delta, accountant=cls.name)


class PrvAccountant(Accountant):
    """Privacy random variables (``prv_accountant``); reports the upper bound on ε."""

    name: ClassVar[str] = "prv"
    title: ClassVar[str] = "PRV accountant"

    @classmethod
    def _compute(cls, compositions: tuple[Composition, ...], delta: float) -> EpsilonReport:
        bounds = _prv.epsilon_prv(compositions, delta)
        return EpsilonReport(
            epsilon=bounds.upper,
            delta=delta,
            accountant=cls.name,
            details={
                "epsilon_lower": bounds.lower,
                "epsilon_estimate": bounds.estimate,
                "epsilon_upper": bounds.upper,
                "eps_error": _prv.DEFAULT_EPS_ERROR,
            },
        )
