"""Abstract stateful accountant: composes spending records, reports (ε, δ)."""

from __future__ import annotations

import abc
import functools
import types
from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any, ClassVar, Self

from tensafe.privacy._validation import check_delta
from tensafe.privacy.analysis import Composition
from tensafe.privacy.errors import PrivacyConfigError, UnsupportedEventError
from tensafe.privacy.events import DpEvent, DpSgdEvent, SamplingMethod, event_from_dict

__all__ = ["Accountant", "EpsilonReport"]

_STATE_VERSION = 1


@dataclass(frozen=True)
class EpsilonReport:
    """ε of a composed history at one δ, with accountant-specific details.

    Attributes:
        epsilon: The ε TenSafe reports (for PRV, the upper bound).
        delta: The δ it holds at.
        accountant: The registry name of the accountant (``"rdp"``, ``"prv"`` ...).
        details: Extra figures, e.g. ``optimal_order`` (RDP, moments) or
            ``epsilon_lower``/``epsilon_estimate``/``epsilon_upper`` (PRV).
    """

    epsilon: float
    delta: float
    accountant: str
    details: Mapping[str, float] = field(default_factory=dict)

    def __post_init__(self) -> None:
        object.__setattr__(self, "details", types.MappingProxyType(dict(self.details)))

    def to_dict(self) -> dict[str, Any]:
        """Return a JSON-ready mapping (``epsilon``, ``delta``, ``accountant`` and the details)."""
        return {"epsilon": self.epsilon, "delta": self.delta, "accountant": self.accountant, **self.details}


class Accountant(abc.ABC):
    """A stateful privacy accountant over immutable :class:`~tensafe.privacy.events.DpEvent` records.

    Subclasses implement :meth:`_compute` (pure: compositions and δ in, report out)
    and set :attr:`name` and :attr:`title`. Consecutive records with the same σ, q and
    sampling method are merged, so the history stays short however many times
    :meth:`compose` is called. Results are cached by ``(history, δ)``.
    """

    #: Registry name, e.g. ``"rdp"``.
    name: ClassVar[str]
    #: Human name used in statements, e.g. ``"RDP accountant"``.
    title: ClassVar[str]

    def __init__(self) -> None:
        self._history: tuple[DpSgdEvent, ...] = ()

    def _refusal(self, event: DpEvent) -> str | None:
        """Return why ``event`` cannot be composed, or None when it can."""
        if not isinstance(event, DpEvent):
            return f"{type(event).__name__} is not a tensafe.privacy DpEvent"
        if isinstance(event, DpSgdEvent):
            if event.sampling_method is SamplingMethod.POISSON:
                return None
            return (
                f"sampling_method={event.sampling_method.value!r} has no supported analysis; "
                "only Poisson sampling ('poisson') is accounted"
            )
        return "no analysis is available for this event"

    def supports(self, event: DpEvent) -> bool:
        """Return whether :meth:`compose` would accept ``event``."""
        return self._refusal(event) is None

    def compose(self, event: DpEvent) -> Self:
        """Add ``event`` to the history and return ``self`` (chainable).

        Raises:
            UnsupportedEventError: Naming the event when this accountant cannot analyse it.
        """
        reason = self._refusal(event)
        if reason is not None:
            label = getattr(event, "name", type(event).__name__)
            raise UnsupportedEventError(f"the {self.name} accountant refuses the '{label}' event: {reason}")
        assert isinstance(event, DpSgdEvent)
        if event.steps == 0:
            return self
        if self._history and self._history[-1].same_mechanism(event):
            last = self._history[-1]
            merged = DpSgdEvent(
                noise_multiplier=last.noise_multiplier,
                sample_rate=last.sample_rate,
                steps=last.steps + event.steps,
                sampling_method=last.sampling_method,
            )
            self._history = (*self._history[:-1], merged)
        else:
            self._history = (*self._history, event)
        return self

    @property
    def history(self) -> tuple[DpSgdEvent, ...]:
        """The composed records, oldest first (consecutive identical mechanisms merged)."""
        return self._history

    @property
    def steps(self) -> int:
        """Total number of DP-SGD steps composed so far."""
        return sum(e.steps for e in self._history)

    def get_report(self, delta: float) -> EpsilonReport:
        """Return the (ε, δ) of everything composed so far, with details.

        Raises:
            PrivacyConfigError: If δ is not in (0, 1).
        """
        d = check_delta(delta)
        compositions = tuple((e.noise_multiplier, e.sample_rate, e.steps) for e in self._history)
        if not compositions:
            return EpsilonReport(epsilon=0.0, delta=d, accountant=self.name)
        return _cached_report(type(self), compositions, d)

    def get_epsilon(self, delta: float) -> float:
        """Return ε at ``delta`` of everything composed so far (0.0 for an empty history)."""
        return self.get_report(delta).epsilon

    def state_dict(self) -> dict[str, Any]:
        """Return a JSON-ready snapshot that :meth:`load_state_dict` restores."""
        return {
            "version": _STATE_VERSION,
            "accountant": self.name,
            "history": [e.to_dict() for e in self._history],
        }

    def load_state_dict(self, state: Mapping[str, Any]) -> None:
        """Replace the history with the one in ``state``.

        Raises:
            PrivacyConfigError: If ``state`` is malformed, of another version or of
                another accountant.
        """
        if not isinstance(state, Mapping) or state.get("version") != _STATE_VERSION:
            raise PrivacyConfigError(f"accountant state must be a mapping with version {_STATE_VERSION}")
        if state.get("accountant") != self.name:
            raise PrivacyConfigError(
                f"accountant state was saved by {state.get('accountant')!r}, not {self.name!r}"
            )
        history = state.get("history")
        if not isinstance(history, list):
            raise PrivacyConfigError("accountant state needs a 'history' list")
        fresh = type(self)()
        for item in history:
            fresh.compose(event_from_dict(item))
        self._history = fresh._history

    @classmethod
    @abc.abstractmethod
    def _compute(cls, compositions: tuple[Composition, ...], delta: float) -> EpsilonReport:
        """Return the report for a non-empty tuple of compositions (pure, cacheable)."""

    def __repr__(self) -> str:
        return f"{type(self).__name__}(steps={self.steps}, history={list(self._history)!r})"


@functools.lru_cache(maxsize=8192)
def _cached_report(
    cls: type[Accountant], compositions: tuple[Composition, ...], delta: float
) -> EpsilonReport:
    return cls._compute(compositions, delta)
