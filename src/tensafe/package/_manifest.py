"""Validation of the TSSP v1 manifest, evidence and DP-certificate sections (spec: "Manifest")."""

from __future__ import annotations

import re
import unicodedata
from dataclasses import dataclass
from datetime import UTC, datetime
from typing import Any

from tensafe.package._semver import SemVer
from tensafe.package.errors import PackageFormatError

__all__ = [
    "CERTIFICATE_SCHEMA",
    "EVIDENCE_SCHEMA",
    "MANIFEST_SCHEMA",
    "READABLE_CERTIFICATE_SCHEMAS",
    "RESERVED_NAMES",
    "FileEntry",
    "Manifest",
    "SignerEntry",
    "check_certificate",
    "check_evidence",
    "check_path",
    "format_time",
    "parse_manifest",
    "parse_time",
]

MANIFEST_SCHEMA = "tensafe.tssp.manifest/v1"
EVIDENCE_SCHEMA = "tensafe.tssp.evidence/v1"
#: The certificate schema new packages carry (what ``tensafe train`` and the API server issue).
CERTIFICATE_SCHEMA = "tensafe.dp_certificate/v2"
#: Certificate schemas a verifier reads: v1 stays readable so that packages made before v2
#: keep verifying (their admission is the policy's decision; see docs/tssp.md).
READABLE_CERTIFICATE_SCHEMAS = ("tensafe.dp_certificate/v1", CERTIFICATE_SCHEMA)
RESERVED_NAMES = frozenset({"evidence.json", "dp_certificate.json", "tssp_manifest.json"})

MAX_FILES = 4096
MAX_SIGNERS = 16
MAX_PATH_BYTES = 255
MIN_CHUNK = 1 << 10
MAX_CHUNK = 1 << 24
MAX_SIZE = (1 << 53) - 1

_NAME_RE = re.compile(r"^[a-z0-9][a-z0-9._-]{0,127}$")
_HEX64_RE = re.compile(r"^[0-9a-f]{64}$")
_HEX32_RE = re.compile(r"^[0-9a-f]{32}$")
_TIME_RE = re.compile(r"^\d{4}-\d{2}-\d{2}T\d{2}:\d{2}:\d{2}Z$", re.ASCII)

_MANIFEST_KEYS = frozenset(
    {
        "schema",
        "name",
        "version",
        "created",
        "expires",
        "base_model",
        "files",
        "payload",
        "evidence_sha256",
        "dp_certificate_sha256",
        "signers",
        "threshold",
    }
)


@dataclass(frozen=True)
class FileEntry:
    """One adapter file: its relative POSIX path, size in bytes and SHA-256 (hex)."""

    path: str
    size: int
    sha256: str


@dataclass(frozen=True)
class SignerEntry:
    """A signer as the manifest claims it: key id (hex) and armored public key (a claim, not trust)."""

    key_id: str
    public_key: str


@dataclass(frozen=True)
class Manifest:
    """A validated manifest. ``document`` is the decoded JSON object (what policies see)."""

    name: str
    version: str
    created: datetime
    expires: datetime
    base_model_id: str
    base_model_sha256: str | None
    files: tuple[FileEntry, ...]
    payload_size: int
    chunk_size: int
    evidence_sha256: str
    dp_certificate_sha256: str | None
    signers: tuple[SignerEntry, ...]
    threshold: int
    document: dict[str, Any]


def format_time(moment: datetime) -> str:
    """Format an aware datetime as RFC 3339 UTC with second precision."""
    return moment.astimezone(UTC).strftime("%Y-%m-%dT%H:%M:%SZ")


def parse_time(text: Any, *, what: str) -> datetime:
    """Parse the manifest time format, rejecting anything else."""
    if not isinstance(text, str) or not _TIME_RE.fullmatch(text):
        raise PackageFormatError(f"{what} is not an RFC 3339 UTC time like 2026-01-31T12:00:00Z")
    try:
        return datetime.strptime(text, "%Y-%m-%dT%H:%M:%SZ").replace(tzinfo=UTC)
    except ValueError:
        raise PackageFormatError(f"{what} is not a valid date and time") from None


