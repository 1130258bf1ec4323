"""Binary layout of TSSP v1 (spec: "File structure"): constants, encoder and bounded parser."""

from __future__ import annotations

import hashlib
from dataclasses import dataclass
from typing import Any, BinaryIO, Final

from tensafe._canonical import CanonicalJSONError, parse_json
from tensafe.crypto.stream import HEADER_SIZE, TAG_SIZE
from tensafe.package._manifest import Manifest, check_certificate, check_evidence, parse_manifest
from tensafe.package.errors import PackageFormatError

__all__ = [
    "FORMAT_VERSION",
    "LABEL_CONTENT_KEY_WRAP",
    "LABEL_KEY_COMMITMENT",
    "LABEL_PAYLOAD_AD",
    "LABEL_PAYLOAD_KEY",
    "LABEL_RECIPIENT",
    "LABEL_SIGNATURE",
    "MAGIC",
    "ParsedHeader",
    "RecipientStanza",
    "SignatureEntry",
    "encode_signatures",
    "encode_signed_part",
    "expected_payload_length",
    "parse_canonical_json",
    "read_header",
]

MAGIC: Final = b"TSSP"
FORMAT_VERSION: Final = 1
PREFIX_SIZE: Final = 10
MAX_BODY: Final = 4 << 20
MAX_SECTION: Final = 1 << 20
MAX_RECIPIENTS: Final = 64
MAX_SIGNATURES: Final = 16
MAX_STANZA_FIELD: Final = 4096
MAX_SIGNATURE_BLOB: Final = 16384
KEY_ID_SIZE: Final = 16
COMMITMENT_SIZE: Final = 32

LABEL_SIGNATURE: Final = "tensafe/tssp/v1/header-signature"
LABEL_RECIPIENT: Final = b"tensafe/tssp/v1/recipient"
LABEL_CONTENT_KEY_WRAP: Final = "tensafe/tssp/v1/content-key-wrap"
LABEL_KEY_COMMITMENT: Final = b"tensafe/tssp/v1/key-commitment"
LABEL_PAYLOAD_KEY: Final = b"tensafe/tssp/v1/payload-key"
LABEL_PAYLOAD_AD: Final = b"tensafe/tssp/v1/payload"

#: STREAM layout (tensafe.crypto.stream): header bytes, per-chunk tag, and the first two header
#: bytes (format version 1, algorithm 0x03 = AES-256-GCM STREAM) that TSSP v1 pins.
STREAM_HEADER: Final = HEADER_SIZE
STREAM_TAG: Final = TAG_SIZE
STREAM_MAGIC: Final = b"\x01\x03"


@dataclass(frozen=True)
class RecipientStanza:
    """One recipient: key id, KEM encapsulation and the wrapped content key."""

    key_id: bytes
    encapsulation: bytes
    wrapped_key: bytes


@dataclass(frozen=True)
class SignatureEntry:
    """One hybrid signature over the signed part, by the signer with ``key_id``."""

    key_id: bytes
    signature: bytes


@dataclass(frozen=True)
class ParsedHeader:
    """Everything before the payload, parsed and checked against the spec's MUST rules."""

    signed_part: bytes
    header_hash: bytes
    manifest: Manifest
    manifest_bytes: bytes
    evidence_bytes: bytes
    certificate_bytes: bytes
    evidence: dict[str, Any]
    dp_certificate: dict[str, Any] | None
    key_commitment: bytes
    recipients: tuple[RecipientStanza, ...]
    signatures: tuple[SignatureEntry, ...]
    payload_offset: int


