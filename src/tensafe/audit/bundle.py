"""Export bundles: a tenant's records and checkpoints, verifiable offline with the public key.

Bundle format ``tensafe.audit.bundle/v1`` (a UTF-8 JSON object; see docs/audit.md)::

    {"format": "tensafe.audit.bundle/v1", "tenant": "...", "exported_at": "...Z",
     "public_key_ids": ["..."], "checkpoints": [{...checkpoint body..., "signature": "<base64>"}],
     "records": [{...record body..., "record_hash": "..."}]}

The parser is strict: unknown or missing fields, wrong types, floats, duplicate keys and
oversized input are refused with :class:`AuditError` (never another exception).
"""

from __future__ import annotations

import base64
import binascii
import json
import os
import tempfile
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from sqlalchemy import select
from sqlalchemy.orm import Session

from tensafe._fsutil import fsync_dir
from tensafe.audit.canonical import parse_json_strict
from tensafe.audit.errors import AuditError
from tensafe.audit.interval import DEFAULT_CHECKPOINT_EVERY
from tensafe.audit.log import _iter_rows, _record_from_row, list_checkpoints
from tensafe.audit.models import AuditChainHead
from tensafe.audit.records import (
    AuditRecord,
    Checkpoint,
    check_count,
    check_hash,
    check_text,
    check_timestamp,
    format_timestamp,
)
from tensafe.audit.verify import ChainVerifier, VerificationReport, VerifyingKeys, key_map
from tensafe.db import utcnow

__all__ = [
    "BUNDLE_FORMAT",
    "MAX_BUNDLE_BYTES",
    "AuditBundle",
    "checkpoint_json",
    "export_bundle",
    "load_bundle",
    "parse_checkpoint_json",
    "verify_bundle",
]

#: Format marker of export bundles.
BUNDLE_FORMAT = "tensafe.audit.bundle/v1"
#: Largest bundle :func:`load_bundle` reads (bytes).
MAX_BUNDLE_BYTES = 512 * 1024 * 1024

_TOP_FIELDS = frozenset({"format", "tenant", "exported_at", "public_key_ids", "checkpoints", "records"})
_RECORD_FIELDS = frozenset(
    {
        "format",
        "tenant",
        "seq",
        "timestamp",
        "actor",
        "action",
        "resource",
        "details",
        "prev_hash",
        "record_hash",
    }
)
_CHECKPOINT_FIELDS = frozenset(
    {"format", "tenant", "length", "head_hash", "timestamp", "key_id", "signature"}
)
_MAX_SIGNATURE_BYTES = 64 * 1024


@dataclass(frozen=True)
class AuditBundle:
    """A parsed export bundle (not yet verified)."""

    tenant: str
    exported_at: str
    public_key_ids: tuple[str, ...]
    checkpoints: tuple[Checkpoint, ...]
    records: tuple[AuditRecord, ...]


def _fields(value: Any, allowed: frozenset[str], what: str) -> Mapping[str, Any]:
    if not isinstance(value, dict):
        raise AuditError(f"{what} must be a JSON object")
    missing = sorted(allowed - value.keys())
    unknown = sorted(value.keys() - allowed)
    if missing:
        raise AuditError(f"{what} lacks field(s) {', '.join(missing)}")
    if unknown:
        raise AuditError(f"{what} has unknown field(s) {', '.join(k[:40] for k in unknown[:5])}")
    return value


def _string(value: Any, what: str) -> str:
    if not isinstance(value, str):
        raise AuditError(f"{what} must be a string")
    return value


def _parse_record(value: Any, index: int) -> AuditRecord:
    where = f"bundle records[{index}]"
    obj = _fields(value, _RECORD_FIELDS, where)
    details = obj["details"]
    if not isinstance(details, dict):
        raise AuditError(f"{where}.details must be a JSON object")
    return AuditRecord(
        tenant=check_text("tenant", obj["tenant"]),
        seq=check_count("seq", obj["seq"]),
        timestamp=check_timestamp(obj["timestamp"]),
        actor=check_text("actor", obj["actor"]),
        action=check_text("action", obj["action"]),
        resource=check_text("resource", obj["resource"], allow_empty=True),
        details=details,
        prev_hash=check_hash("prev_hash", obj["prev_hash"]),
        record_hash=check_hash("record_hash", obj["record_hash"]),
        format=_string(obj["format"], f"{where}.format"),
    )


def parse_checkpoint_json(value: Any, where: str) -> Checkpoint:
    """Parse one checkpoint in its JSON form (a bundle entry or a head file) strictly.

    ``where`` names it in error messages (``bundle checkpoints[3]``, ``head file``).

    Raises:
        AuditError: Missing or unknown fields, wrong types, bad hex, base64 or timestamp.
    """
    obj = _fields(value, _CHECKPOINT_FIELDS, where)
    encoded = _string(obj["signature"], f"{where}.signature")
    if len(encoded) > _MAX_SIGNATURE_BYTES * 2:
        raise AuditError(f"{where}.signature is too long")
    try:
        signature = base64.b64decode(encoded.encode("ascii"), validate=True)
    except (binascii.Error, UnicodeEncodeError, ValueError):
        raise AuditError(f"{where}.signature is not base64") from None
    return Checkpoint(
        tenant=check_text("tenant", obj["tenant"]),
        length=check_count("length", obj["length"]),
        head_hash=check_hash("head_hash", obj["head_hash"]),
        timestamp=check_timestamp(obj["timestamp"]),
        key_id=check_text("key_id", obj["key_id"]),
        signature=signature,
        format=_string(obj["format"], f"{where}.format"),
    )


