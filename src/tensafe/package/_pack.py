"""Building TSSP v1 packages (spec: "File structure", "Content key, commitment and recipients")."""

from __future__ import annotations

import contextlib
import hashlib
import json
import os
import sys
import tempfile
from collections.abc import Mapping, Sequence
from datetime import UTC, datetime, timedelta
from importlib import metadata
from pathlib import Path
from typing import Any

from tensafe._canonical import canonical_json
from tensafe.crypto.aead import seal
from tensafe.crypto.hashing import ThreadedSha256
from tensafe.crypto.kdf import hkdf_sha256
from tensafe.crypto.kem import HybridKemPublicKey
from tensafe.crypto.signing import HybridSigningKey
from tensafe.crypto.stream import CHUNK_SIZE, encrypt_stream
from tensafe.package._format import (
    LABEL_CONTENT_KEY_WRAP,
    LABEL_KEY_COMMITMENT,
    LABEL_PAYLOAD_AD,
    LABEL_PAYLOAD_KEY,
    LABEL_RECIPIENT,
    LABEL_SIGNATURE,
    MAX_RECIPIENTS,
    MAX_SECTION,
    RecipientStanza,
    SignatureEntry,
    encode_signatures,
    encode_signed_part,
)
from tensafe.package._manifest import (
    CERTIFICATE_SCHEMA,
    EVIDENCE_SCHEMA,
    MANIFEST_SCHEMA,
    MAX_FILES,
    MAX_SIGNERS,
    FileEntry,
    check_path,
    format_time,
    parse_manifest,
)
from tensafe.package.errors import PackageError, PackageFormatError, PackageInputError

__all__ = ["build_evidence", "pack"]

_READ = 1 << 20
_LIBRARIES = ("tensafe", "torch", "transformers", "peft", "safetensors", "opacus", "cryptography")


def _library_versions() -> dict[str, str]:
    versions = {"python": ".".join(str(v) for v in sys.version_info[:3])}
    for name in _LIBRARIES:
        with contextlib.suppress(metadata.PackageNotFoundError):
            versions[name] = metadata.version(name)
    return versions


def build_evidence(
    *,
    training_run_id: str | None = None,
    config_sha256: str | None = None,
    dataset_commitment: str | None = None,
    audit_chain_head: str | None = None,
) -> dict[str, Any]:
    """Build a ``tensafe.tssp.evidence/v1`` record; library versions are filled in automatically.

    The evidence travels in the package header to every recipient and verifier, so it must not
    tell them anything about the training data.

    Args:
        training_run_id: Identifier of the training run.
        config_sha256: SHA-256 of the training configuration.
        dataset_commitment: The hex value of a KEYED dataset commitment (``hmac-sha256/v2``:
            :func:`tensafe.training.data.dataset_commitment` with the run's secret key, as
            ``tensafe train`` records it), never a plain hash of the data: anyone holding the
            package could confirm a guess about a record (which of two diagnoses it holds) by
            hashing candidate data sets. The data owner verifies it with ``tensafe data
            commitment DATA.jsonl --key KEYFILE --expect VALUE``.
        audit_chain_head: Head hash of the audit chain when the adapter was produced.
    """
    return {
        "schema": EVIDENCE_SCHEMA,
        "training_run_id": training_run_id,
        "config_sha256": config_sha256,
        "dataset_commitment": dataset_commitment,
        "audit_chain_head": audit_chain_head,
        "library_versions": _library_versions(),
    }


def _identity(fd: int) -> tuple[int, ...]:
    """What changes when a file is replaced or written: device, inode, size, mtime and ctime."""
    st = os.fstat(fd)
    return (st.st_dev, st.st_ino, st.st_size, st.st_mtime_ns, st.st_ctime_ns)


def _sha256_file(path: Path) -> tuple[int, str, tuple[int, ...]]:
    """Hash one file; also return its identity so the encryption pass can detect changes.

    The hash runs on a worker thread (:class:`~tensafe.crypto.hashing.ThreadedSha256`), so it
    overlaps reading; ``read`` returns fresh immutable ``bytes``, so no buffer is reused.
    """
    size = 0
    with ThreadedSha256() as digest, path.open("rb", buffering=0) as fh:
        before = _identity(fh.fileno())
        while data := fh.read(_READ):
            digest.update(data)
            size += len(data)
        after = _identity(fh.fileno())
        hexdigest = digest.hexdigest()
    if before != after or after[2] != size:
        raise PackageInputError(f"{path} changed while it was being packed; pack again")
    return size, hexdigest, after


def _read_json_object(path: Path, *, what: str) -> dict[str, Any]:
    try:
        if path.stat().st_size > MAX_SECTION:
            raise PackageInputError(f"{what} {path} is larger than {MAX_SECTION} bytes")
        doc = json.loads(path.read_bytes())
    except (OSError, ValueError) as exc:
        raise PackageInputError(f"cannot read {what} {path}: {exc}") from None
    if not isinstance(doc, dict):
        raise PackageInputError(f"{what} {path} must hold a JSON object")
    return doc