def check_path(path: Any) -> str:
    """Check one file path against the spec's path rules; return it.

    Raises:
        PackageFormatError: The path could escape the output directory or is otherwise unsafe.
    """
    if not isinstance(path, str) or not path:
        raise PackageFormatError("file path must be a non-empty string")
    try:
        raw = path.encode("utf-8")
    except UnicodeEncodeError:
        raise PackageFormatError("file path is not valid Unicode") from None
    if len(raw) > MAX_PATH_BYTES:
        raise PackageFormatError(f"file path longer than {MAX_PATH_BYTES} bytes")
    if path.startswith("/") or path.endswith("/") or "\\" in path:
        raise PackageFormatError(f"file path {path[:80]!r} is not a safe relative path")
    if any(ord(ch) < 0x20 or ord(ch) == 0x7F for ch in path):
        raise PackageFormatError("file path contains a control character")
    if any(part in ("", ".", "..") for part in path.split("/")):
        raise PackageFormatError(f"file path {path[:80]!r} is not a safe relative path")
    if path in RESERVED_NAMES:
        raise PackageFormatError(f"file path {path!r} is reserved for package metadata")
    return path


def _fold(path: str) -> str:
    return unicodedata.normalize("NFC", path).casefold()


def _check_hex64(value: Any, *, what: str) -> str:
    if not isinstance(value, str) or not _HEX64_RE.fullmatch(value):
        raise PackageFormatError(f"{what} must be 64 lower-case hex digits")
    return value


def _check_int(value: Any, *, what: str, low: int, high: int) -> int:
    if isinstance(value, bool) or not isinstance(value, int) or not low <= value <= high:
        raise PackageFormatError(f"{what} must be an integer in [{low}, {high}]")
    return value


def _check_keys(obj: Any, keys: frozenset[str], *, what: str) -> dict[str, Any]:
    if not isinstance(obj, dict):
        raise PackageFormatError(f"{what} must be a JSON object")
    missing = keys - obj.keys()
    extra = obj.keys() - keys
    if missing:
        raise PackageFormatError(f"{what} lacks member(s) {', '.join(sorted(missing))}")
    if extra:
        raise PackageFormatError(f"{what} has unknown member(s) {', '.join(sorted(extra))[:120]}")
    return obj


def _check_armored(value: Any, *, what: str) -> str:
    if not isinstance(value, str) or not value.isascii() or not 1 <= len(value) <= 16384:
        raise PackageFormatError(f"{what} must be an ASCII armored public key")
    return value


