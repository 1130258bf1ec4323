"""Appending to the audit log and creating signed checkpoints.

Appends are serialised per tenant by one chain-head row: PostgreSQL locks it with
``SELECT ... FOR UPDATE``; on SQLite the transaction already holds the database write
lock from ``BEGIN IMMEDIATE`` (see :func:`tensafe.db.create_engine_from_url`). The
primary key ``(tenant_id, seq)`` makes a fork impossible even if that locking were
bypassed, and :class:`AuditLog` retries transient lock errors.
"""

from __future__ import annotations

import logging
import random
import time
from collections.abc import Callable, Iterator, Mapping
from typing import Any

from sqlalchemy import func, insert, select, update
from sqlalchemy.dialects import postgresql, sqlite
from sqlalchemy.exc import DBAPIError, IntegrityError, OperationalError
from sqlalchemy.orm import Session, sessionmaker

from tensafe.audit.canonical import canonical_json, parse_json_strict
from tensafe.audit.details import check_details
from tensafe.audit.errors import AuditError
from tensafe.audit.interval import DEFAULT_CHECKPOINT_EVERY, check_checkpoint_every, checkpoint_due
from tensafe.audit.models import AuditChainHead, AuditCheckpointRow, AuditRecordRow
from tensafe.audit.records import (
    CHECKPOINT_CONTEXT,
    CHECKPOINT_FORMAT,
    GENESIS_HASH,
    RECORD_FORMAT,
    AuditRecord,
    Checkpoint,
    check_text,
    format_timestamp,
    record_hash,
)
from tensafe.audit.signer import CheckpointSigner
from tensafe.db import Tenant, utcnow

__all__ = [
    "AuditLog",
    "append_record",
    "audited_tenants",
    "create_checkpoint",
    "iter_records",
    "latest_records",
    "list_checkpoints",
    "newest_checkpoint",
    "newest_checkpoint_length",
]

_log = logging.getLogger(__name__)

Clock = Callable[[], Any]


def _dialect_insert(session: Session) -> Any:
    name = session.get_bind().dialect.name
    if name == "postgresql":
        return postgresql.insert
    if name == "sqlite":
        return sqlite.insert
    raise AuditError(f"the audit log supports SQLite and PostgreSQL, not {name}")


def _lock_head(session: Session, tenant: str, now: Any) -> tuple[int, str]:
    """Lock the tenant's chain-head row (creating it on first use); return (length, head)."""
    query = (
        select(AuditChainHead.length, AuditChainHead.head_hash)
        .where(AuditChainHead.tenant_id == tenant)
        .with_for_update()
    )
    row = session.execute(query).first()
    if row is None:
        if session.execute(select(Tenant.id).where(Tenant.id == tenant)).first() is None:
            raise AuditError(f"unknown tenant {tenant!r}: create it first (tensafe.db.ensure_tenant)")
        stmt = (
            _dialect_insert(session)(AuditChainHead)
            .values(tenant_id=tenant, length=0, head_hash=GENESIS_HASH, updated_at=now)
            .on_conflict_do_nothing(index_elements=["tenant_id"])
        )
        session.execute(stmt)
        row = session.execute(query).one()
    return int(row.length), str(row.head_hash)


