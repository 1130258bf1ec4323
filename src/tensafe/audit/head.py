"""Signed heads: a tenant's newest checkpoint, exported and kept outside the database.

Someone with write access to the database can roll a tenant's whole log back to an earlier
*valid* state: delete the newest records together with the checkpoints that cover them (or
restore an older copy of the database). What remains verifies, because it is exactly what
the log was at that time. The defence is a *known head* kept where the database writer
cannot reach: the signed newest checkpoint, exported (``tensafe audit head``,
``GET /api/v1/tensafe/audit/head``) and stored by the customer or on write-once storage.
Verification with the known head fails when the chain is shorter than the head (rollback)
or does not contain it (rewrite).

Head file format (docs/audit.md, "Known heads"): one JSON object, the checkpoint's JSON form
as in export bundles::

    {"format": "tensafe.audit.checkpoint/v1", "tenant": "acme", "length": 1200,
     "head_hash": "<64 hex>", "timestamp": "2026-...Z", "key_id": "<key id>",
     "signature": "<standard base64 of the hybrid signature>"}
"""

from __future__ import annotations

import json
import os
from dataclasses import dataclass
from pathlib import Path

from sqlalchemy import select
from sqlalchemy.orm import Session

from tensafe._fsutil import atomic_write_bytes
from tensafe.audit.bundle import checkpoint_json, parse_checkpoint_json
from tensafe.audit.canonical import parse_json_strict
from tensafe.audit.errors import AuditError
from tensafe.audit.log import (
    _RECORD_COLUMNS,
    Clock,
    _record_from_row,
    create_checkpoint,
    newest_checkpoint,
)
from tensafe.audit.models import AuditChainHead, AuditRecordRow
from tensafe.audit.records import CHECKPOINT_FORMAT, GENESIS_HASH, Checkpoint, check_hash, check_text
from tensafe.audit.signer import CheckpointSigner
from tensafe.audit.verify import VerifyingKeys, check_signature, key_map
from tensafe.db import utcnow

__all__ = [
    "MAX_HEAD_BYTES",
    "SignedHead",
    "head_bytes",
    "known_head_problem",
    "load_head",
    "signed_head",
    "verify_head",
    "write_head",
]

#: Largest head file :func:`load_head` reads (bytes); a head is about 5 KiB.
MAX_HEAD_BYTES = 256 * 1024


@dataclass(frozen=True)
class SignedHead:
    """The newest signed checkpoint of a tenant, and how much of the chain it covers.

    Attributes:
        checkpoint: The checkpoint (with its signature).
        chain_length: The chain's length when it was read.
        created: Whether it was signed just now because records followed the newest one.
    """

    checkpoint: Checkpoint
    chain_length: int
    created: bool

    @property
    def unsigned(self) -> int:
        """Records after the checkpoint (not covered by it)."""
        return self.chain_length - self.checkpoint.length


def _chain_length(session: Session, tenant: str) -> int | None:
    value = session.execute(
        select(AuditChainHead.length).where(AuditChainHead.tenant_id == tenant)
    ).scalar_one_or_none()
    return None if value is None else int(value)


def signed_head(
    session: Session, *, tenant: str, signer: CheckpointSigner | None, clock: Clock = utcnow
) -> SignedHead:
    """Return ``tenant``'s newest signed checkpoint, signing one first if records follow it.

    With a ``signer``, a checkpoint of the chain as it is now is signed when the newest
    one does not cover every record (:func:`tensafe.audit.create_checkpoint`, inside the
    caller's transaction). Without one, the newest existing checkpoint is returned and
    :attr:`SignedHead.unsigned` says how many records follow it.

    This reads the checkpoint as stored; verify it (:func:`verify_head`) with the
    deployment's public key before relying on it.

    Raises:
        AuditError: Unknown tenant, or no signer and no checkpoint yet.
    """
    check_text("tenant", tenant)
    newest = newest_checkpoint(session, tenant=tenant)
    length = _chain_length(session, tenant) or 0
    if signer is not None and (newest is None or newest.length != length):
        created = create_checkpoint(session, tenant=tenant, signer=signer, clock=clock)
        return SignedHead(created, created.length, True)
    if newest is None:
        raise AuditError(
            f"tenant {tenant!r} has no signed checkpoint yet: sign one with the deployment key first"
        )
    return SignedHead(newest, max(length, newest.length), False)