def _collect_files(adapter_dir: Path) -> list[tuple[Path, str]]:
    """Return (absolute path, manifest path) for every regular file under ``adapter_dir``."""
    if not adapter_dir.is_dir():
        raise PackageInputError(f"adapter directory {adapter_dir} does not exist or is not a directory")
    found: list[tuple[Path, str]] = []
    for root, dirs, names in os.walk(adapter_dir, followlinks=False):
        for d in dirs:
            if (Path(root) / d).is_symlink():
                raise PackageInputError(f"{Path(root) / d} is a symbolic link; TSSP packs regular files only")
        for name in names:
            full = Path(root) / name
            rel = full.relative_to(adapter_dir).as_posix()
            if rel in ("evidence.json", "dp_certificate.json"):
                continue
            if full.is_symlink() or not full.is_file():
                raise PackageInputError(f"{full} is not a regular file; TSSP packs regular files only")
            try:
                check_path(rel)
            except PackageFormatError as exc:
                raise PackageInputError(f"cannot pack {full}: {exc}") from None
            found.append((full, rel))
    if not found:
        raise PackageInputError(f"adapter directory {adapter_dir} holds no files")
    if len(found) > MAX_FILES:
        raise PackageInputError(f"adapter directory holds more than {MAX_FILES} files")
    found.sort(key=lambda item: item[1])
    return found


class _ConcatReader:
    """Reads the adapter files back to back for encryption.

    The files were hashed in the first pass. Hashing them again would double the cost of
    packing, so, like GNU tar, this pass checks instead that each file is the same file, with the
    same size, modification and change times, when it is opened and when its last byte is read.
    A change that slipped past this check cannot lead to wrong content being accepted: every
    recipient checks each file's SHA-256 against the signed manifest when unpacking.
    """

    def __init__(self, files: list[tuple[Path, FileEntry, tuple[int, ...]]]) -> None:
        self._files = files
        self._index = -1
        self._fh: Any = None
        self._left = 0
        self._next()

    def _changed(self) -> PackageInputError:
        return PackageInputError(
            f"{self._files[self._index][0]} changed while it was being packed; pack again"
        )

    def _next(self) -> None:
        if self._fh is not None:
            ident = self._files[self._index][2]
            extra = self._fh.read(1)
            same = _identity(self._fh.fileno()) == ident
            self._fh.close()
            self._fh = None
            if extra or not same:
                raise self._changed()
        self._index += 1
        if self._index < len(self._files):
            path, entry, ident = self._files[self._index]
            try:
                self._fh = path.open("rb", buffering=0)
            except OSError as exc:
                raise PackageInputError(f"cannot read {path}: {exc.strerror or exc}") from None
            if _identity(self._fh.fileno()) != ident:
                raise self._changed()
            self._left = entry.size
            if self._left == 0:
                self._next()

    def readinto(self, buf: memoryview | bytearray) -> int:
        view = memoryview(buf)
        total = 0
        while total < len(view) and self._fh is not None:
            want = min(len(view) - total, self._left)
            n = self._fh.readinto(view[total : total + want])
            if not n:
                raise self._changed()
            total += n
            self._left -= n
            if self._left == 0:
                self._next()
        return total

    def close(self) -> None:
        if self._fh is not None:
            self._fh.close()
            self._fh = None


def _canonical_section(doc: Mapping[str, Any], *, what: str) -> bytes:
    try:
        data = canonical_json(dict(doc), allow_floats=True)
    except (ValueError, RecursionError) as exc:
        raise PackageInputError(f"{what} cannot be encoded as canonical JSON: {exc}") from None
    if len(data) > MAX_SECTION:
        raise PackageInputError(f"{what} is larger than {MAX_SECTION} bytes")
    return data


