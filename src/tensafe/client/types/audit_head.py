"""``AuditHead``: re-exported from :mod:`tensafe.protocol.tensafe` (one definition)."""

from __future__ import annotations

from tensafe.protocol.tensafe import AuditHead

__all__ = ["AuditHead"]
