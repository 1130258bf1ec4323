"""AES-256 key wrap with padding (RFC 5649), versioned.

Wrapped-key layout (docs/spec/crypto.md, "Wrapped key")::

    version (1) = 0x01 | alg (1) = 0x02 | RFC 5649 output (len(key) rounded up to 8, plus 8)

RFC 5649 takes no associated data, so a wrapped key is not bound to a label: a KEK
MUST be used only for wrapping keys. The RFC 5649 integrity check (the alternative
initial value and the padding) is verified by ``cryptography``; every failure
raises the one opaque :class:`~tensafe.crypto.errors.DecryptionError`.

Example:
    >>> import os
    >>> kek, dek = os.urandom(32), os.urandom(32)
    >>> unwrap_key(kek, wrap_key(kek, dek)) == dek
    True
"""

from __future__ import annotations

from typing import Final

from tensafe.crypto.errors import CryptoUsageError, DecryptionError
from tensafe.crypto.hazmat import primitives
from tensafe.crypto.hazmat.formats import ALG_AES256_KWP, FORMAT_VERSION

__all__ = ["KEK_SIZE", "MAX_WRAPPED_KEY", "MIN_WRAPPED_KEY", "unwrap_key", "wrap_key"]

#: KEK length in bytes (AES-256).
KEK_SIZE: Final = 32
#: Smallest key accepted for wrapping (128 bits).
MIN_WRAPPED_KEY: Final = 16
#: Largest key accepted for wrapping.
MAX_WRAPPED_KEY: Final = 4096
_HEADER: Final = bytes([FORMAT_VERSION, ALG_AES256_KWP])


def _check_kek(kek: bytes) -> bytes:
    if not isinstance(kek, bytes | bytearray | memoryview) or len(kek) != KEK_SIZE:
        raise CryptoUsageError("the KEK must be 32 bytes (AES-256)")
    return bytes(kek)


def wrap_key(kek: bytes, key_to_wrap: bytes) -> bytes:
    """Wrap a key under a KEK with AES-256-KWP.

    Args:
        kek: The 32-byte key-encryption key.
        key_to_wrap: The key to protect, 16 to 4096 bytes.

    Returns:
        The versioned wrapped key.

    Raises:
        CryptoUsageError: Bad KEK length or a key outside 16 to 4096 bytes.
    """
    k = _check_kek(kek)
    if not MIN_WRAPPED_KEY <= len(key_to_wrap) <= MAX_WRAPPED_KEY:
        raise CryptoUsageError(f"the key to wrap must be {MIN_WRAPPED_KEY} to {MAX_WRAPPED_KEY} bytes")
    return _HEADER + primitives.kwp_wrap_raw(k, bytes(key_to_wrap))


def unwrap_key(kek: bytes, wrapped: bytes) -> bytes:
    """Unwrap a key made by :func:`wrap_key`.

    Args:
        kek: The 32-byte KEK used to wrap.
        wrapped: The versioned wrapped key (untrusted).

    Returns:
        The unwrapped key.

    Raises:
        DecryptionError: Wrong KEK, modified, truncated or malformed input (one error for all).
        CryptoUsageError: Bad KEK length (a programming error).
    """
    k = _check_kek(kek)
    if not isinstance(wrapped, bytes | bytearray | memoryview):
        raise DecryptionError
    w = bytes(wrapped)
    body = w[2:]
    if w[:2] != _HEADER or len(body) % 8 != 0 or not MIN_WRAPPED_KEY + 8 <= len(body) <= MAX_WRAPPED_KEY + 8:
        raise DecryptionError
    try:
        key = primitives.kwp_unwrap_raw(k, body)
    except (primitives.InvalidUnwrap, ValueError):
        raise DecryptionError from None
    if not MIN_WRAPPED_KEY <= len(key) <= MAX_WRAPPED_KEY:
        raise DecryptionError
    return key