def expected_payload_length(size: int, chunk_size: int) -> int:
    """Exact STREAM ciphertext length for ``size`` plaintext bytes in chunks of ``chunk_size``."""
    chunks = max(1, -(-size // chunk_size))
    return STREAM_HEADER + size + chunks * STREAM_TAG


def _lp(data: bytes, width: int) -> bytes:
    return len(data).to_bytes(width, "big") + data


def encode_signed_part(
    *,
    manifest: bytes,
    evidence: bytes,
    dp_certificate: bytes,
    key_commitment: bytes,
    recipients: list[RecipientStanza],
) -> bytes:
    """Serialise prefix and body (the signed part)."""
    body = bytearray()
    body += _lp(manifest, 4) + _lp(evidence, 4) + _lp(dp_certificate, 4)
    body += key_commitment
    body += len(recipients).to_bytes(2, "big")
    for stanza in recipients:
        body += stanza.key_id + _lp(stanza.encapsulation, 2) + _lp(stanza.wrapped_key, 2)
    if len(body) > MAX_BODY:
        raise PackageFormatError("package header too large")
    return MAGIC + bytes([FORMAT_VERSION, 0]) + len(body).to_bytes(4, "big") + bytes(body)


def encode_signatures(entries: list[SignatureEntry]) -> bytes:
    """Serialise the signatures section."""
    out = bytearray(len(entries).to_bytes(2, "big"))
    for entry in entries:
        out += entry.key_id + _lp(entry.signature, 2)
    return bytes(out)


class _Reader:
    """Bounds-checked reads from a byte string; running off the end is a format error."""

    def __init__(self, data: bytes, *, what: str) -> None:
        self._data = data
        self._pos = 0
        self._what = what

    def take(self, n: int) -> bytes:
        if self._pos + n > len(self._data):
            raise PackageFormatError(f"{self._what} ends inside a field (truncated?)")
        out = self._data[self._pos : self._pos + n]
        self._pos += n
        return out

    def uint(self, width: int) -> int:
        return int.from_bytes(self.take(width), "big")

    def lp(self, width: int, *, limit: int, what: str, allow_empty: bool = True) -> bytes:
        n = self.uint(width)
        if n > limit or (n == 0 and not allow_empty):
            raise PackageFormatError(f"{what} length {n} out of range")
        return self.take(n)

    def at_end(self) -> bool:
        return self._pos == len(self._data)


def parse_canonical_json(data: bytes, *, what: str) -> Any:
    """Decode a canonical-JSON section (floats allowed), refusing anything but its canonical bytes.

    Raises:
        PackageFormatError: ``data`` is not UTF-8, not JSON, has duplicate members, or is not canonical.
    """
    try:
        return parse_json(data, allow_floats=True, require_canonical=True)
    except CanonicalJSONError as exc:
        raise PackageFormatError(f"{what}: {exc}") from None


def _read_exact(fh: BinaryIO, n: int, *, what: str) -> bytes:
    data = fh.read(n)
    if len(data) != n:
        raise PackageFormatError(f"file ends inside the {what} (truncated?)")
    return data


def read_header(fh: BinaryIO, *, file_size: int) -> ParsedHeader:
    """Parse and check the header of a package whose total size is ``file_size``.

    Reads nothing from the payload except to check its stream header, and rejects a file whose
    payload length differs from what the manifest implies.

    Raises:
        PackageFormatError: Any MUST rule of the spec is violated.
    """
    prefix = fh.read(PREFIX_SIZE)
    if len(prefix) < 4 or prefix[:4] != MAGIC:
        raise PackageFormatError("not a TSSP package (bad magic)")
    if len(prefix) < PREFIX_SIZE:
        raise PackageFormatError("file ends inside the package prefix (truncated?)")
    if prefix[4] != FORMAT_VERSION:
        raise PackageFormatError(
            f"unsupported TSSP format version {prefix[4]}; this TenSafe reads version {FORMAT_VERSION}"
        )
    if prefix[5] != 0:
        raise PackageFormatError("unknown TSSP header flags (must be zero)")
    body_len = int.from_bytes(prefix[6:10], "big")
    if body_len > MAX_BODY:
        raise PackageFormatError(f"package header length {body_len} exceeds {MAX_BODY}")
    body = _read_exact(fh, body_len, what="package header")
    signed_part = prefix + body

    reader = _Reader(body, what="package header")
    manifest_bytes = reader.lp(4, limit=MAX_SECTION, what="manifest", allow_empty=False)
    evidence_bytes = reader.lp(4, limit=MAX_SECTION, what="evidence", allow_empty=False)
    cert_bytes = reader.lp(4, limit=MAX_SECTION, what="dp_certificate")
    commitment = reader.take(COMMITMENT_SIZE)
    count = reader.uint(2)
    if not 1 <= count <= MAX_RECIPIENTS:
        raise PackageFormatError(f"recipient count {count} out of range 1..{MAX_RECIPIENTS}")
    recipients: list[RecipientStanza] = []
    for _ in range(count):
        key_id = reader.take(KEY_ID_SIZE)
        enc = reader.lp(2, limit=MAX_STANZA_FIELD, what="recipient encapsulation", allow_empty=False)
        wrapped = reader.lp(2, limit=MAX_STANZA_FIELD, what="wrapped content key", allow_empty=False)
        recipients.append(RecipientStanza(key_id, enc, wrapped))
    if not reader.at_end():
        raise PackageFormatError("package header has trailing bytes")
    if len({r.key_id for r in recipients}) != len(recipients):
        raise PackageFormatError("duplicate recipient key id")

    manifest = parse_manifest(parse_canonical_json(manifest_bytes, what="manifest"))
    evidence = check_evidence(parse_canonical_json(evidence_bytes, what="evidence"))
    if hashlib.sha256(evidence_bytes).hexdigest() != manifest.evidence_sha256:
        raise PackageFormatError("evidence does not match manifest evidence_sha256")
    certificate: dict[str, Any] | None = None
    if cert_bytes:
        certificate = check_certificate(parse_canonical_json(cert_bytes, what="dp_certificate"))
        if hashlib.sha256(cert_bytes).hexdigest() != manifest.dp_certificate_sha256:
            raise PackageFormatError("dp_certificate does not match manifest dp_certificate_sha256")
    elif manifest.dp_certificate_sha256 is not None:
        raise PackageFormatError("manifest names a dp_certificate but the package carries none")

    sig_count = int.from_bytes(_read_exact(fh, 2, what="signatures"), "big")
    if sig_count != len(manifest.signers):
        raise PackageFormatError(
            f"package has {sig_count} signature(s) but its manifest lists {len(manifest.signers)} signer(s)"
        )
    signatures: list[SignatureEntry] = []
    sig_bytes = 2
    for signer in manifest.signers:
        key_id = _read_exact(fh, KEY_ID_SIZE, what="signatures")
        if key_id.hex() != signer.key_id:
            raise PackageFormatError("signature entries do not match the manifest signers")
        n = int.from_bytes(_read_exact(fh, 2, what="signatures"), "big")
        if not 1 <= n <= MAX_SIGNATURE_BLOB:
            raise PackageFormatError(f"signature length {n} out of range")
        signatures.append(SignatureEntry(key_id, _read_exact(fh, n, what="signatures")))
        sig_bytes += KEY_ID_SIZE + 2 + n

    payload_offset = len(signed_part) + sig_bytes
    expected = expected_payload_length(manifest.payload_size, manifest.chunk_size)
    actual = file_size - payload_offset
    if actual != expected:
        raise PackageFormatError(
            f"payload is {actual} bytes but the manifest implies {expected} (truncated or extended)"
        )
    stream_head = _read_exact(fh, 3, what="payload")
    if stream_head != STREAM_MAGIC + bytes([manifest.chunk_size.bit_length() - 1]):
        raise PackageFormatError("payload does not start with a TSSP v1 STREAM header")
    return ParsedHeader(
        signed_part=signed_part,
        header_hash=hashlib.sha256(signed_part).digest(),
        manifest=manifest,
        manifest_bytes=manifest_bytes,
        evidence_bytes=evidence_bytes,
        certificate_bytes=cert_bytes,
        evidence=evidence,
        dp_certificate=certificate,
        key_commitment=commitment,
        recipients=tuple(recipients),
        signatures=tuple(signatures),
        payload_offset=payload_offset,
    )
