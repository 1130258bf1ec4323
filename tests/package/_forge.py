"""Take packages apart and put them back together, for tamper tests.

Uses the package's own encoder for the container, so tests can build packages that are
well-formed but malicious (e.g. validly signed by a trusted key yet carrying a bad path).
"""

from __future__ import annotations

import io
from dataclasses import dataclass, replace
from typing import Any

from tensafe._canonical import canonical_json
from tensafe.crypto.signing import HybridSigningKey
from tensafe.package._format import (
    LABEL_SIGNATURE,
    ParsedHeader,
    RecipientStanza,
    SignatureEntry,
    encode_signatures,
    encode_signed_part,
    read_header,
)


@dataclass(frozen=True)
class Parts:
    """Every field of a package, decoded."""

    manifest: bytes
    evidence: bytes
    certificate: bytes
    commitment: bytes
    recipients: tuple[RecipientStanza, ...]
    signatures: tuple[SignatureEntry, ...]
    payload: bytes
    header: ParsedHeader

    def with_manifest(self, doc: dict[str, Any]) -> Parts:
        return replace(self, manifest=canonical_json(doc, allow_floats=True))

    def signed_part(self) -> bytes:
        return encode_signed_part(
            manifest=self.manifest,
            evidence=self.evidence,
            dp_certificate=self.certificate,
            key_commitment=self.commitment,
            recipients=list(self.recipients),
        )

    def resign(self, *signers: HybridSigningKey) -> Parts:
        signed = self.signed_part()
        entries = sorted(
            (
                SignatureEntry(bytes.fromhex(sk.key_id), sk.sign(signed, context=LABEL_SIGNATURE))
                for sk in signers
            ),
            key=lambda e: e.key_id,
        )
        return replace(self, signatures=tuple(entries))

    def encode(self) -> bytes:
        return self.signed_part() + encode_signatures(list(self.signatures)) + self.payload


def split(data: bytes) -> Parts:
    header = read_header(io.BytesIO(data), file_size=len(data))
    return Parts(
        manifest=header.manifest_bytes,
        evidence=header.evidence_bytes,
        certificate=header.certificate_bytes,
        commitment=header.key_commitment,
        recipients=header.recipients,
        signatures=header.signatures,
        payload=data[header.payload_offset :],
        header=header,
    )
