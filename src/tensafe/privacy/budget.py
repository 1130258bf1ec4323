"""Stateful ε budget of one training run (fixed σ and q, Poisson sampling)."""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

from tensafe.privacy._validation import (
    check_delta,
    check_noise_multiplier,
    check_sample_rate,
    check_steps,
    check_target_epsilon,
)
from tensafe.privacy.accountants.base import EpsilonReport
from tensafe.privacy.accountants.registry import get_accountant_class
from tensafe.privacy.calibration import epsilon_report
from tensafe.privacy.errors import BudgetExceededError, PrivacyConfigError

__all__ = ["PrivacyBudget"]

_STATE_VERSION = 1


class PrivacyBudget:
    """Tracks the ε spent by a run and refuses the step that would overspend it.

    The trainer calls :meth:`check_step` before each optimizer step and
    :meth:`record_step` after it. Both cost O(1) almost always: the budget keeps the
    largest step count known to stay within the target and the smallest known to
    exceed it, and only asks the accountant again when a step falls between them,
    probing twice the current step count so the number of accountant queries grows
    with log(steps). ε values are cached by step count, so :meth:`spent_epsilon` at
    log points is cheap after the first call at that step.

    The step boundary relies on ε growing with the number of steps, which holds for
    every composed DP mechanism.

    Args:
        target_epsilon: ε budget of the run, > 0.
        delta: δ in (0, 1); check it against the data set with
            :func:`tensafe.privacy.validate_delta`.
        accountant: A registered accountant name.
        noise_multiplier: σ > 0 of every step.
        sample_rate: Poisson sampling rate q in (0, 1] of every step.

    Raises:
        PrivacyConfigError: If an argument is out of range or the accountant is unknown.
    """

    def __init__(
        self,
        *,
        target_epsilon: float,
        delta: float,
        accountant: str,
        noise_multiplier: float,
        sample_rate: float,
    ) -> None:
        self._target = check_target_epsilon(target_epsilon)
        self._delta = check_delta(delta)
        get_accountant_class(accountant)
        self._accountant = accountant
        self._sigma = check_noise_multiplier(noise_multiplier)
        self._q = check_sample_rate(sample_rate)
        self._steps = 0
        self._safe_until = 0  # eps(n) <= target for every n <= _safe_until.
        self._unsafe_from: int | None = None  # eps(n) > target for every n >= _unsafe_from.

    @property
    def target_epsilon(self) -> float:
        """The ε budget."""
        return self._target

    @property
    def delta(self) -> float:
        """The δ at which ε is reported."""
        return self._delta

    @property
    def accountant(self) -> str:
        """The accountant name."""
        return self._accountant

    @property
    def noise_multiplier(self) -> float:
        """σ of every step."""
        return self._sigma

    @property
    def sample_rate(self) -> float:
        """q of every step."""
        return self._q

    @property
    def steps(self) -> int:
        """Steps recorded so far."""
        return self._steps

    def report_after(self, steps: int) -> EpsilonReport:
        """Return the full :class:`~tensafe.privacy.accountants.EpsilonReport` after ``steps`` steps."""
        return epsilon_report(
            accountant=self._accountant,
            noise_multiplier=self._sigma,
            sample_rate=self._q,
            steps=check_steps(steps),
            delta=self._delta,
        )

    def epsilon_after(self, steps: int) -> float:
        """Return ε after ``steps`` steps (cached)."""
        return self.report_after(steps).epsilon

    def spent_epsilon(self) -> float:
        """Return ε spent by the steps recorded so far."""
        return self.epsilon_after(self._steps)

    def _within(self, n: int) -> bool:
        """Return whether ε(n) <= target, updating the known bounds."""
        if n <= self._safe_until:
            return True
        if self._unsafe_from is not None and n >= self._unsafe_from:
            return False
        if self.epsilon_after(n) > self._target:
            self._unsafe_from = n
            return False
        self._safe_until = n
        return True

    def _locate(self, n: int) -> bool:
        """Decide ``n`` and, when it is new ground, settle the boundary near it."""
        if n <= self._safe_until or (self._unsafe_from is not None and n >= self._unsafe_from):
            return self._within(n)
        # Look ahead to 2n: if it is within budget, so is everything up to it.
        ahead = 2 * n if self._unsafe_from is None else min(2 * n, self._unsafe_from - 1)
        if ahead > n and self._within(ahead):
            return True
        # The boundary lies in (safe_until, ahead]: bisect it so later checks are O(1).
        lo, hi = self._safe_until, self._unsafe_from if self._unsafe_from is not None else ahead + 1
        while hi - lo > 1:
            mid = (lo + hi) // 2
            if self._within(mid):
                lo = mid
            else:
                hi = mid
        return self._within(n)

    def check_step(self) -> None:
        """Raise if one more step would take ε above the target.

        Raises:
            BudgetExceededError: Naming the refused step, the ε it would reach and the target.
        """
        n = self._steps + 1
        if not self._locate(n):
            raise BudgetExceededError(
                step=n, epsilon=self.epsilon_after(n), target_epsilon=self._target, delta=self._delta
            )

    def record_step(self) -> None:
        """Record one completed step; refuses (fail closed) if it would overspend.

        Raises:
            BudgetExceededError: As :meth:`check_step`.
        """
        self.check_step()
        self._steps += 1

    def state_dict(self) -> dict[str, Any]:
        """Return a JSON-ready snapshot for checkpoints."""
        return {
            "version": _STATE_VERSION,
            "target_epsilon": self._target,
            "delta": self._delta,
            "accountant": self._accountant,
            "noise_multiplier": self._sigma,
            "sample_rate": self._q,
            "steps": self._steps,
        }

    def load_state_dict(self, state: Mapping[str, Any]) -> None:
        """Restore the step count from :meth:`state_dict` output.

        The saved parameters must equal this budget's: resuming with another σ, q, δ,
        target or accountant would misstate the privacy spent.

        Raises:
            PrivacyConfigError: If ``state`` is malformed or its parameters differ.
        """
        if not isinstance(state, Mapping) or state.get("version") != _STATE_VERSION:
            raise PrivacyConfigError(f"privacy budget state must be a mapping with version {_STATE_VERSION}")
        mine = self.state_dict()
        for key in ("target_epsilon", "delta", "accountant", "noise_multiplier", "sample_rate"):
            if state.get(key) != mine[key]:
                raise PrivacyConfigError(
                    f"cannot resume: the saved budget has {key}={state.get(key)!r} but this run has "
                    f"{key}={mine[key]!r}; resume with the same privacy settings"
                )
        self._steps = check_steps(state.get("steps"))

    def __repr__(self) -> str:
        return (
            f"PrivacyBudget(target_epsilon={self._target:g}, delta={self._delta:g}, "
            f"accountant={self._accountant!r}, noise_multiplier={self._sigma:g}, "
            f"sample_rate={self._q:g}, steps={self._steps})"
        )