def parse_manifest(doc: Any) -> Manifest:
    """Validate a decoded manifest object against every rule of the spec.

    Raises:
        PackageFormatError: Any rule is violated.
    """
    doc = _check_keys(doc, _MANIFEST_KEYS, what="manifest")
    if doc["schema"] != MANIFEST_SCHEMA:
        raise PackageFormatError(f"manifest schema must be {MANIFEST_SCHEMA!r}")
    name = doc["name"]
    if not isinstance(name, str) or not _NAME_RE.fullmatch(name):
        raise PackageFormatError("manifest name must match ^[a-z0-9][a-z0-9._-]{0,127}$")
    version = doc["version"]
    try:
        SemVer.parse(version)
    except ValueError:
        raise PackageFormatError("manifest version is not a semantic version (e.g. 1.2.3)") from None
    created = parse_time(doc["created"], what="manifest created")
    expires = parse_time(doc["expires"], what="manifest expires")
    if expires <= created:
        raise PackageFormatError("manifest expires must be later than created")

    base = _check_keys(doc["base_model"], frozenset({"id", "sha256"}), what="manifest base_model")
    base_id = base["id"]
    if not isinstance(base_id, str) or not 1 <= len(base_id) <= 256:
        raise PackageFormatError("base_model id must be a string of 1 to 256 characters")
    base_sha = base["sha256"]
    if base_sha is not None:
        _check_hex64(base_sha, what="base_model sha256")

    files_raw = doc["files"]
    if not isinstance(files_raw, list) or not 1 <= len(files_raw) <= MAX_FILES:
        raise PackageFormatError(f"manifest files must be a list of 1 to {MAX_FILES} entries")
    files: list[FileEntry] = []
    folded: set[str] = set()
    for item in files_raw:
        entry = _check_keys(item, frozenset({"path", "size", "sha256"}), what="file entry")
        path = check_path(entry["path"])
        size = _check_int(entry["size"], what="file size", low=0, high=MAX_SIZE)
        digest = _check_hex64(entry["sha256"], what="file sha256")
        fold = _fold(path)
        if fold in folded:
            raise PackageFormatError(f"file path {path[:80]!r} collides with another (case-insensitively)")
        folded.add(fold)
        files.append(FileEntry(path, size, digest))
    paths = [f.path for f in files]
    if paths != sorted(paths):
        raise PackageFormatError("manifest files must be sorted by path")
    dirs = {fp[:i] for fp in folded for i, ch in enumerate(fp) if ch == "/"}
    if dirs & folded:
        raise PackageFormatError("a file path is also used as a directory")

    payload = _check_keys(doc["payload"], frozenset({"size", "chunk_size"}), what="manifest payload")
    payload_size = _check_int(payload["size"], what="payload size", low=0, high=MAX_SIZE)
    chunk_size = _check_int(payload["chunk_size"], what="payload chunk_size", low=MIN_CHUNK, high=MAX_CHUNK)
    if chunk_size & (chunk_size - 1):
        raise PackageFormatError("payload chunk_size must be a power of two")
    if payload_size != sum(f.size for f in files):
        raise PackageFormatError("payload size is not the sum of the file sizes")

    evidence_sha = _check_hex64(doc["evidence_sha256"], what="evidence_sha256")
    cert_sha = doc["dp_certificate_sha256"]
    if cert_sha is not None:
        _check_hex64(cert_sha, what="dp_certificate_sha256")

    signers_raw = doc["signers"]
    if not isinstance(signers_raw, list) or not 1 <= len(signers_raw) <= MAX_SIGNERS:
        raise PackageFormatError(f"manifest signers must be a list of 1 to {MAX_SIGNERS} entries")
    signers: list[SignerEntry] = []
    for item in signers_raw:
        entry = _check_keys(item, frozenset({"key_id", "public_key"}), what="signer entry")
        key_id = entry["key_id"]
        if not isinstance(key_id, str) or not _HEX32_RE.fullmatch(key_id):
            raise PackageFormatError("signer key_id must be 32 lower-case hex digits")
        signers.append(SignerEntry(key_id, _check_armored(entry["public_key"], what="signer public_key")))
    ids = [s.key_id for s in signers]
    if ids != sorted(ids) or len(set(ids)) != len(ids):
        raise PackageFormatError("manifest signers must be sorted by key_id and unique")
    threshold = _check_int(doc["threshold"], what="threshold", low=1, high=len(signers))

    return Manifest(
        name=name,
        version=version,
        created=created,
        expires=expires,
        base_model_id=base_id,
        base_model_sha256=base_sha,
        files=tuple(files),
        payload_size=payload_size,
        chunk_size=chunk_size,
        evidence_sha256=evidence_sha,
        dp_certificate_sha256=cert_sha,
        signers=tuple(signers),
        threshold=threshold,
        document=doc,
    )


def check_evidence(doc: Any) -> dict[str, Any]:
    """Check the evidence section is a JSON object."""
    if not isinstance(doc, dict):
        raise PackageFormatError("evidence must be a JSON object")
    return doc


def check_certificate(doc: Any) -> dict[str, Any]:
    """Check the DP-certificate section is a JSON object with the expected schema."""
    if not isinstance(doc, dict):
        raise PackageFormatError("dp_certificate must be a JSON object")
    if doc.get("schema") not in READABLE_CERTIFICATE_SCHEMAS:
        raise PackageFormatError(
            f"dp_certificate schema must be one of {', '.join(map(repr, READABLE_CERTIFICATE_SCHEMAS))}"
        )
    return doc
