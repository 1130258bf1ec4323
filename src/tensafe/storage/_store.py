"""The encrypted artifact store: per-tenant envelope encryption over a blob backend."""

from __future__ import annotations

import contextlib
import io
import json
import os
import re
import secrets
import struct
from collections.abc import Iterable, Iterator, Mapping
from dataclasses import dataclass, field
from datetime import UTC, datetime
from pathlib import Path
from types import MappingProxyType
from typing import BinaryIO, Protocol, runtime_checkable

from tensafe.crypto.aead import open_sealed, seal
from tensafe.crypto.errors import CryptoError
from tensafe.crypto.hashing import ThreadedSha256
from tensafe.crypto.kdf import hkdf_sha256
from tensafe.crypto.mac import keyed_digest
from tensafe.crypto.stream import CHUNK_SIZE, StreamDecryptor, decrypt_stream, encrypt_stream
from tensafe.storage import _format
from tensafe.storage._backend import BlobBackend
from tensafe.storage._errors import ArtifactIntegrityError, StoreError

__all__ = ["ArtifactInfo", "DekResolver", "EncryptedArtifactStore"]

_ID = re.compile(r"[A-Za-z0-9][A-Za-z0-9._-]{0,127}")
_KIND = re.compile(r"[a-z][a-z0-9_.-]{0,63}")
_SUFFIX = ".tsa"
_READ_BLOCK = 1 << 20
_MAX_META_JSON = 16 * 1024
_TRAILER = struct.Struct(">32sQ")


#: HKDF info of the key behind :meth:`EncryptedArtifactStore.tenant_digest`.
_LABEL_TENANT_DIGEST = b"tensafe/tenant-digest/v1"


@runtime_checkable
class DekResolver(Protocol):
    """Gives the store a tenant's data-encryption keys (implemented by :mod:`tensafe.keys`).

    The store never sees a KEK and never stores a DEK; it asks for the key each time.
    """

    def encryption_key(self, tenant: str) -> tuple[int, bytes]:
        """Return ``(dek_version, dek)``: the tenant's current 32-byte DEK for new data."""
        ...

    def decryption_key(self, tenant: str, dek_version: int) -> bytes:
        """Return the tenant's 32-byte DEK of ``dek_version`` to read existing data."""
        ...


@dataclass(frozen=True)
class ArtifactInfo:
    """What the store knows about one artifact (no secrets).

    Attributes:
        tenant: Owning tenant.
        artifact_id: Identifier unique within the tenant.
        kind: Caller-chosen category such as ``"adapter"`` or ``"dataset"``.
        metadata: Caller-supplied string key/value pairs (stored encrypted).
        dek_version: Version of the tenant DEK the artifact is encrypted under.
        size: Plaintext size in bytes.
        sha256: Hex SHA-256 of the plaintext, computed while streaming.
        created_at: When the artifact was written (UTC).
    """

    tenant: str
    artifact_id: str
    kind: str
    metadata: Mapping[str, str] = field(default_factory=dict)
    dek_version: int = 0
    size: int = 0
    sha256: str = ""
    created_at: datetime = field(default_factory=lambda: datetime.now(UTC))


def _check_id(value: str, what: str) -> str:
    if not isinstance(value, str) or not _ID.fullmatch(value):
        raise StoreError(
            f"invalid {what}: use 1-128 letters, digits, '.', '_' or '-', starting with a letter or digit"
        )
    return value


def _check_metadata(kind: str, metadata: Mapping[str, str] | None) -> bytes:
    if not isinstance(kind, str) or not _KIND.fullmatch(kind):
        raise StoreError("invalid artifact kind: use 1-64 lowercase letters, digits, '.', '_' or '-'")
    meta = dict(metadata or {})
    if not all(isinstance(k, str) and isinstance(v, str) for k, v in meta.items()):
        raise StoreError("artifact metadata must map strings to strings")
    text = json.dumps({"kind": kind, "metadata": meta}, sort_keys=True, separators=(",", ":")).encode()
    if len(text) > _MAX_META_JSON:
        raise StoreError(f"artifact metadata too large (at most {_MAX_META_JSON} bytes of JSON)")
    return text


