"""Inspecting, verifying and unpacking TSSP v1 packages (spec: "Verification")."""

from __future__ import annotations

import contextlib
import hashlib
import hmac
import os
import shutil
import tempfile
from collections.abc import Sequence
from datetime import UTC, datetime
from pathlib import Path
from typing import Any, BinaryIO, Literal

from tensafe.crypto import CryptoError, DecryptionError
from tensafe.crypto.aead import open_sealed
from tensafe.crypto.kdf import hkdf_sha256
from tensafe.crypto.kem import HybridKemPrivateKey
from tensafe.crypto.signing import HybridVerifyingKey
from tensafe.crypto.stream import decrypt_stream
from tensafe.package._audit import AuditSink, PackageAuditError, PackageEvent, emit
from tensafe.package._format import (
    LABEL_CONTENT_KEY_WRAP,
    LABEL_KEY_COMMITMENT,
    LABEL_PAYLOAD_AD,
    LABEL_PAYLOAD_KEY,
    LABEL_RECIPIENT,
    LABEL_SIGNATURE,
    ParsedHeader,
    read_header,
)
from tensafe.package._manifest import FileEntry, format_time
from tensafe.package._state import RollbackState
from tensafe.package._types import PackageInfo
from tensafe.package.errors import (
    NotARecipientError,
    PackageDecryptionError,
    PackageError,
    PackageExpiredError,
    PackageFormatError,
    PackageInputError,
    PolicyDeniedError,
    SignatureVerificationError,
    UntrustedSignerError,
)
from tensafe.policy import Policy, PolicyError

__all__ = ["POLICY_PACKAGE", "inspect", "unpack", "unpack_to_memory", "verify"]

#: The Rego package a TSSP admission policy must declare.
POLICY_PACKAGE = "tensafe.tssp"


def _open_package(path: Path) -> BinaryIO:
    try:
        fh = path.open("rb")
    except FileNotFoundError:
        raise PackageInputError(f"package {path} does not exist") from None
    except IsADirectoryError:
        raise PackageInputError(f"package {path} is a directory, not a file") from None
    except OSError as exc:
        raise PackageInputError(f"cannot read package {path}: {exc.strerror or exc}") from None
    return fh


def _parse(fh: BinaryIO) -> ParsedHeader:
    size = os.fstat(fh.fileno()).st_size
    return read_header(fh, file_size=size)


def _info(header: ParsedHeader, *, verified: bool, trusted: Sequence[str]) -> PackageInfo:
    m = header.manifest
    return PackageInfo(
        name=m.name,
        version=m.version,
        created=m.created,
        expires=m.expires,
        base_model_id=m.base_model_id,
        base_model_sha256=m.base_model_sha256,
        files=m.files,
        signers=tuple(s.key_id for s in m.signers),
        threshold=m.threshold,
        recipients=tuple(r.key_id.hex() for r in header.recipients),
        evidence=header.evidence,
        dp_certificate=header.dp_certificate,
        header_sha256=header.header_hash.hex(),
        verified=verified,
        trusted_signers=tuple(trusted),
        manifest=m.document,
    )


def _ids(seen: list[ParsedHeader]) -> dict[str, Any]:
    if not seen:
        return {}
    m = seen[-1].manifest
    return {"package": m.name, "version": m.version, "header_sha256": seen[-1].header_hash.hex()}


def _refused(
    audit: AuditSink | None,
    exc: PackageError,
    operation: Literal["verify", "unpack"],
    seen: list[ParsedHeader],
) -> None:
    """Record a refusal (the caller re-raises ``exc``); a failing sink raises PackageAuditError."""
    if not isinstance(exc, PackageAuditError):
        emit(audit, PackageEvent.from_error(exc, operation=operation, **_ids(seen)), cause=exc)


def _accepted(
    audit: AuditSink | None,
    operation: Literal["verify", "unpack"],
    seen: list[ParsedHeader],
    trusted: Sequence[str],
) -> None:
    m = seen[-1].manifest
    emit(
        audit,
        PackageEvent.create(
            f"tssp.{operation}.accepted",
            operation=operation,
            message=f"{operation} accepted {m.name} {m.version}",
            trusted_signers=tuple(trusted),
            **_ids(seen),
        ),
    )