def append_record(
    session: Session,
    *,
    tenant: str,
    actor: str,
    action: str,
    resource: str = "",
    details: Mapping[str, Any] | None = None,
    signer: CheckpointSigner | None = None,
    checkpoint_every: int | None = None,
    clock: Clock = utcnow,
) -> AuditRecord:
    """Append one record to ``tenant``'s chain inside the caller's transaction.

    Use this to make an audit record part of the same transaction as the change it
    records (the caller commits both, or neither). Use :meth:`AuditLog.append` for a
    self-contained append with retries.

    Args:
        session: An open session on a migrated database; the caller commits.
        tenant: Tenant identifier (the tenant row must exist).
        actor: Who acted (an identifier, never a credential).
        action: Dotted action name, e.g. ``keys.rotate``.
        resource: What was acted on (may be empty).
        details: Hashes, identifiers, counts, privacy spent (see :func:`check_details`).
        signer: Signs the checkpoint when one is due.
        checkpoint_every: The interval ``N``: sign a checkpoint whenever this append leaves
            ``N`` records after the newest checkpoint (docs/audit.md, "The checkpoint
            interval"). Every appender of a deployment passes the deployment's interval
            and signer; ``None`` never signs, and the chain then fails verification once
            ``N`` records are unsigned.
        clock: Returns the current time (timezone-aware).

    Returns:
        The new record.

    Raises:
        AuditError: Invalid fields or details, unknown tenant, or a checkpoint is due and
            no signer was given.
    """
    check_text("tenant", tenant)
    check_text("actor", actor)
    check_text("action", action)
    check_text("resource", resource, allow_empty=True)
    clean = check_details(details)
    if checkpoint_every is not None:
        check_checkpoint_every(checkpoint_every)
    now = clock()
    seq, prev = _lock_head(session, tenant, now)
    body: dict[str, Any] = {
        "format": RECORD_FORMAT,
        "tenant": tenant,
        "seq": seq,
        "timestamp": format_timestamp(now),
        "actor": actor,
        "action": action,
        "resource": resource,
        "details": clean,
        "prev_hash": prev,
    }
    digest = record_hash(body)
    session.execute(
        insert(AuditRecordRow).values(
            tenant_id=tenant,
            seq=seq,
            format=RECORD_FORMAT,
            timestamp=body["timestamp"],
            actor=actor,
            action=action,
            resource=resource,
            details=canonical_json(clean).decode("utf-8"),
            prev_hash=prev,
            record_hash=digest,
        )
    )
    session.execute(
        update(AuditChainHead)
        .where(AuditChainHead.tenant_id == tenant)
        .values(length=seq + 1, head_hash=digest, updated_at=now)
    )
    length = seq + 1
    # The newest checkpoint can only be N or more records behind once the chain has N.
    if checkpoint_every is not None and length >= checkpoint_every:
        newest = newest_checkpoint_length(session, tenant=tenant, at_most=length)
        if checkpoint_due(length, newest, checkpoint_every):
            if signer is None:
                raise AuditError("a checkpoint is due but no signer was given")
            _insert_checkpoint(session, tenant, length, digest, signer, now)
    return AuditRecord(
        tenant=tenant,
        seq=seq,
        timestamp=body["timestamp"],
        actor=actor,
        action=action,
        resource=resource,
        details=clean,
        prev_hash=prev,
        record_hash=digest,
    )


def newest_checkpoint_length(session: Session, *, tenant: str, at_most: int | None = None) -> int:
    """Length covered by ``tenant``'s newest checkpoint (0 when there is none).

    One indexed query on ``audit_checkpoints (tenant_id, length)``. ``at_most`` ignores
    rows claiming more records than the chain holds (only a tampered database has any).
    """
    query = select(func.max(AuditCheckpointRow.length)).where(AuditCheckpointRow.tenant_id == tenant)
    if at_most is not None:
        query = query.where(AuditCheckpointRow.length <= at_most)
    value = session.execute(query).scalar_one_or_none()
    return int(value or 0)


def _insert_checkpoint(
    session: Session, tenant: str, length: int, head_hash: str, signer: CheckpointSigner, now: Any
) -> Checkpoint:
    key_id = signer.verifying_key().key_id
    check_text("key_id", key_id)
    unsigned = Checkpoint(
        tenant=tenant,
        length=length,
        head_hash=head_hash,
        timestamp=format_timestamp(now),
        key_id=key_id,
        signature=b"",
    )
    signature = signer.sign(unsigned.signed_bytes(), context=CHECKPOINT_CONTEXT)
    row = AuditCheckpointRow(
        tenant_id=tenant,
        format=CHECKPOINT_FORMAT,
        length=length,
        head_hash=head_hash,
        timestamp=unsigned.timestamp,
        key_id=key_id,
        signature=bytes(signature),
    )
    session.add(row)
    session.flush()
    return _checkpoint_from_row(row)


def create_checkpoint(
    session: Session, *, tenant: str, signer: CheckpointSigner, clock: Clock = utcnow
) -> Checkpoint:
    """Sign a checkpoint of ``tenant``'s chain as it is now, inside the caller's transaction.

    If the newest checkpoint already covers the current length with the same key, that
    checkpoint is returned instead of signing a duplicate.

    Raises:
        AuditError: Unknown tenant.
    """
    check_text("tenant", tenant)
    now = clock()
    length, head = _lock_head(session, tenant, now)
    key_id = signer.verifying_key().key_id
    latest = newest_checkpoint(session, tenant=tenant)
    if (
        latest is not None
        and latest.length == length
        and latest.key_id == key_id
        and latest.head_hash == head
    ):
        return latest
    return _insert_checkpoint(session, tenant, length, head, signer, now)