def _subkey(dek: bytes, header: _format.Header) -> bytes:
    if len(dek) != 32:
        raise StoreError("the key resolver returned a DEK that is not 32 bytes")
    return hkdf_sha256(
        dek,
        salt=header.salt,
        info=_format.subkey_info(header.tenant, header.artifact_id, header.dek_version),
    )


class _HashingSource:
    """Reads plaintext from ``src`` for the encryptor while hashing it on a worker thread.

    With a ``readinto`` source the plaintext lands directly in the encryptor's
    preallocated buffers (no copy); every pending hash is waited for before a buffer is
    refilled, so the worker never reads bytes that are being overwritten. A source with
    only ``read`` returns fresh immutable ``bytes``: those are hashed as they are and
    copied once into the encryptor's buffer.
    """

    def __init__(self, src: BinaryIO, digest: ThreadedSha256) -> None:
        self._src = src
        self._digest = digest
        self._readinto = getattr(src, "readinto", None)
        self._extra = memoryview(b"")
        self.size = 0

    def readinto(self, buffer: bytearray | memoryview) -> int:
        view = memoryview(buffer).cast("B")
        if self._readinto is not None:
            self._digest.wait()
            n = self._readinto(view)
            if type(n) is not int:
                raise StoreError("the artifact source is non-blocking and had no data; use a blocking stream")
            if n:
                self._digest.update(view[:n])
        else:
            if not self._extra:
                data = self._src.read(len(view))
                if type(data) is not bytes:  # a mutable buffer could change under the worker
                    data = bytes(data)
                if data:
                    self._digest.update(data)
                self._extra = memoryview(data)
            n = min(len(view), len(self._extra))
            # A source may return more than asked for: the rest is served by the next call.
            view[:n] = self._extra[:n]
            self._extra = self._extra[n:]
        self.size += n
        return n


def _take(reader: _DecryptingReader, size: int) -> bytes:
    buf, pos = reader._buf, reader._pos
    left = len(buf) - pos
    if left <= 0:
        return b""
    if pos == 0 and (size < 0 or size >= left) and isinstance(buf, bytes):
        reader._pos = left
        return buf
    n = left if size < 0 else min(size, left)
    reader._pos = pos + n
    return bytes(memoryview(buf)[pos : pos + n])


class _DecryptingReader(io.RawIOBase):
    """Returns authenticated plaintext of a stored artifact; fails closed at EOF.

    Each chunk is released only after it authenticates. Truncation, reordering and a
    wrong trailer are detected when the end is reached: the last read then raises
    :class:`ArtifactIntegrityError` instead of returning EOF.
    """

    def __init__(self, src: BinaryIO, key: bytes, header: _format.Header, body_ad: bytes) -> None:
        super().__init__()
        self._src = src
        self._key = key
        self._ad = body_ad
        self._trailer_len = header.trailer_len
        try:
            self._dec = StreamDecryptor(key, associated_data=body_ad)
        except CryptoError:
            raise ArtifactIntegrityError() from None
        self._hash = ThreadedSha256()  # inputs are immutable bytes from the decryptor
        self._size = 0
        self._tail = b""
        self._buf = b""
        self._pos = 0
        self._done = False

    def readable(self) -> bool:
        return True

    def _step(self) -> bytes:
        block = self._src.read(_READ_BLOCK)
        if block:
            # Hold back the last trailer_len bytes: they are the trailer if EOF follows.
            data = self._tail + block if self._tail else block
            if len(data) <= self._trailer_len:
                self._tail = data
                return b""
            cut = len(data) - self._trailer_len
            self._tail = data[cut:]
            return self._dec.update(memoryview(data)[:cut])  # type: ignore[arg-type]
        if len(self._tail) != self._trailer_len:
            raise ArtifactIntegrityError()
        tail = self._dec.finalize()
        self._hash.update(tail)
        self._size += len(tail)
        digest, size = _TRAILER.unpack(
            open_sealed(self._key, self._tail, label=_format.LABEL_TRAILER, associated_data=self._ad)
        )
        if not secrets.compare_digest(digest, self._hash.digest()) or size != self._size:
            raise ArtifactIntegrityError()
        self._done = True
        return tail

    def _fill(self) -> None:
        while self._pos >= len(self._buf) and not self._done:
            try:
                out = self._step()
            except ArtifactIntegrityError:
                raise
            except (CryptoError, ValueError, struct.error):
                raise ArtifactIntegrityError() from None
            if not self._done:
                self._hash.update(out)
                self._size += len(out)
            self._buf = out
            self._pos = 0

    def readinto(self, buffer: memoryview) -> int:  # type: ignore[override]
        self._fill()
        n = min(len(buffer), len(self._buf) - self._pos)
        buffer[:n] = memoryview(self._buf)[self._pos : self._pos + n]
        self._pos += n
        return n

    def read(self, size: int = -1) -> bytes:
        """Return the next verified piece without an extra copy when it fits in ``size``."""
        self._fill()
        return _take(self, size)

    def close(self) -> None:
        """Stop the hashing thread (also on failure)."""
        self._hash.close()
        super().close()

    @property
    def verified(self) -> bool:
        return self._done

    @property
    def sha256(self) -> str:
        return self._hash.hexdigest()

    @property
    def size(self) -> int:
        return self._size


