"""Chunked authenticated encryption of large data in constant memory (STREAM).

The construction follows age's payload encryption (Hoang, Reyhanitabar, Rogaway
and Vizár's STREAM) on AES-256-GCM. Layout (docs/spec/crypto.md, "Stream")::

    header  = version (1) = 0x01 | alg (1) = 0x03 | log2(chunk_size) (1) | salt (32, random)
    chunk_i = AES-256-GCM(stream_key, nonce_i, plaintext_i, aad_i)   (ciphertext || 16-byte tag)

    stream_key (32) || nonce_prefix (7) = HKDF-SHA256(ikm=key, salt=salt,
                                                      info="tensafe/stream/v1" || header[0:3], L=39)
    nonce_i = nonce_prefix (7) || uint32_be(i) || final_flag (1: 0x01 on the last chunk, else 0x00)
    aad_i   = header (35) || associated_data || uint32_be(i) || final_flag (1)

Every chunk but the last holds exactly ``chunk_size`` plaintext bytes; the last holds
1 to ``chunk_size`` bytes, or 0 bytes only when the whole plaintext is empty (an
empty stream is one empty final chunk). Truncation at a chunk boundary, reordering,
appending, dropping or swapping chunks between streams, and a different
``associated_data`` all fail with the one opaque
:class:`~tensafe.crypto.errors.DecryptionError`.

Decryption releases each chunk only after its tag verifies, but a failure late in
the stream leaves the earlier chunks already written: callers that need
all-or-nothing output write to a temporary file and rename it after success.

Example:
    >>> import io, os
    >>> key = os.urandom(32)
    >>> ct = io.BytesIO()
    >>> _ = encrypt_stream(key, io.BytesIO(b"data"), ct, associated_data=b"tensafe/x")
    >>> pt = io.BytesIO()
    >>> _ = decrypt_stream(key, io.BytesIO(ct.getvalue()), pt, associated_data=b"tensafe/x")
    >>> pt.getvalue()
    b'data'
"""

from __future__ import annotations

import os
from typing import BinaryIO, Final

from cryptography.exceptions import InvalidTag
from cryptography.hazmat.primitives.ciphers.aead import AESGCM

from tensafe.crypto.errors import CryptoUsageError, DecryptionError
from tensafe.crypto.hazmat import primitives
from tensafe.crypto.hazmat.formats import ALG_STREAM_AES256_GCM, FORMAT_VERSION, LABEL_STREAM

__all__ = [
    "CHUNK_SIZE",
    "HEADER_SIZE",
    "MAX_CHUNK_SIZE",
    "MIN_CHUNK_SIZE",
    "TAG_SIZE",
    "StreamDecryptor",
    "StreamEncryptor",
    "decrypt_stream",
    "encrypt_stream",
]

#: Default plaintext bytes per chunk (1 MiB; see docs/spec/crypto.md for the measurement).
CHUNK_SIZE: Final = 1 << 20
#: Smallest allowed chunk size (1 KiB).
MIN_CHUNK_SIZE: Final = 1 << 10
#: Largest allowed chunk size (16 MiB).
MAX_CHUNK_SIZE: Final = 1 << 24
#: Authentication tag bytes per chunk.
TAG_SIZE: Final = 16
_SALT: Final = 32
#: Header bytes before the first chunk.
HEADER_SIZE: Final = 3 + _SALT
_PREFIX: Final = 7
_MAX_CHUNKS: Final = 1 << 32
_KEY_SIZE: Final = 32


def _check_key(key: bytes) -> bytes:
    if not isinstance(key, bytes | bytearray | memoryview) or len(key) != _KEY_SIZE:
        raise CryptoUsageError("the stream key must be 32 bytes (AES-256)")
    return bytes(key)


def _chunk_exponent(chunk_size: int) -> int:
    if (
        type(chunk_size) is not int
        or not MIN_CHUNK_SIZE <= chunk_size <= MAX_CHUNK_SIZE
        or chunk_size & (chunk_size - 1)
    ):
        raise CryptoUsageError("chunk_size must be a power of two from 1 KiB to 16 MiB")
    return chunk_size.bit_length() - 1


