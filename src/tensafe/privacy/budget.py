"""Stateful ε budget of one training run (σ and q fixed for its own steps, Poisson analysis)."""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Any

from tensafe.privacy._validation import (
    check_delta,
    check_noise_multiplier,
    check_sample_rate,
    check_steps,
    check_target_epsilon,
)
from tensafe.privacy.accountants.base import EpsilonReport
from tensafe.privacy.accountants.registry import create_accountant, get_accountant_class
from tensafe.privacy.calibration import epsilon_report
from tensafe.privacy.errors import BudgetExceededError, PrivacyConfigError
from tensafe.privacy.events import DpSgdEvent, SamplingMethod, event_from_dict

__all__ = ["PrivacyBudget"]

_STATE_VERSION = 2


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

    A budget may also account for spending that happened elsewhere on the same data (a
    privacy ledger shared by several runs): :meth:`rebase` replaces what it accounts for
    with a given history of :class:`~tensafe.privacy.DpSgdEvent` records. Records with this
    budget's σ and q become its step count; any others are composed first, as a prior.

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
        self._prior: tuple[DpSgdEvent, ...] = ()  # other mechanisms, composed before our steps
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
        """Steps of this budget's σ and q accounted so far (recorded, or given to :meth:`rebase`)."""
        return self._steps

    @property
    def prior(self) -> tuple[DpSgdEvent, ...]:
        """Spending records of other mechanisms (other σ or q) composed before this budget's steps."""
        return self._prior

    def history(self) -> tuple[DpSgdEvent, ...]:
        """Every spending record ε covers: the prior, then this budget's steps (if any)."""
        own = (
            (DpSgdEvent(noise_multiplier=self._sigma, sample_rate=self._q, steps=self._steps),)
            if self._steps
            else ()
        )
        return (*self._prior, *own)

    def rebase(self, events: Sequence[DpSgdEvent]) -> None:
        """Account from now on for exactly ``events`` (plus the steps recorded afterwards).

        Use it to make the budget follow a privacy ledger that other runs also spend from:
        records with this budget's σ and q set :attr:`steps`; the others become the prior.

        Raises:
            PrivacyConfigError: If an event is not a Poisson-analysed :class:`DpSgdEvent`.
        """
        own = 0
        prior: list[DpSgdEvent] = []
        for event in events:
            if not isinstance(event, DpSgdEvent) or event.sampling_method is not SamplingMethod.POISSON:
                raise PrivacyConfigError(
                    "a privacy budget can only account for Poisson-analysed DP-SGD events"
                )
            if event.noise_multiplier == self._sigma and event.sample_rate == self._q:
                own += event.steps
            elif event.steps:
                prior.append(event)
        merged = tuple(prior)
        if merged != self._prior:
            self._prior = merged
            self._safe_until, self._unsafe_from = 0, None
        self._steps = own

    def report_after(self, steps: int) -> EpsilonReport:
        """Return the full :class:`~tensafe.privacy.accountants.EpsilonReport` after ``steps`` of
        this budget's steps (on top of the prior)."""
        n = check_steps(steps)
        if not self._prior:
            return epsilon_report(
                accountant=self._accountant,
                noise_multiplier=self._sigma,
                sample_rate=self._q,
                steps=n,
                delta=self._delta,
            )
        acc = create_accountant(self._accountant)
        for event in self._prior:
            acc.compose(event)
        acc.compose(DpSgdEvent(noise_multiplier=self._sigma, sample_rate=self._q, steps=n))
        return acc.get_report(self._delta)

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
            "prior": [e.to_dict() for e in self._prior],
        }

    def load_state_dict(self, state: Mapping[str, Any]) -> None:
        """Restore the step count from :meth:`state_dict` output.

        The saved parameters must equal this budget's: resuming with another σ, q, δ,
        target or accountant would misstate the privacy spent.

        Raises:
            PrivacyConfigError: If ``state`` is malformed or its parameters differ.
        """
        if not isinstance(state, Mapping) or state.get("version") not in (1, _STATE_VERSION):
            raise PrivacyConfigError(f"privacy budget state must be a mapping with version {_STATE_VERSION}")
        mine = self.state_dict()
        for key in ("target_epsilon", "delta", "accountant", "noise_multiplier", "sample_rate"):
            if state.get(key) != mine[key]:
                raise PrivacyConfigError(
                    f"cannot resume: the saved budget has {key}={state.get(key)!r} but this run has "
                    f"{key}={mine[key]!r}; resume with the same privacy settings"
                )
        raw_prior = state.get("prior", [])
        if not isinstance(raw_prior, list):
            raise PrivacyConfigError("privacy budget state: prior must be a list of events")
        prior: list[DpSgdEvent] = []
        for item in raw_prior:
            event = event_from_dict(item)
            if not isinstance(event, DpSgdEvent):
                raise PrivacyConfigError("privacy budget state: prior holds a record that is not dp_sgd")
            prior.append(event)
        steps = check_steps(state.get("steps"))
        self.rebase([*prior, DpSgdEvent(noise_multiplier=self._sigma, sample_rate=self._q, steps=steps)])

    def __repr__(self) -> str:
        return (
            f"PrivacyBudget(target_epsilon={self._target:g}, delta={self._delta:g}, "
            f"accountant={self._accountant!r}, noise_multiplier={self._sigma:g}, "
            f"sample_rate={self._q:g}, steps={self._steps}, prior={len(self._prior)} record(s))"
        )
