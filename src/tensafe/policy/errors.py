"""The exception tree of :mod:`tensafe.policy`."""

from __future__ import annotations

from tensafe.errors import TenSafeError

__all__ = ["PolicyError", "PolicyEvaluationError", "PolicyLoadError"]


class PolicyError(TenSafeError):
    """Root of the policy error tree."""


class PolicyLoadError(PolicyError):
    """A policy file is missing, unreadable, not UTF-8, not valid Rego, or in the wrong package."""

    exit_code = 2


class PolicyEvaluationError(PolicyError):
    """A policy failed to evaluate, or its decision rule is missing or of the wrong shape.

    Policies fail closed: a policy that cannot produce a decision is an error, never "allow".
    """