def head_bytes(checkpoint: Checkpoint) -> bytes:
    """The head file for ``checkpoint``: its JSON form, keys sorted, with a final newline."""
    return (json.dumps(checkpoint_json(checkpoint), sort_keys=True, indent=2) + "\n").encode("utf-8")


def write_head(checkpoint: Checkpoint, out: str | os.PathLike[str]) -> None:
    """Write the head file atomically (temporary file, fsync, rename).

    Raises:
        AuditError: The file cannot be written.
    """
    try:
        atomic_write_bytes(Path(out), head_bytes(checkpoint))
    except OSError as exc:
        raise AuditError(f"cannot write {out}: {exc.strerror}") from None


def load_head(data: bytes) -> Checkpoint:
    """Parse a head file strictly (not yet verified: see :func:`verify_head`).

    Raises:
        AuditError: Too large, not strict JSON, missing or unknown fields, bad values, or
            not a checkpoint of this format version.
    """
    if not isinstance(data, bytes | bytearray):
        raise AuditError("a head must be given as bytes")
    if len(data) > MAX_HEAD_BYTES:
        raise AuditError(f"head file is larger than {MAX_HEAD_BYTES} bytes")
    head = parse_checkpoint_json(parse_json_strict(bytes(data)), "head file")
    if head.format != CHECKPOINT_FORMAT:
        raise AuditError(f"not a TenSafe audit head (format must be {CHECKPOINT_FORMAT!r})")
    return head


def verify_head(head: Checkpoint, *, verifying_key: VerifyingKeys, tenant: str | None = None) -> None:
    """Check a head's signature with the deployment's public key(s) (and its tenant).

    The public key must come from the operator through a channel the server does not
    control (``tensafe keys export-public-key``, compared by ``key_id``): a key the
    server hands out proves nothing.

    Raises:
        AuditVerificationError: Forged or modified head, a key not among the given ones,
            or the head of another tenant.
    """
    keys = key_map(verifying_key)
    label = f"the known head (length {head.length}, signed {head.timestamp})"
    check_signature(head, keys, tenant=head.tenant if tenant is None else tenant, label=label)


def known_head_problem(session: Session, *, tenant: str, length: int, head_hash: str) -> str | None:
    """Compare a known head ``(length, head_hash)`` with the stored chain in O(1).

    Reads the chain-head row and record ``length - 1`` only, and checks that the record
    is stored, hashes to its ``record_hash`` and that this equals ``head_hash``. This is
    the check the API server makes on every ``/audit/verify`` call with a known head; the
    full re-verification of the chain (:func:`tensafe.audit.verify_chain` with
    ``known_head=``) also recomputes every hash before it.

    Returns:
        None when the chain contains the head, else why not (rollback or rewrite).

    Raises:
        AuditError: ``length`` or ``head_hash`` is malformed.
    """
    if isinstance(length, bool) or not isinstance(length, int) or length < 0:
        raise AuditError("the known head's length must be a non-negative integer")
    check_hash("head_hash", head_hash)
    if length == 0:
        if head_hash != GENESIS_HASH:
            return "a known head of length 0 must name the genesis hash"
        return None
    row = session.execute(
        select(*_RECORD_COLUMNS).where(AuditRecordRow.tenant_id == tenant, AuditRecordRow.seq == length - 1)
    ).first()
    if row is None:
        held = _chain_length(session, tenant) or 0
        return (
            f"the chain holds {held} records but your known head covers {length}: "
            "the log was rolled back or truncated"
        )
    try:
        record = _record_from_row(row)
        computed = record.computed_hash()
    except AuditError:
        computed = ""
    if row.record_hash != head_hash or computed != head_hash:
        return (
            f"the chain does not contain your known head (length {length}): records before seq "
            f"{length} were rewritten after you kept it (database rewritten or replaced)"
        )
    return None