class _BodyReader:
    """Reads the STREAM body of a blob, holding back the last ``trailer_len`` bytes.

    ``readinto`` fills the caller's buffer directly from the blob stream; only the few
    bytes of the trailer candidate are copied. After EOF, :attr:`trailer` holds what
    should be the sealed trailer (shorter if the blob was truncated).
    """

    def __init__(self, src: BinaryIO, trailer_len: int) -> None:
        self._src = src
        self._n = trailer_len
        self._tail = b""
        self._eof = False

    @property
    def trailer(self) -> bytes:
        return self._tail

    def _raw_into(self, view: memoryview) -> int:
        readinto = getattr(self._src, "readinto", None)
        if readinto is not None:
            return int(readinto(view) or 0)
        data = self._src.read(len(view))
        view[: len(data)] = data
        return len(data)

    def readinto(self, buffer: bytearray | memoryview) -> int:
        view = memoryview(buffer).cast("B")
        if not view:
            return 0
        if len(view) <= self._n:
            # Too small to also hold back the trailer: go through a scratch buffer.
            scratch = bytearray(len(view) + self._n)
            got = self.readinto(scratch)
            view[:got] = scratch[:got]
            return got
        got = len(self._tail)
        view[:got] = self._tail
        while got <= self._n and not self._eof:
            n = self._raw_into(view[got:])
            if n == 0:
                self._eof = True
            got += n
        if got <= self._n:
            self._tail = bytes(view[:got])
            return 0
        self._tail = bytes(view[got - self._n : got])
        return got - self._n


class _HashingSink:
    """Passes verified plaintext to ``dst`` while hashing it on a worker thread.

    The decryptor reuses its output buffer for the next chunk, so :meth:`write` waits
    for the hash before returning; the hash still overlaps ``dst.write``.
    """

    def __init__(self, dst: BinaryIO | None, digest: ThreadedSha256) -> None:
        self._dst = dst
        self._digest = digest
        self.size = 0

    def write(self, data: bytes | memoryview) -> int:
        self._digest.update(data)
        if self._dst is not None:
            self._dst.write(data)
        self._digest.wait()
        self.size += len(data)
        return len(data)