def pack(
    adapter_dir: str | Path,
    out: str | Path,
    *,
    name: str,
    version: str,
    signing_keys: Sequence[HybridSigningKey],
    recipients: Sequence[HybridKemPublicKey],
    threshold: int | None = None,
    expires_in: timedelta = timedelta(days=365),
    base_model_id: str | None = None,
    base_model_sha256: str | None = None,
    evidence: Mapping[str, Any] | None = None,
    dp_certificate: Mapping[str, Any] | None = None,
    chunk_size: int = CHUNK_SIZE,
    now: datetime | None = None,
) -> str:
    """Pack a PEFT adapter directory into a signed, encrypted TSSP v1 package.

    Every regular file under ``adapter_dir`` is packed; ``evidence.json`` and
    ``dp_certificate.json`` at its top level become the evidence and certificate sections
    unless ``evidence`` / ``dp_certificate`` are given. The output appears atomically and an
    existing file is never overwritten.

    Args:
        adapter_dir: The adapter directory (``adapter_config.json``, ``*.safetensors``, ...).
        out: Path of the package to create; must not exist.
        name: Package name (``^[a-z0-9][a-z0-9._-]{0,127}$``).
        version: Semantic version (``1.2.3``); verifiers refuse lower versions after a higher one.
        signing_keys: One or more hybrid signing keys; each signs the header.
        recipients: One or more hybrid KEM public keys that may decrypt the payload.
        threshold: Trusted signers a verifier must count (default: all signers).
        expires_in: Validity period from ``now``.
        base_model_id: Base model id (default: ``base_model_name_or_path`` of adapter_config.json).
        base_model_sha256: Hex SHA-256 of the base model weights, if known.
        evidence: Training evidence (default: the directory's evidence.json, else a minimal record).
        dp_certificate: The engine's DP certificate (default: the directory's dp_certificate.json).
        chunk_size: STREAM chunk size in bytes (power of two, 1 KiB to 16 MiB).
        now: Creation time (default: the current time).

    Returns:
        The SHA-256 (hex) of the signed header, which identifies the package.

    Raises:
        PackageInputError: Bad arguments or input files.
    """
    adapter_dir = Path(adapter_dir)
    out = Path(out)
    if not signing_keys:
        raise PackageInputError("at least one signing key is required")
    if not recipients:
        raise PackageInputError("at least one recipient is required")
    if len(signing_keys) > MAX_SIGNERS or len(recipients) > MAX_RECIPIENTS:
        raise PackageInputError(f"at most {MAX_SIGNERS} signers and {MAX_RECIPIENTS} recipients")
    for sk in signing_keys:
        if not sk.is_hybrid:
            raise PackageInputError(
                f"signing key {sk.key_id} is classical-only; TSSP requires hybrid Ed25519 + ML-DSA-65 keys"
            )
    if out.exists():
        raise PackageInputError(f"{out} already exists; choose another --out or remove it first")
    if not out.parent.is_dir():
        raise PackageInputError(f"output directory {out.parent} does not exist")
    now = (now or datetime.now(UTC)).replace(microsecond=0)
    if expires_in <= timedelta(0):
        raise PackageInputError("the validity period must be positive")
    try:
        if (now + expires_in).year > 9999:
            raise OverflowError
    except OverflowError:
        raise PackageInputError(
            "the validity period is too long (the expiry must be before year 10000)"
        ) from None

    collected = _collect_files(adapter_dir)
    return _pack(
        adapter_dir,
        out,
        collected,
        name=name,
        version=version,
        signing_keys=signing_keys,
        recipients=recipients,
        threshold=threshold,
        expires_in=expires_in,
        base_model_id=base_model_id,
        base_model_sha256=base_model_sha256,
        evidence=evidence,
        dp_certificate=dp_certificate,
        chunk_size=chunk_size,
        now=now,
    )


