"""Verification of a tenant's audit chain and its signed checkpoints.

The same :class:`ChainVerifier` checks records streamed from the database and records
read from an export bundle, so both give the same answer for the same data.
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass
from typing import Any

from sqlalchemy import select
from sqlalchemy.orm import Session

from tensafe.audit.errors import AuditError, AuditVerificationError
from tensafe.audit.log import _iter_rows, _record_from_row, list_checkpoints
from tensafe.audit.models import AuditChainHead
from tensafe.audit.records import (
    CHECKPOINT_CONTEXT,
    CHECKPOINT_FORMAT,
    GENESIS_HASH,
    RECORD_FORMAT,
    AuditRecord,
    Checkpoint,
)
from tensafe.audit.signer import CheckpointVerifier

__all__ = ["ChainVerifier", "VerificationReport", "VerifyingKeys", "verify_chain"]

#: One public key, or several (for checkpoints signed before and after a key rotation).
VerifyingKeys = CheckpointVerifier | Iterable[CheckpointVerifier]

_NO_KEY = (
    "checkpoint signatures cannot be verified without the deployment's signing public key: "
    "pass --public-key PUB (verifying_key=...)"
)


@dataclass(frozen=True)
class VerificationReport:
    """What a successful verification established.

    Attributes:
        tenant: The tenant.
        length: Number of records in the chain.
        head_hash: ``record_hash`` of the last record (the genesis hash when empty).
        checkpoints: Number of checkpoints whose signature and position were checked.
        signed_length: Records covered by the newest checkpoint.
        unsigned_tail: Records after the newest checkpoint (only hash-chained, not yet
            signed); non-zero only when verification allowed it.
    """

    tenant: str
    length: int
    head_hash: str
    checkpoints: int
    signed_length: int
    unsigned_tail: int

    def summary(self) -> str:
        """One line for humans."""
        tail = f", {self.unsigned_tail} after it not yet signed" if self.unsigned_tail else ""
        return (
            f"tenant {self.tenant!r}: {self.length} records intact, {self.checkpoints} signed "
            f"checkpoints (newest covers {self.signed_length}{tail})"
        )


def key_map(verifying_key: VerifyingKeys | None) -> dict[str, CheckpointVerifier]:
    """Index the given public key(s) by key id; fail closed when none is given."""
    if verifying_key is None:
        raise AuditVerificationError(_NO_KEY)
    keys: list[Any]
    if isinstance(verifying_key, CheckpointVerifier):
        keys = [verifying_key]
    else:
        keys = list(verifying_key)
    if not keys:
        raise AuditVerificationError(_NO_KEY)
    result: dict[str, CheckpointVerifier] = {}
    for key in keys:
        if not isinstance(key, CheckpointVerifier):
            raise AuditError("verifying keys must have key_id and verify() (e.g. HybridVerifyingKey)")
        result[key.key_id] = key
    return result


class ChainVerifier:
    """Streams one tenant's records through the chain checks.

    Construct it with the tenant's checkpoints (their signatures are checked at once),
    :meth:`feed` every record in ``seq`` order, then call :meth:`finish`.
    """

    def __init__(
        self, tenant: str, checkpoints: Sequence[Checkpoint], keys: Mapping[str, CheckpointVerifier]
    ) -> None:
        """Check every checkpoint's format, tenant and signature.

        Raises:
            AuditVerificationError: A checkpoint is malformed, signed by an unknown key or
                its signature does not verify (forged or modified).
        """
        self.tenant = tenant
        self._by_length: dict[int, list[Checkpoint]] = {}
        for checkpoint in checkpoints:
            self._check_signature(checkpoint, keys)
            self._by_length.setdefault(checkpoint.length, []).append(checkpoint)
        self._checkpoints = list(checkpoints)
        self.length = 0
        self.head_hash = GENESIS_HASH
        self._last_matched = 0
        for checkpoint in self._by_length.get(0, []):
            if checkpoint.head_hash != GENESIS_HASH:
                raise AuditVerificationError(
                    f"{checkpoint.label} is for an empty chain but names a non-genesis head",
                    tenant=tenant,
                )

    def _check_signature(self, checkpoint: Checkpoint, keys: Mapping[str, CheckpointVerifier]) -> None:
        if checkpoint.format != CHECKPOINT_FORMAT:
            raise AuditVerificationError(
                f"{checkpoint.label} has unknown format {checkpoint.format!r}", tenant=self.tenant
            )
        if checkpoint.tenant != self.tenant:
            raise AuditVerificationError(
                f"{checkpoint.label} belongs to tenant {checkpoint.tenant!r}", tenant=self.tenant
            )
        key = keys.get(checkpoint.key_id)
        if key is None:
            raise AuditVerificationError(
                f"{checkpoint.label} is signed by key {checkpoint.key_id}, which is not among the given "
                f"public keys ({', '.join(sorted(keys)) or 'none'}): pass the right --public-key",
                tenant=self.tenant,
            )
        try:
            message = checkpoint.signed_bytes()
            key.verify(checkpoint.signature, message, context=CHECKPOINT_CONTEXT)
        except Exception:  # fail closed: any failure to verify is a bad signature
            raise AuditVerificationError(
                f"{checkpoint.label} has an invalid signature (forged or modified checkpoint)",
                tenant=self.tenant,
            ) from None

    def _fail(self, seq: int, reason: str) -> AuditVerificationError:
        return AuditVerificationError(reason, tenant=self.tenant, seq=seq)

    def feed(self, record: AuditRecord) -> None:
        """Check the next record.

        Raises:
            AuditVerificationError: Naming the record's seq and why it is bad.
        """
        expected = self.length
        if record.seq > expected:
            raise self._fail(
                expected,
                f"record seq {expected} is missing (deleted); the next one present is seq {record.seq}",
            )
        if record.seq < expected:
            raise self._fail(record.seq, "record appears twice or out of order")
        if record.tenant != self.tenant:
            raise self._fail(expected, f"record belongs to tenant {record.tenant!r}")
        if record.format != RECORD_FORMAT:
            raise self._fail(expected, f"record has unknown format {record.format!r}")
        try:
            computed = record.computed_hash()
        except AuditError as exc:
            raise self._fail(expected, f"record cannot be canonicalised ({exc})") from None
        if computed != record.record_hash:
            raise self._fail(expected, "record_hash does not match the record's contents (record modified)")
        if record.prev_hash != self.head_hash:
            raise self._fail(
                expected,
                "prev_hash does not match the previous record's hash "
                "(a record was inserted, removed or replaced before it)",
            )
        self.length += 1
        self.head_hash = record.record_hash
        for checkpoint in self._by_length.get(self.length, []):
            if checkpoint.head_hash != self.head_hash:
                first = self._last_matched
                raise self._fail(
                    first,
                    f"the chain does not match signed {checkpoint.label}: records seq {first}.."
                    f"{self.length - 1} were rewritten",
                )
            self._last_matched = self.length

    def finish(
        self, *, allow_unsigned_tail: bool, check_head: bool = False, head: tuple[int, str] | None = None
    ) -> VerificationReport:
        """Run the end-of-chain checks and return the report.

        Args:
            allow_unsigned_tail: Accept records after the newest checkpoint.
            check_head: Compare with the database's chain-head row (not for bundles).
            head: ``(length, head_hash)`` of that row, or None when it is missing.

        Raises:
            AuditVerificationError: The tail was truncated, the head row disagrees, or
                (unless allowed) records are not covered by a signed checkpoint.
        """
        signed = max((c.length for c in self._checkpoints), default=0)
        if signed > self.length:
            newest = max(self._checkpoints, key=lambda c: c.length)
            raise self._fail(
                self.length,
                f"the log ends after {self.length} records but signed {newest.label} covers {signed}: "
                f"the tail was truncated (records seq {self.length}..{signed - 1} are missing)",
            )
        if check_head and head is None and self.length > 0:
            raise self._fail(0, f"the chain-head row is missing but {self.length} records exist (tampered)")
        if check_head and head is not None and head != (self.length, self.head_hash):
            recorded, _ = head
            raise self._fail(
                min(recorded, self.length),
                f"the chain head records {recorded} entries but the log holds {self.length} with a "
                "different head: the tail was truncated or records were added outside tensafe.audit",
            )
        if self.length > signed and not allow_unsigned_tail:
            raise self._fail(
                signed,
                f"records seq {signed}..{self.length - 1} are not covered by a signed checkpoint: "
                "create one (tensafe audit checkpoint) or pass --allow-unsigned-tail",
            )
        return VerificationReport(
            tenant=self.tenant,
            length=self.length,
            head_hash=self.head_hash,
            checkpoints=len(self._checkpoints),
            signed_length=signed,
            unsigned_tail=self.length - signed,
        )


def verify_chain(
    session: Session,
    *,
    tenant: str,
    verifying_key: VerifyingKeys,
    allow_unsigned_tail: bool = False,
) -> VerificationReport:
    """Verify ``tenant``'s chain in the database, with every checkpoint.

    Checks, in order: each checkpoint's signature (with the given public key(s)); each
    record's format, hash and link to its predecessor, with no gaps from seq 0; that each
    checkpoint's head hash is the chain's hash at its length; that no checkpoint covers
    more records than exist (tail truncation); that the chain-head row agrees; and,
    unless ``allow_unsigned_tail``, that the newest checkpoint covers every record.

    On PostgreSQL the chain-head row is held with ``FOR SHARE`` until the caller's
    transaction ends, so that concurrent appends cannot make the view inconsistent.

    Args:
        session: An open session.
        tenant: The tenant to verify.
        verifying_key: The deployment's checkpoint public key, or several (rotation).
        allow_unsigned_tail: Accept records after the newest checkpoint (they are then
            protected only by the hash chain, not by a signature).

    Returns:
        The report of what was verified.

    Raises:
        AuditVerificationError: Naming the first bad record (seq and why) or checkpoint.
    """
    keys = key_map(verifying_key)
    head_row = session.execute(
        select(AuditChainHead.length, AuditChainHead.head_hash)
        .where(AuditChainHead.tenant_id == tenant)
        .with_for_update(read=True)
    ).first()
    verifier = ChainVerifier(tenant, list_checkpoints(session, tenant=tenant), keys)
    for row in _iter_rows(session, tenant):
        try:
            record = _record_from_row(row)
        except AuditError as exc:
            raise AuditVerificationError(
                f"stored record is malformed ({exc})", tenant=tenant, seq=int(row.seq)
            ) from None
        verifier.feed(record)
    head = None if head_row is None else (int(head_row.length), str(head_row.head_hash))
    return verifier.finish(allow_unsigned_tail=allow_unsigned_tail, check_head=True, head=head)