class _Keys:
    """Per-stream key schedule: the AEAD object, nonce prefix and AAD prefix."""

    __slots__ = ("aad_prefix", "aead", "prefix")

    def __init__(self, key: bytes, header: bytes, associated_data: bytes) -> None:
        okm = primitives.hkdf_sha256_raw(
            key, salt=header[3:], info=LABEL_STREAM + header[:3], length=_KEY_SIZE + _PREFIX
        )
        self.aead = AESGCM(okm[:_KEY_SIZE])
        self.prefix = okm[_KEY_SIZE:]
        self.aad_prefix = header + bytes(associated_data)

    def __repr__(self) -> str:
        return "_Keys(<redacted>)"

    def nonce_aad(self, index: int, final: bool) -> tuple[bytes, bytes]:
        trailer = index.to_bytes(4, "big") + (b"\x01" if final else b"\x00")
        return self.prefix + trailer, self.aad_prefix + trailer


def _new_header(chunk_size: int) -> bytes:
    return bytes([FORMAT_VERSION, ALG_STREAM_AES256_GCM, _chunk_exponent(chunk_size)]) + os.urandom(_SALT)


def _parse_header(header: bytes) -> int:
    """Return the chunk size of a stream header; DecryptionError if malformed."""
    if (
        len(header) != HEADER_SIZE
        or header[0] != FORMAT_VERSION
        or header[1] != ALG_STREAM_AES256_GCM
        or not MIN_CHUNK_SIZE.bit_length() - 1 <= header[2] <= MAX_CHUNK_SIZE.bit_length() - 1
    ):
        raise DecryptionError
    return 1 << header[2]


def _read_full(src: BinaryIO, buf: bytearray) -> int:
    """Fill ``buf`` from ``src`` as far as possible; return the bytes read (short only at EOF)."""
    view = memoryview(buf)
    total = 0
    readinto = getattr(src, "readinto", None)
    while total < len(buf):
        if readinto is not None:
            n = readinto(view[total:])
        else:
            data = src.read(len(buf) - total)
            n = len(data)
            view[total : total + n] = data
        if not n:
            break
        total += n
    return total


class StreamEncryptor:
    """Incremental STREAM encryption: feed plaintext with :meth:`update`, end with :meth:`finalize`.

    Memory use is bounded by one chunk plus the data of the current call.
    """

    def __init__(self, key: bytes, *, associated_data: bytes, chunk_size: int = CHUNK_SIZE) -> None:
        """Start a stream.

        Args:
            key: A 32-byte key. A fresh random salt derives a per-stream key, so one key
                may encrypt many streams.
            associated_data: Context bound to every chunk (for example an artifact id).
            chunk_size: Plaintext bytes per chunk, a power of two from 1 KiB to 16 MiB.
        """
        self._header = _new_header(chunk_size)
        self._keys = _Keys(_check_key(key), self._header, bytes(associated_data))
        self._chunk = chunk_size
        self._hold = bytearray(chunk_size)
        self._held = 0
        self._index = 0
        self._header_sent = False
        self._done = False

    def __repr__(self) -> str:
        return f"StreamEncryptor(chunk_size={self._chunk}, chunks={self._index})"

    def _seal(self, data: memoryview | bytes | bytearray, final: bool) -> bytes:
        if self._index >= _MAX_CHUNKS:
            raise CryptoUsageError("stream too long: at most 2**32 chunks; use a larger chunk_size")
        nonce, aad = self._keys.nonce_aad(self._index, final)
        self._index += 1
        return self._keys.aead.encrypt(nonce, data, aad)

    def _start(self) -> list[bytes]:
        if self._header_sent:
            return []
        self._header_sent = True
        return [self._header]

    def update(self, data: bytes) -> bytes:
        """Add plaintext; return the ciphertext of every chunk now known not to be the last."""
        if self._done:
            raise CryptoUsageError("update() after finalize()")
        out = self._start()
        rest = memoryview(data).cast("B")
        chunk, hold = self._chunk, self._hold
        # A full chunk is sealed as non-final only once at least one more byte follows it,
        # so up to one full chunk is held back in the fixed buffer self._hold.
        if self._held:
            need = chunk - self._held
            if len(rest) <= need:
                hold[self._held : self._held + len(rest)] = rest
                self._held += len(rest)
                return b"".join(out)
            hold[self._held :] = rest[:need]
            rest = rest[need:]
            out.append(self._seal(hold, False))
            self._held = 0
        # Whole chunks are sealed straight from the caller's buffer, without a copy.
        pos = 0
        while len(rest) - pos > chunk:
            out.append(self._seal(rest[pos : pos + chunk], False))
            pos += chunk
        tail = len(rest) - pos
        hold[:tail] = rest[pos:]
        self._held = tail
        return b"".join(out)

    def finalize(self) -> bytes:
        """Seal the last chunk (possibly empty) and return the remaining ciphertext."""
        if self._done:
            raise CryptoUsageError("finalize() called twice")
        out = self._start()
        out.append(self._seal(memoryview(self._hold)[: self._held], True))
        self._held = 0
        self._done = True
        return b"".join(out)


