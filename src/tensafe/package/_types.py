"""Result types of the TSSP API."""

from __future__ import annotations

from dataclasses import dataclass
from datetime import datetime
from typing import Any

from tensafe.package._manifest import FileEntry

__all__ = ["PackageInfo"]


@dataclass(frozen=True)
class PackageInfo:
    """What a package says about itself, and what was verified.

    Attributes:
        name: Package name.
        version: Semantic version.
        created: Signing time (UTC).
        expires: Expiry time (UTC).
        base_model_id: Base model identifier.
        base_model_sha256: Base model hash (hex) or ``None``.
        files: Adapter files (path, size, SHA-256).
        signers: Key ids of every signer the manifest lists (claims).
        threshold: Signer threshold the manifest requires.
        recipients: Key ids of the recipients.
        evidence: Training evidence object.
        dp_certificate: DP certificate object, or ``None``.
        header_sha256: SHA-256 (hex) of the signed part; identifies this exact package.
        verified: ``True`` only for results of :func:`verify` / :func:`unpack`.
        trusted_signers: Key ids of the signers that verified and are in the trust store
            (empty when unverified).
        manifest: The manifest object as signed.
    """

    name: str
    version: str
    created: datetime
    expires: datetime
    base_model_id: str
    base_model_sha256: str | None
    files: tuple[FileEntry, ...]
    signers: tuple[str, ...]
    threshold: int
    recipients: tuple[str, ...]
    evidence: dict[str, Any]
    dp_certificate: dict[str, Any] | None
    header_sha256: str
    verified: bool
    trusted_signers: tuple[str, ...]
    manifest: dict[str, Any]
