"""Keyed digests (HMAC-SHA256) with a domain-separation label.

A keyed digest commits to data without revealing it to anyone who lacks the key: unlike a
plain SHA-256, a low-entropy value (a diagnosis code, a yes/no field, a short record) cannot
be recovered by hashing candidate values. TenSafe uses it wherever it must recognise data
again later (request de-duplication, the same data set registered twice, dataset
commitments in training evidence) while the digest itself may be seen by someone who must
not learn the data (the audit log's readers, a package's recipients).

``keyed_digest(key, label=b"tensafe/...", data=...)`` is
``HMAC-SHA256(key, label || 0x00 || data)``; the label MUST start with ``b"tensafe/"`` and
name the purpose and version. The key must be at least 32 bytes of secret, uniformly random
material (derive per-purpose keys with :func:`tensafe.crypto.kdf.hkdf_sha256`).
:func:`verify_keyed_digest` compares in constant time and raises on a mismatch.
"""

from __future__ import annotations

import hmac as _hmac
from collections.abc import Iterable

from cryptography.hazmat.primitives import hashes
from cryptography.hazmat.primitives import hmac as _crypto_hmac

from tensafe.crypto.errors import CryptoUsageError, InvalidSignature

__all__ = ["DIGEST_BYTES", "KeyedDigest", "keyed_digest", "verify_keyed_digest"]

#: Length of a keyed digest in bytes.
DIGEST_BYTES = 32
_MIN_KEY = 32
_PREFIX = b"tensafe/"


def _check(key: bytes, label: bytes) -> None:
    if len(key) < _MIN_KEY:
        raise CryptoUsageError(f"a keyed digest needs a key of at least {_MIN_KEY} bytes")
    if not bytes(label).startswith(_PREFIX) or b"\x00" in bytes(label):
        raise CryptoUsageError("a keyed-digest label must start with b'tensafe/' and contain no NUL byte")


class KeyedDigest:
    """An incremental keyed digest, for data that arrives in pieces.

    Example::

        d = KeyedDigest(key, label=b"tensafe/dataset-commitment/v2")
        for record in records:
            d.update(record)
        commitment = d.hexdigest()
    """

    def __init__(self, key: bytes, *, label: bytes) -> None:
        """Start a digest under ``key`` for the purpose named by ``label``."""
        _check(key, label)
        self._mac = _crypto_hmac.HMAC(bytes(key), hashes.SHA256())
        self._mac.update(bytes(label) + b"\x00")

    def update(self, data: bytes | bytearray | memoryview) -> None:
        """Add ``data``."""
        self._mac.update(bytes(data))

    def digest(self) -> bytes:
        """Return the 32-byte digest (the object cannot be updated afterwards)."""
        return self._mac.finalize()

    def hexdigest(self) -> str:
        """Return the digest as 64 lower-case hex digits."""
        return self.digest().hex()


def keyed_digest(key: bytes, *, label: bytes, data: bytes | Iterable[bytes]) -> bytes:
    """Return ``HMAC-SHA256(key, label || 0x00 || data)`` (``data`` may be several pieces).

    Raises:
        CryptoUsageError: The key is shorter than 32 bytes or the label is not a ``tensafe/`` label.
    """
    d = KeyedDigest(key, label=label)
    for piece in [data] if isinstance(data, bytes | bytearray | memoryview) else data:
        d.update(piece)
    return d.digest()


def verify_keyed_digest(key: bytes, *, label: bytes, data: bytes, expected: bytes) -> None:
    """Raise unless ``expected`` is the keyed digest of ``data`` (constant-time comparison).

    Raises:
        InvalidSignature: The digest does not match.
    """
    if not _hmac.compare_digest(keyed_digest(key, label=label, data=data), bytes(expected)):
        raise InvalidSignature("the keyed digest does not match")