class StreamDecryptor:
    """Incremental STREAM decryption: returns plaintext only for authenticated chunks.

    After any failure the object refuses further input with :class:`DecryptionError`.
    """

    def __init__(self, key: bytes, *, associated_data: bytes) -> None:
        """Start decrypting.

        Args:
            key: The 32-byte key used to encrypt.
            associated_data: The associated data used to encrypt.
        """
        self._key = _check_key(key)
        self._ad = bytes(associated_data)
        self._keys: _Keys | None = None
        self._chunk = 0
        self._buf = bytearray()
        self._index = 0
        self._state = "open"

    def __repr__(self) -> str:
        return f"StreamDecryptor(state={self._state!r}, chunks={self._index})"

    def _open(self, data: memoryview | bytes, final: bool) -> bytes:
        assert self._keys is not None
        if self._index >= _MAX_CHUNKS or len(data) < TAG_SIZE:
            raise DecryptionError
        nonce, aad = self._keys.nonce_aad(self._index, final)
        try:
            plaintext = self._keys.aead.decrypt(nonce, data, aad)
        except (InvalidTag, ValueError):
            raise DecryptionError from None
        self._index += 1
        return plaintext

    def _guard(self) -> None:
        if self._state == "failed":
            raise DecryptionError
        if self._state == "done":
            raise CryptoUsageError("the stream decryptor is already finalized")

    def update(self, data: bytes) -> bytes:
        """Add ciphertext; return the plaintext of every chunk authenticated so far.

        Raises:
            DecryptionError: A chunk failed to authenticate or the header is malformed.
        """
        self._guard()
        try:
            return self._update(data)
        except DecryptionError:
            self._state = "failed"
            self._buf = bytearray()
            raise

    def _update(self, data: bytes) -> bytes:
        self._buf += data
        if self._keys is None:
            if len(self._buf) < HEADER_SIZE:
                return b""
            header = bytes(self._buf[:HEADER_SIZE])
            self._chunk = _parse_header(header)
            self._keys = _Keys(self._key, header, self._ad)
            del self._buf[:HEADER_SIZE]
        enc = self._chunk + TAG_SIZE
        out: list[bytes] = []
        view = memoryview(self._buf)
        pos = 0
        try:
            while len(self._buf) - pos > enc:
                out.append(self._open(view[pos : pos + enc], False))
                pos += enc
        finally:
            view.release()
        if pos:
            del self._buf[:pos]
        return b"".join(out)

    def finalize(self) -> bytes:
        """Authenticate the last chunk and return its plaintext.

        Raises:
            DecryptionError: The stream is truncated, extended or modified.
        """
        self._guard()
        try:
            if self._keys is None:
                raise DecryptionError
            rest = bytes(self._buf)
            # An empty final chunk is only valid as the first chunk (empty plaintext).
            if len(rest) < TAG_SIZE or (len(rest) == TAG_SIZE and self._index > 0):
                raise DecryptionError
            plaintext = self._open(rest, True)
        except DecryptionError:
            self._state = "failed"
            self._buf = bytearray()
            raise
        self._buf = bytearray()
        self._state = "done"
        return plaintext


