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
from tensafe.audit.interval import (
    CHECKPOINT_EVERY_ENV,
    DEFAULT_CHECKPOINT_EVERY,
    check_checkpoint_every,
    interval_violation,
)
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

__all__ = [
    "ChainVerifier",
    "VerificationReport",
    "VerifyingKeys",
    "check_signature",
    "key_map",
    "verify_chain",
]

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
            signed); non-zero only when verification allowed it, and always below
            ``checkpoint_every``.
        checkpoint_every: The interval ``N`` the chain was checked against.
        known_length: Length of the known head (kept off-box) the chain was found to
            contain, or None when none was given.
    """

    tenant: str
    length: int
    head_hash: str
    checkpoints: int
    signed_length: int
    unsigned_tail: int
    checkpoint_every: int = DEFAULT_CHECKPOINT_EVERY
    known_length: int | None = None

    def summary(self) -> str:
        """One line for humans."""
        tail = f", {self.unsigned_tail} after it not yet signed" if self.unsigned_tail else ""
        known = (
            f"; contains the known head of length {self.known_length}"
            if self.known_length is not None
            else ""
        )
        return (
            f"tenant {self.tenant!r}: {self.length} records intact, {self.checkpoints} signed "
            f"checkpoints (newest covers {self.signed_length}{tail}; at most "
            f"{self.checkpoint_every} records between checkpoints){known}"
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


def check_signature(
    checkpoint: Checkpoint,
    keys: Mapping[str, CheckpointVerifier],
    *,
    tenant: str,
    label: str | None = None,
) -> None:
    """Check a checkpoint's format, tenant and signature with one of ``keys``.

    Raises:
        AuditVerificationError: Unknown format, another tenant's checkpoint, a key that
            is not among ``keys``, or an invalid signature (forged or modified).
    """
    label = label or checkpoint.label
    if checkpoint.format != CHECKPOINT_FORMAT:
        raise AuditVerificationError(f"{label} has unknown format {checkpoint.format!r}", tenant=tenant)
    if checkpoint.tenant != tenant:
        raise AuditVerificationError(f"{label} belongs to tenant {checkpoint.tenant!r}", tenant=tenant)
    key = keys.get(checkpoint.key_id)
    if key is None:
        raise AuditVerificationError(
            f"{label} is signed by key {checkpoint.key_id}, which is not among the given "
            f"public keys ({', '.join(sorted(keys)) or 'none'}): pass the right --public-key",
            tenant=tenant,
        )
    try:
        message = checkpoint.signed_bytes()
        key.verify(checkpoint.signature, message, context=CHECKPOINT_CONTEXT)
    except Exception:  # fail closed: any failure to verify is a bad signature
        raise AuditVerificationError(
            f"{label} has an invalid signature (forged or modified)", tenant=tenant
        ) from None


class ChainVerifier:
    """Streams one tenant's records through the chain checks.

    Construct it with the tenant's checkpoints (their signatures are checked at once),
    :meth:`feed` every record in ``seq`` order, then call :meth:`finish`.
    """

    def __init__(
        self,
        tenant: str,
        checkpoints: Sequence[Checkpoint],
        keys: Mapping[str, CheckpointVerifier],
        *,
        checkpoint_every: int = DEFAULT_CHECKPOINT_EVERY,
        known_head: Checkpoint | None = None,
    ) -> None:
        """Check every checkpoint's format, tenant and signature (and the known head's).

        Args:
            tenant: The tenant whose chain is fed.
            checkpoints: The chain's checkpoints, as stored.
            keys: The deployment's public key(s) by key id.
            checkpoint_every: The interval ``N`` of the interval rule.
            known_head: A signed checkpoint of this chain kept outside the database; the
                chain must contain it (detects a rollback to an earlier valid state).

        Raises:
            AuditVerificationError: A checkpoint or the known head is malformed, signed by
                an unknown key or its signature does not verify (forged or modified).
            AuditError: ``checkpoint_every`` is not a positive integer.
        """
        self.tenant = tenant
        self.checkpoint_every = check_checkpoint_every(checkpoint_every)
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
        self._known = known_head
        if known_head is not None:
            self._check_signature(known_head, keys, label=_known_label(known_head))
            if known_head.length == 0 and known_head.head_hash != GENESIS_HASH:
                raise AuditVerificationError(
                    f"{_known_label(known_head)} is for an empty chain but names a non-genesis head",
                    tenant=tenant,
                )

    def _check_signature(
        self, checkpoint: Checkpoint, keys: Mapping[str, CheckpointVerifier], *, label: str | None = None
    ) -> None:
        check_signature(checkpoint, keys, tenant=self.tenant, label=label)

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
        first = self._last_matched
        known = self._known
        if known is not None and known.length == self.length and known.head_hash != self.head_hash:
            raise self._fail(
                first,
                f"the chain does not contain {_known_label(known)}: records seq {first}..{self.length - 1} "
                "were rewritten after that head was exported (database rewritten or replaced)",
            )
        for checkpoint in self._by_length.get(self.length, []):
            if checkpoint.head_hash != self.head_hash:
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
            allow_unsigned_tail: Accept records after the newest checkpoint (always fewer
                than the interval: the interval rule applies either way).
            check_head: Compare with the database's chain-head row (not for bundles).
            head: ``(length, head_hash)`` of that row, or None when it is missing.

        Raises:
            AuditVerificationError: The tail was truncated, the chain is shorter than the
                known head (rollback), the head row disagrees, the interval rule is broken,
                or (unless allowed) records are not covered by a signed checkpoint.
        """
        signed = max((c.length for c in self._checkpoints), default=0)
        if signed > self.length:
            newest = max(self._checkpoints, key=lambda c: c.length)
            raise self._fail(
                self.length,
                f"the log ends after {self.length} records but signed {newest.label} covers {signed}: "
                f"the tail was truncated (records seq {self.length}..{signed - 1} are missing)",
            )
        known = self._known
        if known is not None and known.length > self.length:
            raise self._fail(
                self.length,
                f"the chain holds {self.length} records but {_known_label(known)} covers "
                f"{known.length}: the log was rolled back or truncated (records seq "
                f"{self.length}..{known.length - 1} are missing)",
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
        every = self.checkpoint_every
        gap = interval_violation((c.length for c in self._checkpoints), self.length, every)
        if gap is not None and gap.tail:
            raise self._fail(
                gap.start,
                f"records seq {gap.start}..{gap.end - 1} ({gap.end - gap.start} records) follow the newest "
                f"signed checkpoint, but at most {every - 1} may: the newest checkpoints were deleted and "
                f"these records may have been rewritten (or the log was written with an interval larger "
                f"than {every}: verify with the deployment's {CHECKPOINT_EVERY_ENV})",
            )
        if gap is not None:
            raise self._fail(
                gap.start,
                f"records seq {gap.start}..{gap.end - 1} ({gap.end - gap.start} records) lie between "
                f"signed checkpoints of length {gap.start} and {gap.end}, more than the interval of "
                f"{every} allows: a checkpoint was deleted (or the log was written with a larger "
                f"interval: verify with the deployment's {CHECKPOINT_EVERY_ENV})",
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
            checkpoint_every=every,
            known_length=None if known is None else known.length,
        )


def _known_label(head: Checkpoint) -> str:
    return f"the known head (length {head.length}, signed {head.timestamp})"


def verify_chain(
    session: Session,
    *,
    tenant: str,
    verifying_key: VerifyingKeys,
    checkpoint_every: int = DEFAULT_CHECKPOINT_EVERY,
    allow_unsigned_tail: bool = False,
    known_head: Checkpoint | None = None,
) -> VerificationReport:
    """Verify ``tenant``'s chain in the database, with every checkpoint.

    Checks, in order: each checkpoint's signature (with the given public key(s)), and the
    known head's; each record's format, hash and link to its predecessor, with no gaps
    from seq 0; that each checkpoint's head hash (and the known head's) is the chain's
    hash at its length; that no checkpoint covers more records than exist (tail
    truncation); that the chain is not shorter than the known head (rollback); that the
    chain-head row agrees; the interval rule for ``checkpoint_every`` (see
    :mod:`tensafe.audit.interval`); and, unless ``allow_unsigned_tail``, that the newest
    checkpoint covers every record.

    On PostgreSQL the chain-head row is held with ``FOR SHARE`` until the caller's
    transaction ends, so that concurrent appends cannot make the view inconsistent.

    Args:
        session: An open session.
        tenant: The tenant to verify.
        verifying_key: The deployment's checkpoint public key, or several (rotation).
        checkpoint_every: The deployment's interval ``N`` (``TS_AUDIT_CHECKPOINT_EVERY``):
            at most ``N`` records between consecutive checkpoints, fewer after the newest.
        allow_unsigned_tail: Accept records after the newest checkpoint (fewer than
            ``checkpoint_every``; they are protected only by the hash chain).
        known_head: A signed checkpoint of this tenant kept outside the database
            (:func:`tensafe.audit.load_head`); the chain must contain it.

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
    verifier = ChainVerifier(
        tenant,
        list_checkpoints(session, tenant=tenant),
        keys,
        checkpoint_every=checkpoint_every,
        known_head=known_head,
    )
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
