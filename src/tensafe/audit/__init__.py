"""Tamper-evident, append-only audit log: one hash chain per tenant, signed checkpoints.

Public surface (see docs/audit.md for the formats, byte by byte)::

    from tensafe.audit import AuditLog, verify_chain, export_bundle, verify_bundle

    log = AuditLog(session_factory, signer=signing_key, checkpoint_every=1000)
    log.append(tenant="acme", actor="user:42", action="keys.rotate", resource="kek/7",
               details={"new_key_id": "..."})
    with session_factory.begin() as session:
        head = signed_head(session, tenant="acme", signer=signing_key).checkpoint
        write_head(head, "acme-head.json")  # keep it off-box
    known = load_head(Path("acme-head.json").read_bytes())
    with session_factory.begin() as session:
        report = verify_chain(session, tenant="acme", verifying_key=signing_key.verifying_key(),
                              checkpoint_every=1000, known_head=known)

The audit layer takes the signer as a parameter; where the key lives (file, HSM, KMS)
is the business of :mod:`tensafe.keys`.
"""

from __future__ import annotations

from tensafe.audit.bundle import BUNDLE_FORMAT, AuditBundle, export_bundle, load_bundle, verify_bundle
from tensafe.audit.canonical import canonical_json, parse_json_strict
from tensafe.audit.details import check_details
from tensafe.audit.errors import AuditError, AuditVerificationError
from tensafe.audit.head import (
    SignedHead,
    head_bytes,
    known_head_problem,
    load_head,
    signed_head,
    verify_head,
    write_head,
)
from tensafe.audit.interval import (
    CHECKPOINT_EVERY_ENV,
    DEFAULT_CHECKPOINT_EVERY,
    checkpoint_every_from_environment,
)
from tensafe.audit.log import (
    AuditLog,
    append_record,
    audited_tenants,
    create_checkpoint,
    iter_records,
    latest_records,
    list_checkpoints,
    newest_checkpoint,
)
from tensafe.audit.records import (
    CHECKPOINT_CONTEXT,
    CHECKPOINT_FORMAT,
    GENESIS_HASH,
    RECORD_DOMAIN,
    RECORD_FORMAT,
    AuditRecord,
    Checkpoint,
    record_hash,
)
from tensafe.audit.signer import CheckpointSigner, CheckpointVerifier
from tensafe.audit.verify import VerificationReport, verify_chain

__all__ = [
    "BUNDLE_FORMAT",
    "CHECKPOINT_CONTEXT",
    "CHECKPOINT_EVERY_ENV",
    "CHECKPOINT_FORMAT",
    "DEFAULT_CHECKPOINT_EVERY",
    "GENESIS_HASH",
    "RECORD_DOMAIN",
    "RECORD_FORMAT",
    "AuditBundle",
    "AuditError",
    "AuditLog",
    "AuditRecord",
    "AuditVerificationError",
    "Checkpoint",
    "CheckpointSigner",
    "CheckpointVerifier",
    "SignedHead",
    "VerificationReport",
    "append_record",
    "audited_tenants",
    "canonical_json",
    "check_details",
    "checkpoint_every_from_environment",
    "create_checkpoint",
    "export_bundle",
    "head_bytes",
    "iter_records",
    "known_head_problem",
    "latest_records",
    "list_checkpoints",
    "load_bundle",
    "load_head",
    "newest_checkpoint",
    "parse_json_strict",
    "record_hash",
    "signed_head",
    "verify_bundle",
    "verify_chain",
    "verify_head",
    "write_head",
]
