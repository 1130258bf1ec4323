"""Declarative policy evaluation (Rego via ``regorus``).

The public surface is :class:`Policy` (compile once, evaluate many times) and the error tree
rooted at :class:`PolicyError`. Domain packages (TSSP, key release) decide the Rego package
and the shape of the input document; this module only evaluates deny sets and fails closed.
"""

from __future__ import annotations

from tensafe.policy.errors import PolicyError, PolicyEvaluationError, PolicyLoadError
from tensafe.policy.rego import MAX_POLICY_BYTES, Policy

__all__ = [
    "MAX_POLICY_BYTES",
    "Policy",
    "PolicyError",
    "PolicyEvaluationError",
    "PolicyLoadError",
]
