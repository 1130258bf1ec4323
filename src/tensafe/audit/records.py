"""The versioned record and checkpoint formats and their hashing (see docs/audit.md).

A record's hash is ``SHA-256(b"tensafe/audit/record/v1\\x00" || canonical_json(body))``
where ``body`` holds every field except ``record_hash``. Each record names the previous
record's hash, so the records of one tenant form a hash chain starting from
:data:`GENESIS_HASH`. A checkpoint is a signed statement "tenant T's chain had N records
and its head hash was H at time t", signed over the canonical JSON of its body with the
signature context :data:`CHECKPOINT_CONTEXT`.
"""

from __future__ import annotations

import datetime as _dt
import re
from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any

from cryptography.hazmat.primitives import hashes

from tensafe.audit.canonical import canonical_json
from tensafe.audit.errors import AuditError

__all__ = [
    "CHECKPOINT_CONTEXT",
    "CHECKPOINT_FORMAT",
    "GENESIS_HASH",
    "RECORD_DOMAIN",
    "RECORD_FORMAT",
    "AuditRecord",
    "Checkpoint",
    "format_timestamp",
    "record_hash",
]

#: Format marker of every record of this version.
RECORD_FORMAT = "tensafe.audit/v1"
#: Domain-separation prefix hashed before a record's canonical bytes.
RECORD_DOMAIN = b"tensafe/audit/record/v1\x00"
#: ``prev_hash`` of a tenant's first record: 32 zero bytes, hex encoded.
GENESIS_HASH = "00" * 32
#: Format marker of checkpoint bodies.
CHECKPOINT_FORMAT = "tensafe.audit.checkpoint/v1"
#: Signature context (domain separation) for checkpoint signatures.
CHECKPOINT_CONTEXT = "tensafe/audit/checkpoint/v1"

_HEX64 = re.compile(r"[0-9a-f]{64}")
_TIMESTAMP = re.compile(r"\d{4}-\d{2}-\d{2}T\d{2}:\d{2}:\d{2}\.\d{6}Z")
_CONTROL = re.compile(r"[\x00-\x1f\x7f]")

#: Field limits (characters); the database columns have the same sizes.
LIMITS = {"tenant": 64, "actor": 256, "action": 128, "resource": 512, "key_id": 64}


def format_timestamp(moment: _dt.datetime) -> str:
    """Render a timezone-aware datetime as the record timestamp: RFC 3339, UTC, microseconds."""
    if moment.tzinfo is None:
        raise AuditError("audit timestamps need a timezone-aware datetime")
    return moment.astimezone(_dt.UTC).strftime("%Y-%m-%dT%H:%M:%S.%fZ")


def _sha256(data: bytes) -> str:
    digest = hashes.Hash(hashes.SHA256())
    digest.update(data)
    return digest.finalize().hex()


def check_text(name: str, value: object, *, allow_empty: bool = False) -> str:
    """Validate a short text field of a record or checkpoint; return it."""
    if not isinstance(value, str):
        raise AuditError(f"audit field {name!r} must be a string")
    if not value and not allow_empty:
        raise AuditError(f"audit field {name!r} must not be empty")
    if len(value) > LIMITS[name]:
        raise AuditError(f"audit field {name!r} is longer than {LIMITS[name]} characters")
    if _CONTROL.search(value):
        raise AuditError(f"audit field {name!r} must not contain control characters")
    return value


def check_hash(name: str, value: object) -> str:
    """Validate a lower-case hex SHA-256 value; return it."""
    if not isinstance(value, str) or not _HEX64.fullmatch(value):
        raise AuditError(f"audit field {name!r} must be 64 lower-case hex digits")
    return value


def check_timestamp(value: object) -> str:
    """Validate a record timestamp (``YYYY-MM-DDTHH:MM:SS.ffffffZ``); return it."""
    if not isinstance(value, str) or not _TIMESTAMP.fullmatch(value):
        raise AuditError("audit timestamp must look like 2026-01-31T12:00:00.000000Z")
    return value


