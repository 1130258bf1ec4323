"""``AuditRecord`` (the protocol's ``AuditRecordView``) and ``AuditRecordsResponse``: one definition.

Both are re-exported from :mod:`tensafe.protocol.tensafe`; ``AuditRecord`` is the SDK's
name of :class:`~tensafe.protocol.tensafe.AuditRecordView` (the same class).
"""

from __future__ import annotations

from tensafe.protocol.tensafe import AuditRecordsResponse
from tensafe.protocol.tensafe import AuditRecordView as AuditRecord

__all__ = ["AuditRecord", "AuditRecordsResponse"]
