"""``AuditVerification``: re-exported from :mod:`tensafe.protocol.tensafe` (one definition)."""

from __future__ import annotations

from tensafe.protocol.tensafe import AuditVerification

__all__ = ["AuditVerification"]
