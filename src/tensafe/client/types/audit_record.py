"""``AuditRecord``: one entry of the tenant's hash-chained audit log."""

from __future__ import annotations

from typing import Any

from pydantic import Field

from tensafe.client.types._base import ResponseModel

__all__ = ["AuditRecord", "AuditRecordsResponse"]


class AuditRecord(ResponseModel):
    """An audit record as the server stores it (``docs/audit.md``)."""

    seq: int
    timestamp: str
    actor: str
    action: str
    resource: str = ""
    details: dict[str, Any] = Field(default_factory=dict)
    prev_hash: str
    record_hash: str
    format: str | None = None


class AuditRecordsResponse(ResponseModel):
    """The newest records of the tenant, oldest first, and the chain's length."""

    records: list[AuditRecord]
    total_count: int
