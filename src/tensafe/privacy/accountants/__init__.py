"""Stateful privacy accountants over immutable spending records.

The pure maths lives in :mod:`tensafe.privacy.analysis`; the classes here hold a
history of :class:`~tensafe.privacy.events.DpEvent` records and are looked up by name
in a registry, as in ``opacus.accountants``.
"""

from __future__ import annotations

from tensafe.privacy.accountants.base import Accountant, EpsilonReport
from tensafe.privacy.accountants.builtin import MomentsAccountant, PldAccountant, PrvAccountant, RdpAccountant
from tensafe.privacy.accountants.registry import (
    DEFAULT_ACCOUNTANT,
    available_accountants,
    create_accountant,
    get_accountant_class,
    register_accountant,
)

__all__ = [
    "DEFAULT_ACCOUNTANT",
    "Accountant",
    "EpsilonReport",
    "MomentsAccountant",
    "PldAccountant",
    "PrvAccountant",
    "RdpAccountant",
    "available_accountants",
    "create_accountant",
    "get_accountant_class",
    "register_accountant",
]
