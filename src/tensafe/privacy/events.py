"""Immutable records of privacy spending (DpEvent-style).

A training run spends privacy one DP-SGD step at a time. TenSafe records that
spending as frozen dataclasses which the stateful accountants compose. The records
follow the contract of ``dp_accounting.dp_event``:

* A record type, once released, is never removed and its fields never change meaning.
  New behaviour gets a new record type or a new :class:`SamplingMethod` value.
* An accountant that cannot analyse a record refuses it by name with
  :class:`~tensafe.privacy.errors.UnsupportedEventError`; it never guesses.

Record types:

``DpSgdEvent`` (name ``"dp_sgd"``)
    ``steps`` DP-SGD steps, each adding Gaussian noise of standard deviation
    ``noise_multiplier · clip_norm`` to the sum of clipped per-example gradients of a
    batch drawn with ``sampling_method`` at rate ``sample_rate``. Every built-in
    accountant analyses it when ``sampling_method`` is ``"poisson"`` (each example
    joins each batch independently with probability q, the add/remove-one neighbouring
    relation); other sampling methods are refused.

``UnsupportedEvent`` (name ``"unsupported"``)
    Something touched the private data in a way no accountant can bound (for example a
    non-private evaluation on training examples). Every accountant refuses it, so a run
    that records one can never claim a finite ε.
"""

from __future__ import annotations

import enum
from dataclasses import dataclass
from typing import Any, ClassVar

from tensafe.privacy._validation import check_noise_multiplier, check_sample_rate, check_steps
from tensafe.privacy.errors import PrivacyConfigError

__all__ = ["DpEvent", "DpSgdEvent", "SamplingMethod", "UnsupportedEvent", "event_from_dict"]


class SamplingMethod(enum.StrEnum):
    """How the examples of each batch were chosen.

    Values are part of the certificate format and are never renamed.
    """

    #: Each example joins each batch independently with probability q, drawn by the engine.
    POISSON = "poisson"
    #: Fixed-size batches from a shuffled pass over the data (no amplification analysed here).
    SHUFFLED = "shuffled"
    #: The client sent each batch itself (Tinker-style ``forward_backward``); the engine
    #: did not sample, so any ε assumes the client sampled by Poisson sampling at rate q.
    CLIENT_CHOSEN_BATCHES = "client_chosen_batches"


@dataclass(frozen=True)
class DpEvent:
    """Base class of every spending record. Subclasses set :attr:`name`."""

    name: ClassVar[str] = "dp_event"

    def to_dict(self) -> dict[str, Any]:
        """Return a JSON-ready mapping that :func:`event_from_dict` reads back."""
        raise NotImplementedError


@dataclass(frozen=True)
class DpSgdEvent(DpEvent):
    """``steps`` DP-SGD steps with the same σ, q and sampling method.

    Attributes:
        noise_multiplier: σ, the noise standard deviation divided by the clip norm.
        sample_rate: q, the probability that an example is in a given batch.
        steps: How many steps (>= 0) this record covers.
        sampling_method: How batches were drawn; only ``POISSON`` is analysed.
    """

    name: ClassVar[str] = "dp_sgd"

    noise_multiplier: float
    sample_rate: float
    steps: int
    sampling_method: SamplingMethod = SamplingMethod.POISSON

    def __post_init__(self) -> None:
        object.__setattr__(self, "noise_multiplier", check_noise_multiplier(self.noise_multiplier))
        object.__setattr__(self, "sample_rate", check_sample_rate(self.sample_rate))
        object.__setattr__(self, "steps", check_steps(self.steps))
        try:
            method = SamplingMethod(self.sampling_method)
        except ValueError:
            choices = ", ".join(m.value for m in SamplingMethod)
            raise PrivacyConfigError(
                f"unknown sampling_method {self.sampling_method!r}; choose one of: {choices}"
            ) from None
        object.__setattr__(self, "sampling_method", method)

    def same_mechanism(self, other: DpSgdEvent) -> bool:
        """Return True when ``other`` differs from this record only in ``steps``."""
        return (
            self.noise_multiplier == other.noise_multiplier
            and self.sample_rate == other.sample_rate
            and self.sampling_method == other.sampling_method
        )

    def to_dict(self) -> dict[str, Any]:
        """Return a JSON-ready mapping."""
        return {
            "event": self.name,
            "noise_multiplier": self.noise_multiplier,
            "sample_rate": self.sample_rate,
            "steps": self.steps,
            "sampling_method": self.sampling_method.value,
        }


@dataclass(frozen=True)
class UnsupportedEvent(DpEvent):
    """A use of private data that no accountant can bound; always refused.

    Attributes:
        description: What happened, in words (never the data itself).
    """

    name: ClassVar[str] = "unsupported"

    description: str

    def to_dict(self) -> dict[str, Any]:
        """Return a JSON-ready mapping."""
        return {"event": self.name, "description": self.description}


def event_from_dict(data: object) -> DpEvent:
    """Rebuild a spending record from :meth:`DpEvent.to_dict` output.

    Raises:
        PrivacyConfigError: If the mapping is not a known, well-formed record.
    """
    if not isinstance(data, dict):
        raise PrivacyConfigError(f"a privacy event must be a JSON object, got {type(data).__name__}")
    kind = data.get("event")
    if kind == DpSgdEvent.name:
        expected = {"event", "noise_multiplier", "sample_rate", "steps", "sampling_method"}
        if set(data) != expected:
            raise PrivacyConfigError(f"a dp_sgd event needs exactly the keys {sorted(expected)}")
        return DpSgdEvent(
            noise_multiplier=data["noise_multiplier"],
            sample_rate=data["sample_rate"],
            steps=data["steps"],
            sampling_method=data["sampling_method"],
        )
    if kind == UnsupportedEvent.name:
        if set(data) != {"event", "description"} or not isinstance(data["description"], str):
            raise PrivacyConfigError("an unsupported event needs exactly the keys ['description', 'event']")
        return UnsupportedEvent(description=data["description"])
    raise PrivacyConfigError(f"unknown privacy event {kind!r}")
