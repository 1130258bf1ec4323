"""``AuditVerification``: the server's check of the tenant's audit chain."""

from __future__ import annotations

from tensafe.client.types._base import ResponseModel

__all__ = ["AuditVerification"]


class AuditVerification(ResponseModel):
    """Whether the chain verified, and what was covered (or why it failed)."""

    verified: bool
    length: int = 0
    head_hash: str | None = None
    checkpoints: int = 0
    signed_length: int = 0
    unsigned_tail: int = 0
    reason: str | None = None
