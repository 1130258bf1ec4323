"""Errors of the audit log."""

from __future__ import annotations

from tensafe.errors import TenSafeError

__all__ = ["AuditError", "AuditVerificationError"]


class AuditError(TenSafeError):
    """Root of the audit log's errors: bad input, unreadable bundle, database busy."""


class AuditVerificationError(AuditError):
    """The audit log or bundle does not verify: it was modified, or cannot be vouched for.

    Attributes:
        tenant: The tenant whose chain failed, when known.
        seq: Sequence number of the first bad record, when the failure concerns a record.
        reason: Why it failed, in words.
    """

    exit_code = 3

    def __init__(self, reason: str, *, tenant: str | None = None, seq: int | None = None) -> None:
        self.tenant = tenant
        self.seq = seq
        self.reason = reason
        where = f"tenant {tenant!r}" if tenant is not None else "audit log"
        at = f" at seq {seq}" if seq is not None else ""
        super().__init__(f"audit verification failed for {where}{at}: {reason}")

    def __reduce__(self) -> tuple[object, ...]:
        return (_rebuild, (self.reason, self.tenant, self.seq))


def _rebuild(reason: str, tenant: str | None, seq: int | None) -> AuditVerificationError:
    return AuditVerificationError(reason, tenant=tenant, seq=seq)
