"""Audit events of key custody: every DEK, KEK and deployment-key change is recorded.

Each event is an audit record (:func:`tensafe.audit.append_record`) appended in the same
database transaction as the change it describes, so both commit or neither does. The
record's ``action`` is the event's dotted id; its ``details`` carry ``severity``,
``recoverable`` and identifiers, versions and provider names, never key material.
Tenant events go to the tenant's own chain; deployment-wide events (KEK rotation, the
deployment signing key) go to the reserved tenant :data:`DEPLOYMENT_TENANT`.

Appends pass the deployment's signing key and checkpoint interval
(``TS_AUDIT_CHECKPOINT_EVERY``), so key events take part in the periodic signed
checkpoints like every other appender's records (docs/audit.md, "The checkpoint
interval").
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any, Final, Literal

from sqlalchemy.dialects import postgresql, sqlite
from sqlalchemy.orm import Session

from tensafe.audit import AuditRecord, CheckpointSigner, append_record
from tensafe.db import Tenant, utcnow
from tensafe.keys.errors import KeyManagementError

__all__ = [
    "DEFAULT_ACTOR",
    "DEPLOYMENT_TENANT",
    "KEY_EVENTS",
    "KeyEventSpec",
    "ensure_deployment_tenant",
    "record_key_event",
]

#: The reserved tenant whose audit chain holds deployment-wide key events. Its id fits the
#: tenant-id pattern but contains a ``.``, which TenSafe's tenant API never generates.
DEPLOYMENT_TENANT: Final = "tensafe.deployment"
#: Actor recorded when the caller does not name one.
DEFAULT_ACTOR: Final = "service:tensafe.keys"

Severity = Literal["info", "warning", "error", "critical"]


@dataclass(frozen=True)
class KeyEventSpec:
    """The fixed severity and recoverability of one key event id."""

    severity: Severity
    recoverable: bool
    description: str


#: Every key-custody event id. Ids are never removed or given a new meaning.
KEY_EVENTS: Final[Mapping[str, KeyEventSpec]] = {
    "keys.dek.created": KeyEventSpec(
        "info", True, "a tenant's first (or post-rotation) DEK version was created"
    ),
    "keys.dek.rotated": KeyEventSpec(
        "info", True, "a new DEK version encrypts new data; older ones are retired"
    ),
    "keys.tenant.shredded": KeyEventSpec(
        "critical", False, "every wrapped DEK of the tenant was erased (crypto-shredding)"
    ),
    "keys.kek.rotated": KeyEventSpec("warning", True, "the KEK provider created a new KEK version"),
    "keys.kek.rewrapped": KeyEventSpec(
        "info", True, "stored keys were re-wrapped under the current KEK version"
    ),
    "keys.deployment_key.created": KeyEventSpec(
        "warning", True, "the deployment's hybrid signing key was created"
    ),
    "keys.kek.rebound": KeyEventSpec(
        "warning",
        True,
        "stored keys in the legacy unbound format were re-wrapped bound to their tenant and version",
    ),
}


def _dialect_insert(session: Session) -> Any:
    name = session.get_bind().dialect.name
    if name == "postgresql":
        return postgresql.insert
    if name == "sqlite":
        return sqlite.insert
    raise KeyManagementError(f"key audit events support SQLite and PostgreSQL, not {name}")


def ensure_deployment_tenant(session: Session) -> str:
    """Create the reserved deployment tenant if missing (race-free) and return its id."""
    stmt = (
        _dialect_insert(session)(Tenant)
        .values(id=DEPLOYMENT_TENANT, name=DEPLOYMENT_TENANT, created_at=utcnow(), deleted_at=None)
        .on_conflict_do_nothing()
    )
    session.execute(stmt)
    return DEPLOYMENT_TENANT


def record_key_event(
    session: Session,
    event: str,
    *,
    tenant: str,
    actor: str,
    resource: str,
    details: Mapping[str, Any],
    signer: CheckpointSigner | None,
    checkpoint_every: int | None,
) -> AuditRecord:
    """Append the audit record of a key event inside the caller's transaction.

    Args:
        session: The session of the transaction that makes the change.
        event: A key of :data:`KEY_EVENTS`.
        tenant: The tenant whose chain records it (:data:`DEPLOYMENT_TENANT` for
            deployment-wide events; it is created if missing).
        actor: Who acted (an identifier).
        resource: What was acted on, e.g. ``dek/acme/3``.
        details: Identifiers, versions, provider names and counts (no key material).
        signer: The deployment signing key, which signs the checkpoint when one is due.
        checkpoint_every: The deployment's checkpoint interval (``None``: never sign;
            the chain then fails verification once that many records are unsigned).

    Returns:
        The appended record.
    """
    spec = KEY_EVENTS[event]
    if tenant == DEPLOYMENT_TENANT:
        ensure_deployment_tenant(session)
    body = {"severity": spec.severity, "recoverable": spec.recoverable, **details}
    return append_record(
        session,
        tenant=tenant,
        actor=actor,
        action=event,
        resource=resource,
        details=body,
        signer=signer,
        checkpoint_every=checkpoint_every,
    )
