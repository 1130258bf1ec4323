"""Exception tree of :mod:`tensafe.privacy`.

Every error the privacy package raises on purpose derives from :class:`PrivacyError`,
which is both a :class:`tensafe.errors.TenSafeError` (so the CLI prints it as one line)
and a :class:`ValueError` (so callers that validate inputs the usual Python way still
catch it). The classes are flat, carry only a message plus plain numbers, and pickle
cleanly so they can cross process boundaries (Ray workers, multiprocessing).
"""

from __future__ import annotations

from tensafe.errors import TenSafeError

__all__ = [
    "BudgetExceededError",
    "CertificateError",
    "DpPolicyError",
    "PolicyLoosenedError",
    "PrivacyConfigError",
    "PrivacyError",
    "UnreachableBudgetError",
    "UnsupportedEventError",
]


class PrivacyError(TenSafeError, ValueError):
    """Root of every privacy error: an input, budget or certificate problem."""

    exit_code = 2


class PrivacyConfigError(PrivacyError):
    """A privacy parameter is out of range (σ, q, steps, δ, accountant name ...)."""


class DpPolicyError(PrivacyConfigError):
    """A DP-SGD policy (:class:`tensafe.privacy.DpPolicy`) or its plan is invalid or inconsistent."""


class PolicyLoosenedError(DpPolicyError):
    """A requested policy change would weaken the privacy policy; only tightening is allowed."""


class UnsupportedEventError(PrivacyError):
    """An accountant was asked to compose a spending record it cannot analyse."""


class UnreachableBudgetError(PrivacyError):
    """No noise multiplier in the searched range reaches the requested ε."""


class CertificateError(PrivacyError):
    """A DP certificate is malformed, of an unknown schema or internally inconsistent."""


class BudgetExceededError(PrivacyError):
    """One more training step would spend more privacy than the target allows.

    Attributes:
        step: The 1-based index of the step that was refused.
        epsilon: The ε the run would reach after that step.
        target_epsilon: The ε budget of the run.
        delta: The δ at which ε is reported.
    """

    exit_code = 3

    def __init__(self, *, step: int, epsilon: float, target_epsilon: float, delta: float) -> None:
        self.step = step
        self.epsilon = epsilon
        self.target_epsilon = target_epsilon
        self.delta = delta
        super().__init__(
            f"privacy budget exhausted: step {step} would reach ε={epsilon:.4f} at δ={delta:g}, "
            f"above the target ε={target_epsilon:g}; stop training here, or start a new run with a "
            "larger target, more noise, a smaller sample rate or fewer steps"
        )

    def __reduce__(self) -> tuple[object, ...]:
        return (
            _rebuild_budget_exceeded,
            (self.step, self.epsilon, self.target_epsilon, self.delta),
        )


def _rebuild_budget_exceeded(
    step: int, epsilon: float, target_epsilon: float, delta: float
) -> BudgetExceededError:
    return BudgetExceededError(step=step, epsilon=epsilon, target_epsilon=target_epsilon, delta=delta)