def inspect(package: str | Path) -> PackageInfo:
    """Parse a package and return what it claims, **without** checking signatures or trust.

    The result has ``verified=False``; nothing in it may be relied on.

    Raises:
        PackageFormatError: The file is not a well-formed TSSP v1 package.
        PackageInputError: The file cannot be read.
    """
    with _open_package(Path(package)) as fh:
        return _info(_parse(fh), verified=False, trusted=())


def _check_signatures(header: ParsedHeader, trust: Sequence[HybridVerifyingKey], threshold: int) -> list[str]:
    """Steps 2 and 3: every signature verifies against its claimed key; count trusted signers."""
    trusted: list[str] = []
    for signer, entry in zip(header.manifest.signers, header.signatures, strict=True):
        try:
            claimed = HybridVerifyingKey.from_public_bytes(signer.public_key.encode("ascii"))
        except CryptoError:
            raise PackageFormatError(f"signer {signer.key_id}: public key is malformed") from None
        if not claimed.is_hybrid:
            raise PackageFormatError(
                f"signer {signer.key_id} uses a classical-only key; TSSP v1 requires hybrid keys"
            )
        if claimed.public_bytes().decode("ascii") != signer.public_key or claimed.key_id != signer.key_id:
            raise PackageFormatError(f"signer {signer.key_id}: key id or key encoding is not canonical")
        try:
            claimed.verify(entry.signature, header.signed_part, context=LABEL_SIGNATURE)
        except CryptoError:
            raise SignatureVerificationError(
                f"the signature by {signer.key_id} does not verify: the package was modified"
            ) from None
        if any(claimed == key for key in trust):
            trusted.append(signer.key_id)
    need = max(header.manifest.threshold, threshold)
    if not trusted:
        raise UntrustedSignerError(
            f"none of the package's signers ({', '.join(s.key_id for s in header.manifest.signers)}) "
            "is in the trust store; pass the signer's public key with --trust if you trust it"
        )
    if len(trusted) < need:
        raise UntrustedSignerError(
            f"only {len(trusted)} trusted signer(s) but {need} required "
            f"(manifest threshold {header.manifest.threshold}, verifier threshold {threshold})"
        )
    return trusted


def _policy_input(header: ParsedHeader, trusted: Sequence[str], need: int, now: datetime) -> dict[str, Any]:
    return {
        "manifest": header.manifest.document,
        "evidence": header.evidence,
        "dp_certificate": header.dp_certificate,
        "signers": {"trusted": list(trusted), "threshold": need},
        "now": format_time(now),
    }


def _verify_header(
    header: ParsedHeader,
    *,
    trust: Sequence[HybridVerifyingKey],
    state: RollbackState | None,
    policy: Policy | None,
    threshold: int,
    now: datetime | None,
) -> list[str]:
    if threshold < 1:
        raise PackageInputError("the verifier threshold must be at least 1")
    if not trust:
        raise PackageInputError("a trust store with at least one signer public key is required")
    trusted = _check_signatures(header, trust, threshold)
    now = now or datetime.now(UTC)
    m = header.manifest
    if now >= m.expires:
        raise PackageExpiredError(f"package {m.name} {m.version} expired at {format_time(m.expires)}")
    if state is not None:
        state.check(m.name, m.version, header.header_hash.hex())
    if policy is not None:
        if policy.package != POLICY_PACKAGE:
            raise PackageInputError(f"a TSSP policy must use 'package {POLICY_PACKAGE}'")
        need = max(m.threshold, threshold)
        try:
            reasons = policy.deny_reasons(_policy_input(header, trusted, need, now))
        except PolicyError as exc:
            raise PolicyDeniedError([f"policy error: {exc}"]) from None
        if reasons:
            raise PolicyDeniedError(reasons)
    return trusted