def _checkpoint_from_row(row: AuditCheckpointRow) -> Checkpoint:
    return Checkpoint(
        tenant=row.tenant_id,
        length=int(row.length),
        head_hash=row.head_hash,
        timestamp=row.timestamp,
        key_id=row.key_id,
        signature=bytes(row.signature),
        id=row.id,
        format=row.format,
    )


def newest_checkpoint(session: Session, *, tenant: str) -> Checkpoint | None:
    """Return ``tenant``'s checkpoint covering the most records (the newest of those), or None.

    This reads; it does not verify the signature.
    """
    row = session.execute(
        select(AuditCheckpointRow)
        .where(AuditCheckpointRow.tenant_id == tenant)
        .order_by(AuditCheckpointRow.length.desc(), AuditCheckpointRow.id.desc())
        .limit(1)
    ).scalar_one_or_none()
    return None if row is None else _checkpoint_from_row(row)


def list_checkpoints(session: Session, *, tenant: str) -> list[Checkpoint]:
    """Return ``tenant``'s checkpoints, oldest first."""
    rows = session.execute(
        select(AuditCheckpointRow)
        .where(AuditCheckpointRow.tenant_id == tenant)
        .order_by(AuditCheckpointRow.length, AuditCheckpointRow.id)
    ).scalars()
    return [_checkpoint_from_row(row) for row in rows]


_RECORD_COLUMNS = (
    AuditRecordRow.tenant_id,
    AuditRecordRow.seq,
    AuditRecordRow.format,
    AuditRecordRow.timestamp,
    AuditRecordRow.actor,
    AuditRecordRow.action,
    AuditRecordRow.resource,
    AuditRecordRow.details,
    AuditRecordRow.prev_hash,
    AuditRecordRow.record_hash,
)


def _record_from_row(row: Any) -> AuditRecord:
    details = parse_json_strict(row.details)
    if not isinstance(details, dict):
        raise AuditError("stored details are not a JSON object")
    return AuditRecord(
        tenant=row.tenant_id,
        seq=int(row.seq),
        timestamp=row.timestamp,
        actor=row.actor,
        action=row.action,
        resource=row.resource,
        details=details,
        prev_hash=row.prev_hash,
        record_hash=row.record_hash,
        format=row.format,
    )


def _iter_rows(session: Session, tenant: str, start: int = 0) -> Iterator[Any]:
    query = (
        select(*_RECORD_COLUMNS)
        .where(AuditRecordRow.tenant_id == tenant, AuditRecordRow.seq >= start)
        .order_by(AuditRecordRow.seq)
        .execution_options(yield_per=1000)
    )
    yield from session.execute(query)


def iter_records(session: Session, *, tenant: str, start: int = 0) -> Iterator[AuditRecord]:
    """Yield ``tenant``'s records in ``seq`` order from ``start`` (streamed, constant memory).

    This reads; it does not verify. Use :func:`tensafe.audit.verify_chain` for that.
    """
    for row in _iter_rows(session, tenant, start):
        yield _record_from_row(row)


def latest_records(session: Session, *, tenant: str, limit: int = 20) -> list[AuditRecord]:
    """Return the newest ``limit`` records of ``tenant`` in ``seq`` order."""
    if limit < 1:
        raise AuditError("limit must be at least 1")
    rows = session.execute(
        select(*_RECORD_COLUMNS)
        .where(AuditRecordRow.tenant_id == tenant)
        .order_by(AuditRecordRow.seq.desc())
        .limit(limit)
    ).all()
    return [_record_from_row(row) for row in reversed(rows)]


def audited_tenants(session: Session) -> list[str]:
    """Return every tenant that has audit records, a chain head or checkpoints, sorted."""
    found: set[str] = set()
    for column in (AuditChainHead.tenant_id, AuditRecordRow.tenant_id, AuditCheckpointRow.tenant_id):
        found.update(session.execute(select(column).distinct()).scalars())
    return sorted(found)