def load_bundle(data: bytes, *, max_bytes: int = MAX_BUNDLE_BYTES) -> AuditBundle:
    """Parse an export bundle strictly.

    Raises:
        AuditError: The bundle is malformed, of another format, or too large.
    """
    if not isinstance(data, bytes | bytearray):
        raise AuditError("a bundle must be given as bytes")
    if len(data) > max_bytes:
        raise AuditError(f"bundle is larger than {max_bytes} bytes")
    top = _fields(parse_json_strict(bytes(data)), _TOP_FIELDS, "bundle top level")
    if top["format"] != BUNDLE_FORMAT:
        raise AuditError(f"not a TenSafe audit bundle (format must be {BUNDLE_FORMAT!r})")
    tenant = check_text("tenant", top["tenant"])
    exported_at = check_timestamp(top["exported_at"])
    key_ids = top["public_key_ids"]
    if not isinstance(key_ids, list) or len(key_ids) > 1000:
        raise AuditError("bundle public_key_ids must be a list of key ids")
    checkpoints = top["checkpoints"]
    records = top["records"]
    if not isinstance(checkpoints, list) or not isinstance(records, list):
        raise AuditError("bundle checkpoints and records must be lists")
    return AuditBundle(
        tenant=tenant,
        exported_at=exported_at,
        public_key_ids=tuple(check_text("key_id", k) for k in key_ids),
        checkpoints=tuple(
            parse_checkpoint_json(c, f"bundle checkpoints[{i}]") for i, c in enumerate(checkpoints)
        ),
        records=tuple(_parse_record(r, i) for i, r in enumerate(records)),
    )


def verify_bundle(
    data: bytes,
    *,
    verifying_key: VerifyingKeys,
    checkpoint_every: int = DEFAULT_CHECKPOINT_EVERY,
    allow_unsigned_tail: bool = False,
    known_head: Checkpoint | None = None,
    max_bytes: int = MAX_BUNDLE_BYTES,
) -> VerificationReport:
    """Verify an export bundle offline with only the deployment's public key(s).

    Runs the same checks as :func:`tensafe.audit.verify_chain` (interval rule for
    ``checkpoint_every``, the ``known_head`` if given) except the comparison with the
    database's chain-head row, which a bundle does not carry.

    Raises:
        AuditError: The bundle cannot be parsed.
        AuditVerificationError: It does not verify (naming the first bad record).
    """
    keys = key_map(verifying_key)
    bundle = load_bundle(data, max_bytes=max_bytes)
    verifier = ChainVerifier(
        bundle.tenant, bundle.checkpoints, keys, checkpoint_every=checkpoint_every, known_head=known_head
    )
    for record in bundle.records:
        verifier.feed(record)
    return verifier.finish(allow_unsigned_tail=allow_unsigned_tail)


def checkpoint_json(checkpoint: Checkpoint) -> dict[str, Any]:
    """The JSON form of a checkpoint: its signed body plus ``signature`` (standard base64)."""
    return {**checkpoint.body(), "signature": base64.b64encode(checkpoint.signature).decode("ascii")}


def export_bundle(session: Session, *, tenant: str, out: str | os.PathLike[str]) -> int:
    """Write ``tenant``'s records and checkpoints to a bundle file, atomically.

    The file is written to a temporary name in the same directory, flushed to disk and
    renamed, so an existing file is either left untouched or fully replaced. On
    PostgreSQL the chain-head row is held with ``FOR SHARE`` so that the export is a
    consistent snapshot while appends for this tenant wait.

    Returns:
        The number of records written.

    Raises:
        AuditError: The tenant has no audit log, a stored record is unreadable, or the
            file cannot be written.
    """
    check_text("tenant", tenant)
    head = session.execute(
        select(AuditChainHead.length).where(AuditChainHead.tenant_id == tenant).with_for_update(read=True)
    ).first()
    checkpoints = list_checkpoints(session, tenant=tenant)
    if head is None and not checkpoints:
        raise AuditError(f"tenant {tenant!r} has no audit log to export")
    target = Path(out)
    header = {
        "format": BUNDLE_FORMAT,
        "tenant": tenant,
        "exported_at": format_timestamp(utcnow()),
        "public_key_ids": sorted({c.key_id for c in checkpoints}),
        "checkpoints": [checkpoint_json(c) for c in checkpoints],
    }
    count = 0
    try:
        fd, tmp_name = tempfile.mkstemp(prefix=f".{target.name}.", suffix=".tmp", dir=target.parent)
    except OSError as exc:
        raise AuditError(f"cannot write {target}: {exc.strerror}") from None
    try:
        with os.fdopen(fd, "w", encoding="utf-8") as handle:
            handle.write(json.dumps(header, ensure_ascii=False, sort_keys=True)[:-1])
            handle.write(', "records": [\n')
            for row in _iter_rows(session, tenant):
                record = _record_from_row(row)
                if count:
                    handle.write(",\n")
                handle.write(json.dumps(record.to_json(), ensure_ascii=False, sort_keys=True))
                count += 1
            handle.write("\n]}\n")
            handle.flush()
            os.fsync(handle.fileno())
        os.replace(tmp_name, target)
    except OSError as exc:
        Path(tmp_name).unlink(missing_ok=True)
        raise AuditError(f"cannot write {target}: {exc.strerror}") from None
    except BaseException:
        Path(tmp_name).unlink(missing_ok=True)
        raise
    fsync_dir(target.parent)
    return count