def verify(
    package: str | Path,
    *,
    trust: Sequence[HybridVerifyingKey],
    state: RollbackState | None,
    policy: Policy | None = None,
    threshold: int = 1,
    now: datetime | None = None,
    audit: AuditSink | None = None,
) -> PackageInfo:
    """Verify a package's header: format, signatures, trust, expiry, rollback and policy.

    On success the package is recorded as accepted in ``state``. The payload can only be
    authenticated by a recipient (see :func:`unpack`), but its length is checked here.

    Args:
        package: The ``.tssp`` file.
        trust: The signer public keys the caller trusts; keys inside the package are never trusted.
        state: Rollback state, or ``None`` to explicitly skip rollback protection.
        policy: A compiled Rego policy in ``package tensafe.tssp``, or ``None``.
        threshold: Minimum number of distinct trusted signers (the manifest's threshold also applies).
        now: The current time (default: the system clock).
        audit: Receives a :class:`~tensafe.package.PackageEvent` for the decision
            (``tssp.verify.accepted`` or the refusal); ``None`` records nothing. If it
            raises, the package is not accepted (:class:`~tensafe.package.PackageAuditError`).

    Returns:
        The verified package description.

    Raises:
        PackageError: A subclass naming the first check that failed.
    """
    seen: list[ParsedHeader] = []
    try:
        with _open_package(Path(package)) as fh:
            header = _parse(fh)
        seen.append(header)
        trusted = _verify_header(
            header, trust=trust, state=state, policy=policy, threshold=threshold, now=now
        )
        _accepted(audit, "verify", seen, trusted)
        if state is not None:
            state.accept(header.manifest.name, header.manifest.version, header.header_hash.hex())
    except PackageError as exc:
        _refused(audit, exc, "verify", seen)
        raise
    return _info(header, verified=True, trusted=trusted)


class _Splitter:
    """A write-only sink that splits the payload plaintext into the manifest's files, hashing each.

    Subclasses decide where a file's bytes go (:meth:`_open_file`, :meth:`_close_file`).
    """

    def __init__(self, files: Sequence[FileEntry]) -> None:
        self._files = list(files)
        self._index = -1
        self._open = False
        self._left = 0
        self._digest = hashlib.sha256()

    def _open_file(self, entry: FileEntry) -> None:
        raise NotImplementedError

    def _write_part(self, part: memoryview) -> None:
        raise NotImplementedError

    def _close_file(self) -> None:
        raise NotImplementedError

    def _advance(self) -> None:
        while True:
            if self._open:
                self._close_file()
                self._open = False
                if not hmac.compare_digest(self._digest.hexdigest(), self._files[self._index].sha256):
                    raise PackageDecryptionError("a decrypted file does not match the manifest")
            self._index += 1
            if self._index >= len(self._files):
                return
            entry = self._files[self._index]
            self._open_file(entry)
            self._open = True
            self._left = entry.size
            self._digest = hashlib.sha256()
            if self._left:
                return

    def write(self, data: bytes | memoryview) -> int:
        view = memoryview(data)
        pos = 0
        while pos < len(view):
            if not self._open:
                raise PackageDecryptionError("the payload is longer than the manifest says")
            n = min(self._left, len(view) - pos)
            part = view[pos : pos + n]
            self._write_part(part)
            self._digest.update(part)
            self._left -= n
            pos += n
            if self._left == 0:
                self._advance()
        return len(view)

    def finish(self) -> None:
        if self._open or self._index < len(self._files):
            raise PackageDecryptionError("the payload is shorter than the manifest says")


class _FileSplitter(_Splitter):
    """Writes each file under ``root`` (0600, never following a symlink), fsynced."""

    def __init__(self, root: Path, files: Sequence[FileEntry]) -> None:
        super().__init__(files)
        self._root = root
        self._fh: BinaryIO | None = None
        self._advance()

    def _open_file(self, entry: FileEntry) -> None:
        target = self._root.joinpath(*entry.path.split("/"))
        target.parent.mkdir(parents=True, exist_ok=True, mode=0o700)
        fd = os.open(target, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_NOFOLLOW, 0o600)
        self._fh = os.fdopen(fd, "wb")

    def _write_part(self, part: memoryview) -> None:
        assert self._fh is not None
        self._fh.write(part)

    def _close_file(self) -> None:
        assert self._fh is not None
        self._fh.flush()
        os.fsync(self._fh.fileno())
        self._fh.close()
        self._fh = None

    def close(self) -> None:
        if self._fh is not None:
            self._fh.close()
            self._fh = None


class _MemorySplitter(_Splitter):
    """Keeps each file in memory (``files``: path -> bytes); nothing touches a disk."""

    def __init__(self, files: Sequence[FileEntry]) -> None:
        super().__init__(files)
        self.files: dict[str, bytes] = {}
        self._buf = bytearray()
        self._advance()

    def _open_file(self, entry: FileEntry) -> None:
        self._buf = bytearray()

    def _write_part(self, part: memoryview) -> None:
        self._buf += part

    def _close_file(self) -> None:
        self.files[self._files[self._index].path] = bytes(self._buf)
        self._buf = bytearray()


