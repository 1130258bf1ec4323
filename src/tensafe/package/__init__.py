"""TSSP: signed, encrypted, policy-checked adapter packages (format v1, docs/spec/tssp-v1.md).

A package carries a PEFT adapter, a canonical-JSON manifest, training evidence and the DP
certificate. Hybrid Ed25519 + ML-DSA-65 signatures cover everything but the payload; the payload
is STREAM-encrypted under a content key wrapped for each recipient with hybrid
X25519 + ML-KEM-768. Verification trusts only keys the caller supplies, enforces expiry,
rollback protection and an optional Rego policy, all before anything is decrypted. Every
verify/unpack decision can be sent as a structured :class:`PackageEvent` to an audit sink
(:class:`AuditLogSink` writes to :mod:`tensafe.audit`).

Example:
    >>> from tensafe.package import pack, verify, unpack, RollbackState  # doctest: +SKIP
    >>> pack("adapter/", "a.tssp", name="demo", version="1.0.0",
    ...      signing_keys=[sk], recipients=[rk.public_key()])  # doctest: +SKIP
    >>> unpack("a.tssp", "out/", recipient_key=rk, trust=[sk.verifying_key()],
    ...        state=RollbackState.default())  # doctest: +SKIP
"""

from __future__ import annotations

from tensafe.package._audit import PACKAGE_EVENTS, AuditLogSink, AuditSink, PackageAuditError, PackageEvent
from tensafe.package._format import FORMAT_VERSION
from tensafe.package._manifest import FileEntry
from tensafe.package._open import POLICY_PACKAGE, inspect, unpack, unpack_to_memory, verify
from tensafe.package._pack import build_evidence, pack
from tensafe.package._state import RollbackState, default_state_path
from tensafe.package._types import PackageInfo
from tensafe.package.errors import (
    NotARecipientError,
    PackageDecryptionError,
    PackageError,
    PackageExpiredError,
    PackageFormatError,
    PackageInputError,
    PackageStateError,
    PolicyDeniedError,
    RollbackError,
    SignatureVerificationError,
    UntrustedSignerError,
)

__all__ = [
    "FORMAT_VERSION",
    "PACKAGE_EVENTS",
    "POLICY_PACKAGE",
    "AuditLogSink",
    "AuditSink",
    "FileEntry",
    "NotARecipientError",
    "PackageAuditError",
    "PackageDecryptionError",
    "PackageError",
    "PackageEvent",
    "PackageExpiredError",
    "PackageFormatError",
    "PackageInfo",
    "PackageInputError",
    "PackageStateError",
    "PolicyDeniedError",
    "RollbackError",
    "RollbackState",
    "SignatureVerificationError",
    "UntrustedSignerError",
    "build_evidence",
    "default_state_path",
    "inspect",
    "pack",
    "unpack",
    "unpack_to_memory",
    "verify",
]