def _pack(
    adapter_dir: Path,
    out: Path,
    collected: list[tuple[Path, str]],
    *,
    name: str,
    version: str,
    signing_keys: Sequence[HybridSigningKey],
    recipients: Sequence[HybridKemPublicKey],
    threshold: int | None,
    expires_in: timedelta,
    base_model_id: str | None,
    base_model_sha256: str | None,
    evidence: Mapping[str, Any] | None,
    dp_certificate: Mapping[str, Any] | None,
    chunk_size: int,
    now: datetime,
) -> str:
    entries: list[FileEntry] = []
    identities: list[tuple[int, ...]] = []
    for full, rel in collected:
        try:
            size, digest, ident = _sha256_file(full)
        except OSError as exc:
            raise PackageInputError(f"cannot read {full}: {exc.strerror or exc}") from None
        entries.append(FileEntry(rel, size, digest))
        identities.append(ident)

    if base_model_id is None:
        config_path = adapter_dir / "adapter_config.json"
        if config_path.is_file():
            base_model_id = _read_json_object(config_path, what="adapter config").get(
                "base_model_name_or_path"
            )
        if not isinstance(base_model_id, str) or not base_model_id:
            raise PackageInputError(
                "cannot tell the base model: adapter_config.json has no base_model_name_or_path; "
                "give --base-model"
            )

    if evidence is None:
        ev_path = adapter_dir / "evidence.json"
        if ev_path.is_file():
            evidence = _read_json_object(ev_path, what="evidence")
        else:
            evidence = build_evidence()
    evidence_bytes = _canonical_section(evidence, what="evidence")

    if dp_certificate is None:
        cert_path = adapter_dir / "dp_certificate.json"
        if cert_path.is_file():
            dp_certificate = _read_json_object(cert_path, what="DP certificate")
    cert_bytes = b""
    if dp_certificate is not None:
        if dp_certificate.get("schema") != CERTIFICATE_SCHEMA:
            raise PackageInputError(f"the DP certificate's schema must be {CERTIFICATE_SCHEMA!r}")
        cert_bytes = _canonical_section(dp_certificate, what="DP certificate")

    signer_map = {sk.key_id: sk for sk in signing_keys}
    if len(signer_map) != len(signing_keys):
        raise PackageInputError("the same signing key was given twice")
    signer_ids = sorted(signer_map)
    rec_ids = [rk.key_id for rk in recipients]
    if len(set(rec_ids)) != len(rec_ids):
        raise PackageInputError("the same recipient was given twice")
    if threshold is None:
        threshold = len(signer_ids)
    if not 1 <= threshold <= len(signer_ids):
        raise PackageInputError(f"threshold must be between 1 and the number of signers ({len(signer_ids)})")

    manifest_doc: dict[str, Any] = {
        "schema": MANIFEST_SCHEMA,
        "name": name,
        "version": version,
        "created": format_time(now),
        "expires": format_time(now + expires_in),
        "base_model": {"id": base_model_id, "sha256": base_model_sha256},
        "files": [{"path": e.path, "size": e.size, "sha256": e.sha256} for e in entries],
        "payload": {"size": sum(e.size for e in entries), "chunk_size": chunk_size},
        "evidence_sha256": hashlib.sha256(evidence_bytes).hexdigest(),
        "dp_certificate_sha256": hashlib.sha256(cert_bytes).hexdigest() if cert_bytes else None,
        "signers": [
            {"key_id": kid, "public_key": signer_map[kid].verifying_key().public_bytes().decode("ascii")}
            for kid in signer_ids
        ],
        "threshold": threshold,
    }
    manifest_bytes = _canonical_section(manifest_doc, what="manifest")
    try:
        parse_manifest(manifest_doc)
    except PackageFormatError as exc:
        raise PackageInputError(f"cannot pack: {exc}") from None

    content_key = os.urandom(32)
    commitment = hkdf_sha256(content_key, salt=None, info=LABEL_KEY_COMMITMENT)
    stanzas: list[RecipientStanza] = []
    for rk in recipients:
        rid = bytes.fromhex(rk.key_id)
        shared, encapsulation = rk.encapsulate()
        wrap_key = hkdf_sha256(shared, salt=None, info=LABEL_RECIPIENT + rid)
        wrapped = seal(wrap_key, content_key, label=LABEL_CONTENT_KEY_WRAP, associated_data=rid)
        stanzas.append(RecipientStanza(rid, encapsulation, wrapped))
    signed_part = encode_signed_part(
        manifest=manifest_bytes,
        evidence=evidence_bytes,
        dp_certificate=cert_bytes,
        key_commitment=commitment,
        recipients=stanzas,
    )
    signatures = [
        SignatureEntry(bytes.fromhex(kid), signer_map[kid].sign(signed_part, context=LABEL_SIGNATURE))
        for kid in signer_ids
    ]
    header_hash = hashlib.sha256(signed_part).digest()
    payload_key = hkdf_sha256(content_key, salt=None, info=LABEL_PAYLOAD_KEY)

    fd, tmp_name = tempfile.mkstemp(prefix=f".{out.name}.", suffix=".tmp", dir=out.parent)
    tmp = Path(tmp_name)
    try:
        os.fchmod(fd, 0o644)  # a package is public ciphertext; mkstemp would leave it 0600
        with os.fdopen(fd, "wb") as dst:
            dst.write(signed_part)
            dst.write(encode_signatures(signatures))
            reader = _ConcatReader(
                [(full, e, ident) for (full, _), e, ident in zip(collected, entries, identities)]
            )
            try:
                encrypt_stream(
                    payload_key,
                    reader,  # type: ignore[arg-type]
                    dst,
                    associated_data=LABEL_PAYLOAD_AD + header_hash,
                    chunk_size=chunk_size,
                )
            finally:
                reader.close()
            dst.flush()
            os.fsync(dst.fileno())
        try:
            os.link(tmp, out)  # fails if `out` appeared meanwhile: never overwrite
        except FileExistsError:
            raise PackageInputError(
                f"{out} already exists; choose another --out or remove it first"
            ) from None
        except OSError as exc:
            raise PackageInputError(f"cannot create {out}: {exc.strerror or exc}") from None
    except PackageError:
        raise
    except OSError as exc:
        raise PackageInputError(f"cannot write {out}: {exc.strerror or exc}") from None
    finally:
        with contextlib.suppress(OSError):
            tmp.unlink()
    with contextlib.suppress(OSError):
        dir_fd = os.open(out.parent, os.O_RDONLY)
        try:
            os.fsync(dir_fd)
        finally:
            os.close(dir_fd)
    return header_hash.hex()