def _write_file(path: Path, data: bytes) -> None:
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_NOFOLLOW, 0o600)
    with os.fdopen(fd, "wb") as fh:
        fh.write(data)
        fh.flush()
        os.fsync(fh.fileno())


def _content_key(header: ParsedHeader, recipient_key: HybridKemPrivateKey) -> bytes:
    rid = bytes.fromhex(recipient_key.key_id)
    stanza = next((r for r in header.recipients if r.key_id == rid), None)
    if stanza is None:
        raise NotARecipientError(
            f"key {recipient_key.key_id} is not a recipient of this package "
            f"(recipients: {', '.join(r.key_id.hex() for r in header.recipients)})"
        )
    try:
        shared = recipient_key.decapsulate(stanza.encapsulation)
        wrap_key = hkdf_sha256(shared, salt=None, info=LABEL_RECIPIENT + rid)
        content_key = open_sealed(
            wrap_key, stanza.wrapped_key, label=LABEL_CONTENT_KEY_WRAP, associated_data=rid
        )
    except CryptoError:
        raise PackageDecryptionError(
            "cannot decrypt the content key: the recipient stanza is corrupt"
        ) from None
    commitment = hkdf_sha256(content_key, salt=None, info=LABEL_KEY_COMMITMENT)
    if len(content_key) != 32 or not hmac.compare_digest(commitment, header.key_commitment):
        raise PackageDecryptionError("the content key does not match the package's key commitment")
    return content_key


def unpack(
    package: str | Path,
    out_dir: str | Path,
    *,
    recipient_key: HybridKemPrivateKey,
    trust: Sequence[HybridVerifyingKey],
    state: RollbackState | None,
    policy: Policy | None = None,
    threshold: int = 1,
    now: datetime | None = None,
    audit: AuditSink | None = None,
) -> PackageInfo:
    """Verify a package, then decrypt it into ``out_dir``, all or nothing.

    Every check of :func:`verify` runs before anything is decrypted. The files are written into a
    fresh temporary directory next to ``out_dir`` (mode 0700, files 0600), each checked against
    its manifest SHA-256, and the directory is renamed to ``out_dir`` only when all checks pass.
    ``out_dir`` then holds the adapter files plus ``tssp_manifest.json``, ``evidence.json`` and,
    if present, ``dp_certificate.json`` (the signed bytes).

    Args:
        package: The ``.tssp`` file.
        out_dir: Output directory; must not exist.
        recipient_key: The recipient's hybrid KEM private key.
        trust: The signer public keys the caller trusts.
        state: Rollback state, or ``None`` to explicitly skip rollback protection.
        policy: A compiled Rego policy in ``package tensafe.tssp``, or ``None``.
        threshold: Minimum number of distinct trusted signers.
        now: The current time (default: the system clock).
        audit: Receives a :class:`~tensafe.package.PackageEvent` for the decision
            (``tssp.unpack.accepted``, sent before ``out_dir`` appears, or the refusal);
            ``None`` records nothing. If it raises, nothing is unpacked.

    Returns:
        The verified package description.

    Raises:
        PackageError: A subclass naming the first check that failed; nothing is left on disk.
    """
    seen: list[ParsedHeader] = []
    try:
        return _unpack(
            package,
            Path(out_dir),
            recipient_key=recipient_key,
            trust=trust,
            state=state,
            policy=policy,
            threshold=threshold,
            now=now,
            audit=audit,
            seen=seen,
        )
    except PackageError as exc:
        _refused(audit, exc, "unpack", seen)
        raise