def _retryable(exc: DBAPIError) -> bool:
    orig = exc.orig
    sqlstate = getattr(orig, "sqlstate", None)
    if sqlstate in ("40001", "40P01"):  # serialization failure, deadlock
        return True
    text = str(orig).lower()
    if isinstance(exc, IntegrityError):
        # A duplicate (tenant_id, seq) means another appender won a race; try again.
        return sqlstate == "23505" or "unique constraint failed: audit_records" in text
    return "database is locked" in text or "database is busy" in text


class AuditLog:
    """The audit log of a deployment: self-contained appends with retries and checkpoints.

    Example::

        log = AuditLog(session_factory, signer=deployment_key, checkpoint_every=1000)
        log.append(tenant="acme", actor="user:42", action="keys.rotate", resource="kek/7",
                   details={"old_key_id": "…", "new_key_id": "…"})
    """

    def __init__(
        self,
        session_factory: sessionmaker[Session],
        *,
        signer: CheckpointSigner | None,
        checkpoint_every: int | None = DEFAULT_CHECKPOINT_EVERY,
        clock: Clock = utcnow,
        max_attempts: int = 20,
    ) -> None:
        """Create the log.

        Args:
            session_factory: Sessions on a migrated database.
            signer: The deployment's signing key (or a signer backed by an HSM/KMS).
                Required for checkpoints; ``signer=None, checkpoint_every=None`` runs
                without any, for tests and tools only: such a chain verifies only while
                fewer than the verifier's interval of records are unsigned.
            checkpoint_every: The interval ``N``: a checkpoint is signed whenever an append
                leaves ``N`` records after a tenant's newest checkpoint (see
                :func:`append_record`); use the deployment's ``TS_AUDIT_CHECKPOINT_EVERY``.
            clock: Returns the current time (timezone-aware).
            max_attempts: Attempts per append when the database reports a transient
                lock conflict.

        Raises:
            AuditError: Periodic checkpoints were asked for without a signer.
        """
        if checkpoint_every is not None:
            check_checkpoint_every(checkpoint_every)
        if checkpoint_every is not None and signer is None:
            raise AuditError(
                "periodic checkpoints need a signer: pass the deployment signing key, or "
                "checkpoint_every=None to disable checkpoints explicitly"
            )
        self._sessions = session_factory
        self._signer = signer
        self._every = checkpoint_every
        self._clock = clock
        self._attempts = max(1, max_attempts)

    def _retry(self, what: str, func: Callable[[Session], Any]) -> Any:
        for attempt in range(1, self._attempts + 1):
            try:
                with self._sessions.begin() as session:
                    return func(session)
            except (OperationalError, IntegrityError) as exc:
                if attempt < self._attempts and _retryable(exc):
                    time.sleep(random.uniform(0, min(0.2, 0.005 * 2**attempt)))  # noqa: S311
                    continue
                if _retryable(exc):
                    raise AuditError(
                        f"could not {what} after {attempt} attempts: the database stayed busy"
                    ) from exc
                raise AuditError(f"could not {what}: {str(exc.orig).splitlines()[0]}") from exc
        raise AssertionError("unreachable")  # pragma: no cover

    def append(
        self,
        *,
        tenant: str,
        actor: str,
        action: str,
        resource: str = "",
        details: Mapping[str, Any] | None = None,
    ) -> AuditRecord:
        """Append a record in its own transaction (see :func:`append_record`)."""
        record: AuditRecord = self._retry(
            "append an audit record",
            lambda session: append_record(
                session,
                tenant=tenant,
                actor=actor,
                action=action,
                resource=resource,
                details=details,
                signer=self._signer,
                checkpoint_every=self._every,
                clock=self._clock,
            ),
        )
        return record

    def checkpoint(self, *, tenant: str) -> Checkpoint:
        """Sign a checkpoint of ``tenant``'s chain now (see :func:`create_checkpoint`)."""
        if self._signer is None:
            raise AuditError("this AuditLog has no signer: checkpoints cannot be created")
        signer = self._signer
        checkpoint: Checkpoint = self._retry(
            "create an audit checkpoint",
            lambda session: create_checkpoint(session, tenant=tenant, signer=signer, clock=self._clock),
        )
        return checkpoint
