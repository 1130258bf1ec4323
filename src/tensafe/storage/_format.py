"""Encoding and parsing of the encrypted artifact format, version 1.

The normative description is in ``docs/security/keys.md`` ("Artifact file format"). In
short::

    "TSAF" | 0x01 | u32 header length | header (canonical JSON) | STREAM body | sealed trailer

Everything read from a stored blob is untrusted: :func:`parse_header` accepts only the
exact, canonical encoding of a well-formed header and raises
:class:`~tensafe.storage.ArtifactIntegrityError` for anything else.
"""

from __future__ import annotations

import base64
import hashlib
import json
import re
import struct
from dataclasses import dataclass
from typing import Any, BinaryIO

from tensafe.storage._errors import ArtifactIntegrityError

__all__ = [
    "FORMAT_VERSION",
    "MAGIC",
    "Header",
    "associated_data",
    "encode_header",
    "parse_header",
    "subkey_info",
]

MAGIC = b"TSAF"
FORMAT_VERSION = 1
ALGORITHM = "AES-256-GCM-STREAM"
MAX_HEADER_LEN = 64 * 1024
MAX_TRAILER_LEN = 4096
_PREFIX = struct.Struct(">4sBI")
_ID = re.compile(r"[A-Za-z0-9][A-Za-z0-9._-]{0,127}")
_HEX32 = re.compile(r"[0-9a-f]{32}")
_TIMESTAMP = re.compile(r"\d{4}-\d{2}-\d{2}T\d{2}:\d{2}:\d{2}(\.\d{1,6})?Z")
_B64 = re.compile(r"[A-Za-z0-9+/]*={0,2}")
_FIELDS = frozenset(
    {
        "alg",
        "artifact_id",
        "chunk_size",
        "created_at",
        "dek_version",
        "salt",
        "sealed_meta",
        "tenant",
        "trailer_len",
    }
)

#: Domain-separation labels (also bound into every AEAD call).
LABEL_AD = b"tensafe/artifact/v1"
LABEL_KEY = b"tensafe/artifact-key/v1"
LABEL_META = "tensafe/artifact-meta/v1"
LABEL_TRAILER = "tensafe/artifact-trailer/v1"


@dataclass(frozen=True)
class Header:
    """The plaintext header of a stored artifact (authenticated, not encrypted)."""

    tenant: str
    artifact_id: str
    dek_version: int
    chunk_size: int
    salt: bytes
    created_at: str
    sealed_meta: bytes
    trailer_len: int
    raw: bytes = b""
    """The exact bytes from the magic through the end of the JSON header."""

    @property
    def digest(self) -> bytes:
        """SHA-256 of :attr:`raw`; bound into the body's associated data."""
        return hashlib.sha256(self.raw).digest()


def _lp(value: bytes) -> bytes:
    return struct.pack(">H", len(value)) + value


def subkey_info(tenant: str, artifact_id: str, dek_version: int) -> bytes:
    """HKDF ``info`` for the per-artifact key derived from the tenant's DEK."""
    return (
        LABEL_KEY
        + b"\x00"
        + _lp(tenant.encode())
        + _lp(artifact_id.encode())
        + struct.pack(">I", dek_version)
    )


def associated_data(
    tenant: str, artifact_id: str, dek_version: int, salt: bytes, header_digest: bytes = b""
) -> bytes:
    """Associated data binding format version, tenant, artifact id, DEK version and salt.

    With ``header_digest`` (SHA-256 of the whole header) it is the associated data of the
    body stream and trailer; without it, of the sealed metadata inside the header.
    """
    return (
        LABEL_AD
        + b"\x00"
        + bytes([FORMAT_VERSION])
        + _lp(tenant.encode())
        + _lp(artifact_id.encode())
        + struct.pack(">I", dek_version)
        + _lp(salt)
        + _lp(header_digest)
    )


def encode_header(header: Header) -> bytes:
    """Serialize ``header`` (ignoring :attr:`Header.raw`) to prefix + canonical JSON."""
    body = {
        "alg": ALGORITHM,
        "artifact_id": header.artifact_id,
        "chunk_size": header.chunk_size,
        "created_at": header.created_at,
        "dek_version": header.dek_version,
        "salt": header.salt.hex(),
        "sealed_meta": base64.b64encode(header.sealed_meta).decode("ascii"),
        "tenant": header.tenant,
        "trailer_len": header.trailer_len,
    }
    text = json.dumps(body, sort_keys=True, separators=(",", ":"), ensure_ascii=True).encode("ascii")
    if len(text) > MAX_HEADER_LEN:
        raise ValueError("artifact header too large (metadata too big)")
    return _PREFIX.pack(MAGIC, FORMAT_VERSION, len(text)) + text


def _int(obj: dict[str, Any], name: str, low: int, high: int) -> int:
    value = obj[name]
    if type(value) is not int or not low <= value <= high:
        raise ArtifactIntegrityError()
    return value


def _str(obj: dict[str, Any], name: str, pattern: re.Pattern[str]) -> str:
    value = obj[name]
    if type(value) is not str or not pattern.fullmatch(value):
        raise ArtifactIntegrityError()
    return value


def parse_header(src: BinaryIO) -> Header:
    """Read and validate the header at the start of ``src``; leaves ``src`` at the body.

    Raises:
        ArtifactIntegrityError: Wrong magic or version, bad length, invalid or
            non-canonical JSON, missing, extra or ill-typed fields.
    """
    prefix = src.read(_PREFIX.size)
    if len(prefix) != _PREFIX.size:
        raise ArtifactIntegrityError()
    magic, version, length = _PREFIX.unpack(prefix)
    if magic != MAGIC or version != FORMAT_VERSION or not 2 <= length <= MAX_HEADER_LEN:
        raise ArtifactIntegrityError()
    text = src.read(length)
    if len(text) != length:
        raise ArtifactIntegrityError()
    try:
        obj = json.loads(text.decode("ascii"))
    except (UnicodeDecodeError, ValueError, RecursionError):
        raise ArtifactIntegrityError() from None
    if not isinstance(obj, dict) or set(obj) != _FIELDS or obj["alg"] != ALGORITHM:
        raise ArtifactIntegrityError()
    sealed_b64 = _str(obj, "sealed_meta", _B64)
    try:
        sealed_meta = base64.b64decode(sealed_b64, validate=True)
    except ValueError:
        raise ArtifactIntegrityError() from None
    header = Header(
        tenant=_str(obj, "tenant", _ID),
        artifact_id=_str(obj, "artifact_id", _ID),
        dek_version=_int(obj, "dek_version", 1, 2**32 - 1),
        chunk_size=_int(obj, "chunk_size", 1, 2**26),
        salt=bytes.fromhex(_str(obj, "salt", _HEX32)),
        created_at=_str(obj, "created_at", _TIMESTAMP),
        sealed_meta=sealed_meta,
        trailer_len=_int(obj, "trailer_len", 1, MAX_TRAILER_LEN),
    )
    raw = prefix + text
    # Only the canonical encoding is accepted, so one header has exactly one byte form.
    if encode_header(header) != raw:
        raise ArtifactIntegrityError()
    return Header(**{**header.__dict__, "raw": raw})