def check_count(name: str, value: object) -> int:
    """Validate a non-negative integer (not a bool); return it."""
    if isinstance(value, bool) or not isinstance(value, int) or value < 0 or value > 2**53 - 1:
        raise AuditError(f"audit field {name!r} must be a non-negative integer")
    return value


@dataclass(frozen=True)
class AuditRecord:
    """One entry of a tenant's audit chain.

    Attributes:
        tenant: Tenant identifier.
        seq: Position in the tenant's chain, from 0 without gaps.
        timestamp: When it was appended (``YYYY-MM-DDTHH:MM:SS.ffffffZ``, UTC).
        actor: Who acted (user, service or API key *identifier*).
        action: What happened, as a dotted name (``keys.rotate``).
        resource: What it happened to (may be empty).
        details: JSON object of hashes, identifiers, counts, privacy spent.
        prev_hash: ``record_hash`` of record ``seq - 1`` (:data:`GENESIS_HASH` for seq 0).
        record_hash: Hash of this record (see :func:`record_hash`).
        format: :data:`RECORD_FORMAT`.
    """

    tenant: str
    seq: int
    timestamp: str
    actor: str
    action: str
    resource: str
    details: Mapping[str, Any] = field(repr=False)
    prev_hash: str
    record_hash: str
    format: str = RECORD_FORMAT

    def body(self) -> dict[str, Any]:
        """Return the hashed fields (everything but ``record_hash``) as a JSON object."""
        return {
            "format": self.format,
            "tenant": self.tenant,
            "seq": self.seq,
            "timestamp": self.timestamp,
            "actor": self.actor,
            "action": self.action,
            "resource": self.resource,
            "details": dict(self.details),
            "prev_hash": self.prev_hash,
        }

    def canonical_bytes(self) -> bytes:
        """Return the canonical JSON of :meth:`body`: the bytes that are hashed."""
        return canonical_json(self.body())

    def computed_hash(self) -> str:
        """Recompute this record's hash from its fields."""
        return record_hash(self.body())

    def to_json(self) -> dict[str, Any]:
        """Return the record as the JSON object used in export bundles."""
        return {**self.body(), "record_hash": self.record_hash}


def record_hash(body: Mapping[str, Any]) -> str:
    """Return ``SHA-256(RECORD_DOMAIN || canonical_json(body))`` as lower-case hex."""
    return _sha256(RECORD_DOMAIN + canonical_json(body))


@dataclass(frozen=True)
class Checkpoint:
    """A signed statement of a tenant's chain length and head hash.

    Attributes:
        tenant: Tenant identifier.
        length: Number of records covered (records ``0 .. length-1``).
        head_hash: ``record_hash`` of record ``length - 1`` (:data:`GENESIS_HASH` if 0).
        timestamp: When it was signed.
        key_id: Identifier of the signing key (``HybridVerifyingKey.key_id``).
        signature: Hybrid signature over :meth:`signed_bytes`.
        id: Database row id (None outside the database, e.g. in a bundle).
        format: :data:`CHECKPOINT_FORMAT`.
    """

    tenant: str
    length: int
    head_hash: str
    timestamp: str
    key_id: str
    signature: bytes = field(repr=False)
    id: int | None = None
    format: str = CHECKPOINT_FORMAT

    def body(self) -> dict[str, Any]:
        """Return the signed fields as a JSON object."""
        return {
            "format": self.format,
            "tenant": self.tenant,
            "length": self.length,
            "head_hash": self.head_hash,
            "timestamp": self.timestamp,
            "key_id": self.key_id,
        }

    def signed_bytes(self) -> bytes:
        """Return the canonical JSON of :meth:`body`: the signed message."""
        return canonical_json(self.body())

    @property
    def label(self) -> str:
        """A short name for messages: ``checkpoint #ID (length N)``."""
        ident = f"#{self.id} " if self.id is not None else ""
        return f"checkpoint {ident}(length {self.length})"
