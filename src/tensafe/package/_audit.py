"""Structured audit events for TSSP verification decisions.

:func:`tensafe.package.verify` and :func:`tensafe.package.unpack` report every decision
(accepted, or refused and why) as a :class:`PackageEvent` to an optional audit sink: any
object with ``append(event)``. Each event has a dotted id, a severity and a
``recoverable`` flag (true when the same package could be accepted once the verifier's
configuration changes: trust store, policy, recipient key, input paths; false when the
package itself is bad and must be replaced). :class:`AuditLogSink` writes them to the
tamper-evident audit log of :mod:`tensafe.audit`.

Event ids are never removed or given a new meaning; the table is in ``docs/tssp.md``.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any, Final, Literal, Protocol, runtime_checkable

from tensafe.package.errors import (
    NotARecipientError,
    PackageDecryptionError,
    PackageError,
    PackageExpiredError,
    PackageFormatError,
    PackageInputError,
    PackageStateError,
    PolicyDeniedError,
    RollbackError,
    SignatureVerificationError,
    UntrustedSignerError,
)

__all__ = [
    "PACKAGE_EVENTS",
    "AuditLogSink",
    "AuditSink",
    "PackageAuditError",
    "PackageEvent",
]

Severity = Literal["info", "warning", "error", "critical"]

#: Every TSSP event id with its fixed ``(severity, recoverable)``.
PACKAGE_EVENTS: Final[Mapping[str, tuple[Severity, bool]]] = {
    "tssp.verify.accepted": ("info", True),
    "tssp.unpack.accepted": ("info", True),
    "tssp.policy.denied": ("warning", True),
    "tssp.signature.invalid": ("critical", False),
    "tssp.signer.untrusted": ("error", True),
    "tssp.rollback.rejected": ("critical", False),
    "tssp.package.expired": ("error", False),
    "tssp.format.invalid": ("error", False),
    "tssp.recipient.unknown": ("error", True),
    "tssp.decrypt.failed": ("critical", False),
    "tssp.state.error": ("error", True),
    "tssp.input.invalid": ("error", True),
}

# Most specific first: PolicyDeniedError before its PackageError root, and so on.
_ERROR_EVENTS: Final[tuple[tuple[type[PackageError], str], ...]] = (
    (PolicyDeniedError, "tssp.policy.denied"),
    (SignatureVerificationError, "tssp.signature.invalid"),
    (UntrustedSignerError, "tssp.signer.untrusted"),
    (RollbackError, "tssp.rollback.rejected"),
    (PackageExpiredError, "tssp.package.expired"),
    (PackageFormatError, "tssp.format.invalid"),
    (NotARecipientError, "tssp.recipient.unknown"),
    (PackageDecryptionError, "tssp.decrypt.failed"),
    (PackageStateError, "tssp.state.error"),
    (PackageInputError, "tssp.input.invalid"),
)
if TYPE_CHECKING:  # the audit log (and SQLAlchemy) load only when a sink is used
    from tensafe.audit import AuditLog, AuditRecord

_MAX_REASONS = 32
_MAX_TEXT = 512


def _clip(text: str) -> str:
    return text if len(text) <= _MAX_TEXT else text[: _MAX_TEXT - 3] + "..."


@dataclass(frozen=True)
class PackageEvent:
    """One TSSP verification decision.

    Attributes:
        event_id: Dotted id, a key of :data:`PACKAGE_EVENTS` (``tssp.policy.denied``).
        severity: ``info``, ``warning``, ``error`` or ``critical``.
        recoverable: Whether the same package could be accepted after a configuration
            change on the verifier's side (see the module docstring).
        operation: ``verify`` or ``unpack``.
        message: One-line human-readable summary (the error message on refusal).
        package: Package name, when the header was parsed far enough to know it.
        version: Package version, likewise.
        header_sha256: Hex SHA-256 of the signed header, likewise.
        reasons: Every policy deny reason (``tssp.policy.denied`` only).
        trusted_signers: Key ids of the trusted signers that verified (on acceptance).
    """

    event_id: str
    severity: Severity
    recoverable: bool
    operation: Literal["verify", "unpack"]
    message: str
    package: str | None = None
    version: str | None = None
    header_sha256: str | None = None
    reasons: tuple[str, ...] = ()
    trusted_signers: tuple[str, ...] = field(default=())

    @classmethod
    def create(
        cls, event_id: str, *, operation: Literal["verify", "unpack"], message: str, **fields: Any
    ) -> PackageEvent:
        """Build an event, taking severity and ``recoverable`` from :data:`PACKAGE_EVENTS`."""
        severity, recoverable = PACKAGE_EVENTS[event_id]
        return cls(event_id, severity, recoverable, operation, _clip(message), **fields)

    @classmethod
    def from_error(
        cls, error: PackageError, *, operation: Literal["verify", "unpack"], **fields: Any
    ) -> PackageEvent:
        """The refusal event for a :class:`PackageError` raised by verify or unpack."""
        event_id = next((eid for kind, eid in _ERROR_EVENTS if isinstance(error, kind)), "tssp.input.invalid")
        reasons = (
            tuple(_clip(r) for r in error.reasons[:_MAX_REASONS])
            if isinstance(error, PolicyDeniedError)
            else ()
        )
        return cls.create(event_id, operation=operation, message=str(error), reasons=reasons, **fields)

    @property
    def resource(self) -> str:
        """The audit ``resource``: ``tssp/NAME@VERSION``, or ``tssp`` when unknown."""
        if self.package is None:
            return "tssp"
        return f"tssp/{self.package}@{self.version}"

    def details(self) -> dict[str, Any]:
        """The event as audit-record details (JSON values only, no secrets)."""
        out: dict[str, Any] = {
            "severity": self.severity,
            "recoverable": self.recoverable,
            "operation": self.operation,
            "message": self.message,
        }
        if self.package is not None:
            out["package"] = self.package
            out["version"] = self.version
            out["header_sha256"] = self.header_sha256
        if self.reasons:
            out["reasons"] = list(self.reasons)
        if self.trusted_signers:
            out["trusted_signers"] = list(self.trusted_signers)
        return out


@runtime_checkable
class AuditSink(Protocol):
    """Receives TSSP events; ``append`` raising makes the operation fail (fail closed)."""

    def append(self, event: PackageEvent) -> object:
        """Record one event."""
        ...


class PackageAuditError(PackageError):
    """The audit sink failed to record a decision; the package was not accepted."""

    exit_code = 8


class AuditLogSink:
    """An :class:`AuditSink` that appends each event to a tenant's chain in the audit log.

    The record's ``action`` is the event id, its ``resource`` ``tssp/NAME@VERSION`` and its
    ``details`` :meth:`PackageEvent.details`.
    """

    def __init__(self, log: AuditLog, *, tenant: str, actor: str) -> None:
        """Create a sink.

        Args:
            log: The audit log (its checkpoint settings apply).
            tenant: The tenant whose chain records the events (it must exist).
            actor: Who verifies, as an identifier (``service:edge-7``, ``user:alice``).
        """
        self._log = log
        self._tenant = tenant
        self._actor = actor

    def __repr__(self) -> str:
        return f"AuditLogSink(tenant={self._tenant!r}, actor={self._actor!r})"

    def append(self, event: PackageEvent) -> AuditRecord:
        """Append ``event`` in its own transaction; returns the audit record."""
        return self._log.append(
            tenant=self._tenant,
            actor=self._actor,
            action=event.event_id,
            resource=event.resource,
            details=event.details(),
        )


def emit(sink: AuditSink | None, event: PackageEvent, *, cause: PackageError | None = None) -> None:
    """Send ``event`` to ``sink`` (if any); a failing sink fails the operation.

    Raises:
        PackageAuditError: The sink raised. On a refusal the original error is its cause.
    """
    if sink is None:
        return
    try:
        sink.append(event)
    except Exception as exc:
        lines = str(exc).strip().splitlines()
        why = f"{type(exc).__name__}: {_clip(lines[0]) if lines else 'no message'}"
        if cause is not None:
            raise PackageAuditError(
                f"could not record audit event {event.event_id} ({why}); the package was refused: {cause}"
            ) from cause
        raise PackageAuditError(
            f"could not record audit event {event.event_id} ({why}); "
            "the package was not accepted: fix the audit log and retry"
        ) from exc