def encrypt_stream(
    key: bytes, src: BinaryIO, dst: BinaryIO, *, associated_data: bytes, chunk_size: int = CHUNK_SIZE
) -> int:
    """Encrypt everything readable from ``src`` into ``dst`` in constant memory.

    Args:
        key: A 32-byte key.
        src: Readable binary file object (read until EOF).
        dst: Writable binary file object.
        associated_data: Context bound to every chunk.
        chunk_size: Plaintext bytes per chunk, a power of two from 1 KiB to 16 MiB.

    Returns:
        The number of bytes written to ``dst`` (header and chunks).
    """
    header = _new_header(chunk_size)
    keys = _Keys(_check_key(key), header, bytes(associated_data))
    dst.write(header)
    written = len(header)
    cur, nxt = bytearray(chunk_size), bytearray(chunk_size)
    out = bytearray(chunk_size + TAG_SIZE)
    out_view = memoryview(out)
    n = _read_full(src, cur)
    index = 0
    while True:
        m = 0
        final = n < chunk_size
        if not final:
            m = _read_full(src, nxt)
            final = m == 0
        if index >= _MAX_CHUNKS:
            raise CryptoUsageError("stream too long: at most 2**32 chunks; use a larger chunk_size")
        nonce, aad = keys.nonce_aad(index, final)
        keys.aead.encrypt_into(nonce, memoryview(cur)[:n], aad, out_view[: n + TAG_SIZE])
        dst.write(out_view[: n + TAG_SIZE])
        written += n + TAG_SIZE
        if final:
            return written
        cur, nxt = nxt, cur
        n = m
        index += 1


def decrypt_stream(key: bytes, src: BinaryIO, dst: BinaryIO, *, associated_data: bytes) -> int:
    """Decrypt a stream from ``src`` into ``dst`` in constant memory.

    Each chunk is written to ``dst`` only after it authenticates; on failure the
    chunks before it are already written (see the module docstring).

    Args:
        key: The 32-byte key used to encrypt.
        src: Readable binary file object holding the stream.
        dst: Writable binary file object for the plaintext.
        associated_data: The associated data used to encrypt.

    Returns:
        The number of plaintext bytes written to ``dst``.

    Raises:
        DecryptionError: The stream is truncated, extended, reordered, modified, or the
            key or associated data is wrong (one error for all).
    """
    k = _check_key(key)
    header_buf = bytearray(HEADER_SIZE)
    if _read_full(src, header_buf) != HEADER_SIZE:
        raise DecryptionError
    header = bytes(header_buf)
    chunk_size = _parse_header(header)
    keys = _Keys(k, header, bytes(associated_data))
    enc = chunk_size + TAG_SIZE
    cur, nxt = bytearray(enc), bytearray(enc)
    out = bytearray(chunk_size)
    out_view = memoryview(out)
    n = _read_full(src, cur)
    index = 0
    written = 0
    while True:
        m = 0
        final = n < enc
        if not final:
            m = _read_full(src, nxt)
            final = m == 0
        if n < TAG_SIZE or (final and n == TAG_SIZE and index > 0) or index >= _MAX_CHUNKS:
            raise DecryptionError
        nonce, aad = keys.nonce_aad(index, final)
        try:
            keys.aead.decrypt_into(nonce, memoryview(cur)[:n], aad, out_view[: n - TAG_SIZE])
        except (InvalidTag, ValueError):
            raise DecryptionError from None
        dst.write(out_view[: n - TAG_SIZE])
        written += n - TAG_SIZE
        if final:
            return written
        cur, nxt = nxt, cur
        n = m
        index += 1