class EncryptedArtifactStore:
    """Per-tenant encrypted artifacts on a :class:`~tensafe.storage.BlobBackend`.

    Every artifact is encrypted with a key derived (HKDF-SHA256 with a random 128-bit
    salt) from the tenant's current DEK and streamed through
    :mod:`tensafe.crypto.stream`, so memory use is constant for any size. The body's
    associated data binds the format version, tenant, artifact id, DEK version and the
    whole header, so a blob copied to another tenant or artifact id, or with any byte
    changed, fails to decrypt. See ``docs/security/keys.md`` for the format.
    """

    def __init__(
        self, backend: BlobBackend, key_resolver: DekResolver, *, chunk_size: int = CHUNK_SIZE
    ) -> None:
        """Create a store.

        Args:
            backend: Where the encrypted blobs live.
            key_resolver: Supplies tenant DEKs (normally a :class:`tensafe.keys.KeyManager`).
            chunk_size: Plaintext bytes per STREAM chunk of new artifacts.
        """
        self._backend = backend
        self._keys = key_resolver
        self._chunk_size = chunk_size

    def __repr__(self) -> str:
        return f"EncryptedArtifactStore(backend={self._backend!r})"

    @property
    def backend(self) -> BlobBackend:
        """The blob backend holding the ciphertext."""
        return self._backend

    @staticmethod
    def _key(tenant: str, artifact_id: str) -> str:
        return f"{_check_id(tenant, 'tenant id')}/{_check_id(artifact_id, 'artifact id')}{_SUFFIX}"

    def put(
        self,
        tenant: str,
        artifact_id: str,
        src: BinaryIO,
        *,
        kind: str,
        metadata: Mapping[str, str] | None = None,
        overwrite: bool = False,
    ) -> ArtifactInfo:
        """Encrypt everything readable from ``src`` and store it atomically.

        Args:
            tenant: Owning tenant.
            artifact_id: Identifier unique within the tenant.
            src: Readable binary stream of plaintext, read until EOF.
            kind: Category of the artifact (lowercase identifier).
            metadata: String key/value pairs stored encrypted with the artifact.
            overwrite: Replace an existing artifact of the same id (refused otherwise).

        Returns:
            The stored artifact's info, including the plaintext SHA-256 and size.

        Raises:
            StoreError: Invalid ids, kind or metadata, or the artifact exists and
                ``overwrite`` is false.
        """
        key = self._key(tenant, artifact_id)
        meta_json = _check_metadata(kind, metadata)
        if not overwrite and self._backend.exists(key):
            raise StoreError(f"artifact {artifact_id!r} already exists for this tenant; pass overwrite=True")
        with self._backend.open_atomic(key) as out:
            return self._encrypt_into(
                tenant, artifact_id, src, out, kind=kind, metadata=metadata, meta_json=meta_json
            )

    def ensure_key(self, tenant: str) -> None:
        """Make sure the tenant has a DEK (created on first use).

        Call it outside any database transaction before work that will need the tenant's
        key inside one (on SQLite, creating a DEK while another connection holds the write
        lock would wait for that lock).
        """
        self._keys.encryption_key(tenant)

    def tenant_digest(self, tenant: str, *, label: bytes, data: bytes | Iterable[bytes]) -> str:
        """A keyed digest of ``data`` under the tenant's key, as 64 hex digits.

        ``HMAC-SHA256(K, label || 0x00 || data)`` with ``K = HKDF-SHA256(DEK version 1 of the
        tenant, info = b"tensafe/tenant-digest/v1")``. It recognises the same data again
        (de-duplication, a data set registered twice) without letting anyone who reads the
        digest (the audit log, the database) confirm a guess of low-entropy data, and it
        becomes unlinkable once the tenant is crypto-shredded. The tenant's first DEK anchors
        it, so it is stable across DEK rotations (retired DEKs stay until shredding).

        Raises:
            KeyNotFoundError, TenantShreddedError: From the key resolver.
        """
        self._keys.encryption_key(tenant)  # creates DEK version 1 on first use
        key = hkdf_sha256(self._keys.decryption_key(tenant, 1), salt=None, info=_LABEL_TENANT_DIGEST)
        return keyed_digest(key, label=label, data=data).hex()

    def seal_bytes(
        self,
        tenant: str,
        artifact_id: str,
        data: bytes,
        *,
        kind: str,
        metadata: Mapping[str, str] | None = None,
    ) -> tuple[bytes, ArtifactInfo]:
        """Encrypt ``data`` into a complete TSAF v1 blob in memory, without storing it.

        The blob is exactly what :meth:`put` would write for ``(tenant, artifact_id)``;
        the caller keeps it (for instance in a database row, committed with the
        transaction that needs it) and decrypts it with :meth:`unseal_bytes` under the
        same tenant and artifact id. Meant for small records, where a file, its fsync and
        a directory fsync would cost more than the data.

        Raises:
            StoreError: Invalid ids, kind or metadata.
        """
        self._key(tenant, artifact_id)  # validates the ids
        meta_json = _check_metadata(kind, metadata)
        out = io.BytesIO()
        info = self._encrypt_into(
            tenant, artifact_id, io.BytesIO(data), out, kind=kind, metadata=metadata, meta_json=meta_json
        )
        return out.getvalue(), info

    def unseal_bytes(self, tenant: str, artifact_id: str, blob: bytes) -> bytes:
        """Decrypt and verify a blob made by :meth:`seal_bytes` for ``(tenant, artifact_id)``.

        Raises:
            ArtifactIntegrityError: The blob was modified, truncated, made for another
                tenant or artifact id, or is not a TSAF blob (one opaque error).
        """
        self._key(tenant, artifact_id)
        out = io.BytesIO()
        self._decrypt_to(tenant, artifact_id, out, blob=blob)
        return out.getvalue()

    def _encrypt_into(
        self,
        tenant: str,
        artifact_id: str,
        src: BinaryIO,
        out: BinaryIO,
        *,
        kind: str,
        metadata: Mapping[str, str] | None,
        meta_json: bytes,
    ) -> ArtifactInfo:
        dek_version, dek = self._keys.encryption_key(tenant)
        salt = secrets.token_bytes(16)
        created = datetime.now(UTC)
        draft = _format.Header(
            tenant=tenant,
            artifact_id=artifact_id,
            dek_version=dek_version,
            chunk_size=self._chunk_size,
            salt=salt,
            created_at=created.strftime("%Y-%m-%dT%H:%M:%S.%fZ"),
            sealed_meta=b"",
            trailer_len=0,
        )
        subkey = _subkey(dek, draft)
        meta_ad = _format.associated_data(tenant, artifact_id, dek_version, salt)
        sealed_meta = seal(subkey, meta_json, label=_format.LABEL_META, associated_data=meta_ad)
        trailer_len = len(seal(subkey, bytes(_TRAILER.size), label=_format.LABEL_TRAILER))
        header = _format.Header(
            **{**draft.__dict__, "sealed_meta": sealed_meta, "trailer_len": trailer_len, "raw": b""}
        )
        header = _format.Header(**{**header.__dict__, "raw": _format.encode_header(header)})
        body_ad = _format.associated_data(tenant, artifact_id, dek_version, salt, header.digest)
        # header | STREAM body (preallocated buffers, AES-GCM into place) | sealed trailer,
        # written straight to the backend's atomic writer; the plaintext SHA-256 runs on
        # a worker thread, overlapping encryption and writing.
        with ThreadedSha256() as digest:
            source = _HashingSource(src, digest)
            out.write(header.raw)
            encrypt_stream(
                subkey,
                source,  # type: ignore[arg-type]
                out,
                associated_data=body_ad,
                chunk_size=self._chunk_size,
            )
            sha256 = digest.digest()
            trailer = seal(
                subkey,
                _TRAILER.pack(sha256, source.size),
                label=_format.LABEL_TRAILER,
                associated_data=body_ad,
            )
            if len(trailer) != trailer_len:  # pragma: no cover - format invariant
                raise StoreError("internal error: trailer length mismatch")
            out.write(trailer)
        return ArtifactInfo(
            tenant=tenant,
            artifact_id=artifact_id,
            kind=kind,
            metadata=MappingProxyType(dict(metadata or {})),
            dek_version=dek_version,
            size=source.size,
            sha256=sha256.hex(),
            created_at=created,
        )

    def put_bytes(
        self, tenant: str, artifact_id: str, data: bytes, *, kind: str, **kwargs: object
    ) -> ArtifactInfo:
        """Convenience form of :meth:`put` for an in-memory payload."""
        return self.put(tenant, artifact_id, io.BytesIO(data), kind=kind, **kwargs)  # type: ignore[arg-type]

    def _open_header(
        self, tenant: str, artifact_id: str, stream: BinaryIO
    ) -> tuple[_format.Header, bytes, dict[str, object]]:
        header = _format.parse_header(stream)
        if header.tenant != tenant or header.artifact_id != artifact_id:
            raise ArtifactIntegrityError()
        try:
            dek = self._keys.decryption_key(tenant, header.dek_version)
        except KeyError:
            # The header is not authenticated yet: an unknown DEK version is treated as
            # tampering. (Shredded tenants raise their own, non-KeyError, error.)
            raise ArtifactIntegrityError() from None
        subkey = _subkey(dek, header)
        meta_ad = _format.associated_data(tenant, artifact_id, header.dek_version, header.salt)
        try:
            meta = json.loads(
                open_sealed(subkey, header.sealed_meta, label=_format.LABEL_META, associated_data=meta_ad)
            )
        except (CryptoError, ValueError):
            raise ArtifactIntegrityError() from None
        return header, subkey, meta

    @contextlib.contextmanager
    def _body(
        self, tenant: str, artifact_id: str, blob: bytes | None = None
    ) -> Iterator[tuple[BinaryIO, _format.Header, bytes, bytes, ArtifactInfo]]:
        key = self._key(tenant, artifact_id)
        source: contextlib.AbstractContextManager[BinaryIO] = (
            self._backend.get_stream(key) if blob is None else contextlib.nullcontext(io.BytesIO(blob))
        )
        with source as stream:
            header, subkey, meta = self._open_header(tenant, artifact_id, stream)
            body_ad = _format.associated_data(
                tenant, artifact_id, header.dek_version, header.salt, header.digest
            )
            try:
                # The header is authenticated only once the body is (its digest is in the body's
                # associated data): a tampered timestamp must fail as tampering, not as a parse error.
                created_at = datetime.strptime(header.created_at, "%Y-%m-%dT%H:%M:%S.%fZ").replace(tzinfo=UTC)
            except ValueError:
                raise ArtifactIntegrityError() from None
            info = ArtifactInfo(
                tenant=tenant,
                artifact_id=artifact_id,
                kind=str(meta["kind"]),
                metadata=MappingProxyType(dict(meta["metadata"])),  # type: ignore[call-overload]
                dek_version=header.dek_version,
                created_at=created_at,
            )
            yield stream, header, subkey, body_ad, info

    @contextlib.contextmanager
    def _reader(self, tenant: str, artifact_id: str) -> Iterator[tuple[_DecryptingReader, ArtifactInfo]]:
        with self._body(tenant, artifact_id) as (stream, header, subkey, body_ad, info):
            reader = _DecryptingReader(stream, subkey, header, body_ad)
            try:
                yield reader, info
            finally:
                reader.close()

    def _decrypt_to(
        self, tenant: str, artifact_id: str, dst: BinaryIO | None, *, blob: bytes | None = None
    ) -> ArtifactInfo:
        """Decrypt into ``dst`` (or nowhere) with preallocated buffers; verify the trailer."""
        with self._body(tenant, artifact_id, blob) as (stream, header, subkey, body_ad, info):
            body = _BodyReader(stream, header.trailer_len)
            with ThreadedSha256(max_in_flight=1) as digest:
                sink = _HashingSink(dst, digest)
                try:
                    decrypt_stream(subkey, body, sink, associated_data=body_ad)  # type: ignore[arg-type]
                    if len(body.trailer) != header.trailer_len:
                        raise ArtifactIntegrityError()
                    sealed = open_sealed(
                        subkey, body.trailer, label=_format.LABEL_TRAILER, associated_data=body_ad
                    )
                    want, size = _TRAILER.unpack(sealed)
                except (CryptoError, ValueError, struct.error):
                    raise ArtifactIntegrityError() from None
                got = digest.digest()
            if not secrets.compare_digest(want, got) or size != sink.size:
                raise ArtifactIntegrityError()
            return ArtifactInfo(**{**info.__dict__, "size": sink.size, "sha256": got.hex()})

    def get(self, tenant: str, artifact_id: str, dst: BinaryIO) -> ArtifactInfo:
        """Decrypt an artifact into ``dst``, verifying every chunk and the trailer.

        Chunks are written as they authenticate; if a later check fails the error is
        raised after ``dst`` has received a verified prefix. Use :meth:`get_to_path`
        for all-or-nothing output. The blob is read into and decrypted in preallocated
        buffers, and the plaintext SHA-256 runs on a worker thread.

        Raises:
            ArtifactNotFoundError: No such artifact.
            ArtifactIntegrityError: The stored artifact was modified, truncated,
                swapped or is malformed (one opaque error for every cause).
        """
        return self._decrypt_to(tenant, artifact_id, dst)

    def get_to_path(self, tenant: str, artifact_id: str, path: str | os.PathLike[str]) -> ArtifactInfo:
        """Decrypt an artifact to ``path`` atomically (temp file, fsync, rename; mode 0600).

        Nothing is created at ``path`` unless the whole artifact verifies.
        """
        target = Path(path)
        tmp = target.with_name(f".{target.name}.{secrets.token_hex(6)}.part")
        fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
        try:
            with os.fdopen(fd, "wb") as out:
                info = self.get(tenant, artifact_id, out)
                out.flush()
                os.fsync(out.fileno())
            os.replace(tmp, target)
        except BaseException:
            with contextlib.suppress(FileNotFoundError):
                tmp.unlink()
            raise
        return info

    def get_bytes(self, tenant: str, artifact_id: str) -> bytes:
        """Decrypt a (small) artifact into memory and return its plaintext."""
        out = io.BytesIO()
        self.get(tenant, artifact_id, out)
        return out.getvalue()

    @contextlib.contextmanager
    def open(self, tenant: str, artifact_id: str) -> Iterator[BinaryIO]:
        """Open an artifact as a readable stream of verified plaintext.

        Each chunk is authenticated before it is returned; truncation or a bad trailer
        is detected at the end, where the final ``read`` raises
        :class:`ArtifactIntegrityError` instead of returning ``b""``. Do not act on the
        data before reaching EOF if that matters.
        """
        with self._reader(tenant, artifact_id) as (reader, _info):
            yield io.BufferedReader(reader, buffer_size=_READ_BLOCK)  # type: ignore[misc]

    def info(self, tenant: str, artifact_id: str) -> ArtifactInfo:
        """Return an artifact's info after verifying the whole artifact.

        This decrypts the artifact (discarding the plaintext) so the returned size and
        hash are ones that verified.
        """
        return self._decrypt_to(tenant, artifact_id, None)

    def exists(self, tenant: str, artifact_id: str) -> bool:
        """Whether a complete blob exists for the artifact (does not verify it)."""
        return self._backend.exists(self._key(tenant, artifact_id))

    def delete(self, tenant: str, artifact_id: str) -> bool:
        """Delete an artifact's blob; returns whether one existed."""
        return self._backend.delete(self._key(tenant, artifact_id))

    def list(self, tenant: str) -> list[str]:
        """Return the sorted ids of the tenant's artifacts (no decryption)."""
        prefix = _check_id(tenant, "tenant id")
        ids = []
        for key in self._backend.list(prefix):
            name = key.split("/", 1)[1] if "/" in key else ""
            if name.endswith(_SUFFIX) and "/" not in name:
                ids.append(name[: -len(_SUFFIX)])
        return sorted(ids)
