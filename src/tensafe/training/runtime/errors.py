"""Errors raised by the training runtime.

Every class derives from :class:`TrainingRuntimeError` (a
:class:`tensafe.training.errors.TrainingError`). The privacy refusals are the privacy
package's own: :class:`tensafe.privacy.BudgetExceededError` (so that every layer reports an
exhausted budget the same way) and :class:`tensafe.privacy.DpPolicyError` /
:class:`tensafe.privacy.PolicyLoosenedError` (an invalid or loosened DP policy, raised with
:class:`tensafe.privacy.DpPolicy`). :data:`USER_ERRORS` lists the exceptions that a request
caused (the server fails the future with category ``user``); anything else is a server fault.
"""

from __future__ import annotations

from tensafe.privacy import BudgetExceededError, DpPolicyError
from tensafe.training.errors import TrainingError

__all__ = [
    "USER_ERRORS",
    "BudgetExceededError",
    "InvalidRequestError",
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
    DpPolicyError,
    SessionStateError,
    StepLimitError,
    StateFormatError,
    BudgetExceededError,
)
