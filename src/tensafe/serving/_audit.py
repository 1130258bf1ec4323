"""The registered table of the serving layer's audit events.

The adapter registry (:mod:`tensafe.serving.registry`) records every adapter load, unload and
refusal in the audit log of the tenant who owns the adapter (or who asked for it), through an
:class:`AuditAppender` (:class:`tensafe.audit.AuditLog` is one). The record's ``action`` is the
event id, its ``resource`` ``adapter/<model name>``; ``details`` hold ``severity`` and
``recoverable`` (as the key-custody and TSSP events do), the engine's ``adapter_id``, the base
model and the event's own fields. Never a prompt, a completion or key material.

An id is never removed or given a new meaning; new ids may be added (``docs/audit.md``).
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any, Final, Literal, Protocol

__all__ = ["SERVING_EVENTS", "AuditAppender", "ServingEventSpec", "serving_details"]

Severity = Literal["info", "warning", "error", "critical"]


@dataclass(frozen=True)
class ServingEventSpec:
    """The fixed severity and recoverability of one serving event id."""

    severity: Severity
    recoverable: bool
    description: str


#: Every serving event id. Ids are never removed or given a new meaning.
SERVING_EVENTS: Final[Mapping[str, ServingEventSpec]] = {
    "serving.adapter.loaded": ServingEventSpec(
        "info", True, "a decrypted adapter was loaded into an inference engine"
    ),
    "serving.adapter.unloaded": ServingEventSpec(
        "info", True, "an adapter was removed from an engine (LRU, expiry, revocation, admin, shutdown)"
    ),
    "serving.adapter.refused": ServingEventSpec(
        "warning",
        True,
        "a request for an adapter was refused (unknown or another tenant's, deleted, expired, "
        "failed verification or decryption, no free slot)",
    ),
}


class AuditAppender(Protocol):
    """Appends one audit record in its own transaction (:meth:`tensafe.audit.AuditLog.append`)."""

    def append(
        self,
        *,
        tenant: str,
        actor: str,
        action: str,
        resource: str = "",
        details: Mapping[str, Any] | None = None,
    ) -> object:
        """Append the record; raising makes the operation fail (fail closed)."""
        ...


def serving_details(event: str, **fields: Any) -> dict[str, Any]:
    """The ``details`` of a record of ``event``: its severity and recoverability, then ``fields``.

    Raises:
        KeyError: ``event`` is not in :data:`SERVING_EVENTS`.
    """
    spec = SERVING_EVENTS[event]
    return {"severity": spec.severity, "recoverable": spec.recoverable, **fields}