def _unpack(
    package: str | Path,
    out: Path,
    *,
    recipient_key: HybridKemPrivateKey,
    trust: Sequence[HybridVerifyingKey],
    state: RollbackState | None,
    policy: Policy | None,
    threshold: int,
    now: datetime | None,
    audit: AuditSink | None,
    seen: list[ParsedHeader],
) -> PackageInfo:
    if out.exists() or out.is_symlink():
        raise PackageInputError(f"{out} already exists; unpack into a new directory")
    if not out.parent.is_dir():
        raise PackageInputError(f"parent directory {out.parent} does not exist")
    with _open_package(Path(package)) as fh:
        header = _parse(fh)
        seen.append(header)
        trusted = _verify_header(
            header, trust=trust, state=state, policy=policy, threshold=threshold, now=now
        )
        content_key = _content_key(header, recipient_key)
        payload_key = hkdf_sha256(content_key, salt=None, info=LABEL_PAYLOAD_KEY)
        try:
            tmp = Path(tempfile.mkdtemp(prefix=f".{out.name}.tssp-", dir=out.parent))
        except OSError as exc:
            raise PackageInputError(
                f"cannot create a directory in {out.parent}: {exc.strerror or exc}"
            ) from None
        try:
            splitter = _FileSplitter(tmp, header.manifest.files)
            try:
                fh.seek(header.payload_offset)
                decrypt_stream(
                    payload_key,
                    fh,
                    splitter,  # type: ignore[arg-type]
                    associated_data=LABEL_PAYLOAD_AD + header.header_hash,
                )
                splitter.finish()
            except DecryptionError:
                raise PackageDecryptionError(
                    "the payload failed to decrypt: it was modified, truncated or extended"
                ) from None
            finally:
                splitter.close()
            _write_file(tmp / "tssp_manifest.json", header.manifest_bytes)
            _write_file(tmp / "evidence.json", header.evidence_bytes)
            if header.certificate_bytes:
                _write_file(tmp / "dp_certificate.json", header.certificate_bytes)
            if out.exists() or out.is_symlink():
                raise PackageInputError(f"{out} appeared while unpacking; unpack into a new directory")
            _accepted(audit, "unpack", seen, trusted)
            if state is not None:
                state.accept(header.manifest.name, header.manifest.version, header.header_hash.hex())
            os.rename(tmp, out)
        except PackageError:
            shutil.rmtree(tmp, ignore_errors=True)
            raise
        except OSError as exc:
            shutil.rmtree(tmp, ignore_errors=True)
            raise PackageInputError(f"cannot write {out}: {exc.strerror or exc}") from None
        except BaseException:
            shutil.rmtree(tmp, ignore_errors=True)
            raise
    with contextlib.suppress(OSError):
        dir_fd = os.open(out.parent, os.O_RDONLY)
        try:
            os.fsync(dir_fd)
        finally:
            os.close(dir_fd)
    return _info(header, verified=True, trusted=trusted)


def unpack_to_memory(
    package: str | Path,
    *,
    recipient_key: HybridKemPrivateKey,
    trust: Sequence[HybridVerifyingKey],
    state: RollbackState | None,
    policy: Policy | None = None,
    threshold: int = 1,
    now: datetime | None = None,
    audit: AuditSink | None = None,
) -> tuple[PackageInfo, dict[str, bytes]]:
    """Verify a package, then decrypt its files into memory only (for a serving process).

    The checks, their order and the audit events are those of :func:`unpack` (the decision is
    recorded as ``tssp.unpack.accepted`` or the refusal); no byte of the plaintext is written
    to a file. The whole payload is held in memory, so this is meant for adapters, not for
    packages of many gigabytes.

    Returns:
        The verified package description and ``{manifest path: file bytes}``, every file
        checked against its manifest SHA-256.

    Raises:
        PackageError: A subclass naming the first check that failed.
    """
    seen: list[ParsedHeader] = []
    try:
        with _open_package(Path(package)) as fh:
            header = _parse(fh)
            seen.append(header)
            trusted = _verify_header(
                header, trust=trust, state=state, policy=policy, threshold=threshold, now=now
            )
            content_key = _content_key(header, recipient_key)
            payload_key = hkdf_sha256(content_key, salt=None, info=LABEL_PAYLOAD_KEY)
            splitter = _MemorySplitter(header.manifest.files)
            try:
                fh.seek(header.payload_offset)
                decrypt_stream(
                    payload_key,
                    fh,
                    splitter,  # type: ignore[arg-type]
                    associated_data=LABEL_PAYLOAD_AD + header.header_hash,
                )
                splitter.finish()
            except DecryptionError:
                raise PackageDecryptionError(
                    "the payload failed to decrypt: it was modified, truncated or extended"
                ) from None
        _accepted(audit, "unpack", seen, trusted)
        if state is not None:
            state.accept(header.manifest.name, header.manifest.version, header.header_hash.hex())
    except PackageError as exc:
        _refused(audit, exc, "unpack", seen)
        raise
    return _info(header, verified=True, trusted=trusted), splitter.files
