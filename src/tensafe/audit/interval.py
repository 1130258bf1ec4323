"""The checkpoint interval: how far a chain may run ahead of its newest signed checkpoint.

A deployment signs checkpoints at an interval ``N`` (``TS_AUDIT_CHECKPOINT_EVERY``, default
1000). Verification enforces the *interval rule* (docs/audit.md, "The checkpoint interval")::

    L                   the chain's length
    0 = p0 < p1 < ... < pk   the distinct lengths of its signed checkpoints, with p0 = 0
                        standing for the start of the chain

    p(i) - p(i-1) <= N  for every i    (no run of more than N records between checkpoints)
    L - pk        <  N                 (fewer than N records after the newest one)

A writer keeps the rule by signing a checkpoint, under the chain-head lock, whenever an
append makes ``L - pk`` reach ``N`` (:func:`checkpoint_due`). On-demand checkpoints only
add positions, which shortens gaps, so they never break it; neither does a writer with a
smaller interval. Deleting the newest checkpoints to rewrite the records after an older
one leaves ``L - pk >= N`` as soon as more than ``N - 1`` records are involved, which
verification reports.
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping
from dataclasses import dataclass

from tensafe import config
from tensafe.audit.errors import AuditError

__all__ = [
    "CHECKPOINT_EVERY_ENV",
    "DEFAULT_CHECKPOINT_EVERY",
    "IntervalViolation",
    "check_checkpoint_every",
    "checkpoint_due",
    "checkpoint_every_from_environment",
    "interval_violation",
]

#: Default interval: at most this many records between signed checkpoints of a tenant.
DEFAULT_CHECKPOINT_EVERY = config.DEFAULT_AUDIT_CHECKPOINT_EVERY
#: The environment variable every appender and verifier of a deployment reads.
CHECKPOINT_EVERY_ENV = "TS_AUDIT_CHECKPOINT_EVERY"
_MAX = 2**53 - 1


def check_checkpoint_every(value: object, *, name: str = "checkpoint_every") -> int:
    """Return ``value`` if it is a positive integer (not a bool), else raise :class:`AuditError`."""
    if isinstance(value, bool) or not isinstance(value, int) or not 1 <= value <= _MAX:
        raise AuditError(f"{name} must be a positive integer (records between signed checkpoints)")
    return value


def checkpoint_every_from_environment(env: Mapping[str, str] | None = None) -> int:
    """Read ``TS_AUDIT_CHECKPOINT_EVERY`` (default :data:`DEFAULT_CHECKPOINT_EVERY`).

    Raises:
        AuditError: The value is set but is not a positive integer.
    """
    try:
        return config.audit_checkpoint_every(env)  # the one parser (tensafe.config)
    except config.EnvironmentVariableError as exc:
        raise AuditError(str(exc)) from None


def checkpoint_due(length: int, newest: int, every: int) -> bool:
    """Whether a writer must sign a checkpoint at ``length`` (the newest one covers ``newest``)."""
    return length - newest >= every


@dataclass(frozen=True)
class IntervalViolation:
    """Where a chain breaks the interval rule: records ``start .. end - 1`` lack a checkpoint.

    Attributes:
        start: Length covered by the checkpoint before the run (0: start of the chain).
        end: Length covered by the checkpoint after the run, or the chain's length when
            the run is the tail (``tail`` true).
        tail: The run follows the newest checkpoint.
    """

    start: int
    end: int
    tail: bool


def interval_violation(lengths: Iterable[int], length: int, every: int) -> IntervalViolation | None:
    """Check the interval rule; return the first violation, or None when the chain keeps it.

    Args:
        lengths: Lengths covered by the chain's (already verified) checkpoints, any order,
            none larger than ``length``.
        length: The chain's length.
        every: The interval ``N``.
    """
    check_checkpoint_every(every)
    previous = 0
    for position in sorted(set(lengths)):
        if position - previous > every:
            return IntervalViolation(previous, position, False)
        previous = position
    if length - previous >= every:
        return IntervalViolation(previous, length, True)
    return None
