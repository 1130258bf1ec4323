"""``AuditVerification``: the server's check of the tenant's audit chain."""

from __future__ import annotations

import datetime as _dt

from tensafe.client.types._base import ResponseModel

__all__ = ["AuditVerification"]


class AuditVerification(ResponseModel):
    """Whether the chain verified, and what was covered (or why it failed).

    ``checkpoint_every`` is the server's checkpoint interval the chain was checked
    against, ``known_length`` the length of the known head that was compared (None when
    none was given). The server re-verifies a tenant's whole chain at most once per
    interval: ``cached`` is true when this answer reuses a verification made at
    ``verified_at``; the known head is compared on every call.
    """

    verified: bool
    length: int = 0
    head_hash: str | None = None
    checkpoints: int = 0
    signed_length: int = 0
    unsigned_tail: int = 0
    checkpoint_every: int = 0
    known_length: int | None = None
    cached: bool = False
    verified_at: _dt.datetime | None = None
    reason: str | None = None
