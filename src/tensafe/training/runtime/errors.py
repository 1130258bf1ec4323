"""Errors raised by the training runtime.

Every class derives from :class:`TrainingRuntimeError` (a
:class:`tensafe.training.errors.TrainingError`) except the budget refusal, which is
:class:`tensafe.privacy.BudgetExceededError` so that every layer reports an exhausted budget
the same way. :data:`USER_ERRORS` lists the exceptions that a request caused (the server
fails the future with category ``user``); anything else is a server fault.
"""

from __future__ import annotations

from tensafe.privacy import BudgetExceededError
from tensafe.training.errors import TrainingError

__all__ = [
    "USER_ERRORS",
    "BudgetExceededError",
    "DpPolicyError",
    "InvalidRequestError",
    "PolicyLoosenedError",
    "SessionStateError",
    "StateFormatError",
    "StepLimitError",
    "TrainingRuntimeError",
]


class TrainingRuntimeError(TrainingError):
    """Root of the errors raised by :mod:`tensafe.training.runtime`."""


class InvalidRequestError(TrainingRuntimeError, ValueError):
    """A request is malformed: unknown loss, bad tensor shape, token out of range, bad sampling knob."""

    exit_code = 2


class DpPolicyError(InvalidRequestError):
    """A differential-privacy policy is invalid or inconsistent."""


class PolicyLoosenedError(DpPolicyError):
    """A requested policy change would weaken the privacy policy; only tightening is allowed."""


class SessionStateError(TrainingRuntimeError):
    """An operation is not allowed in the session's current state (mode or order)."""

    exit_code = 2


class StepLimitError(TrainingRuntimeError):
    """The policy's ``max_steps`` has been reached; no further optimizer step is allowed."""

    exit_code = 2


class StateFormatError(TrainingRuntimeError, ValueError):
    """Serialized session state is malformed, of an unknown version, or for another base model."""

    exit_code = 2


#: Exceptions caused by the request itself (map them to a user error, never a 5xx).
USER_ERRORS: tuple[type[Exception], ...] = (
    InvalidRequestError,
    SessionStateError,
    StepLimitError,
    StateFormatError,
    BudgetExceededError,
)
