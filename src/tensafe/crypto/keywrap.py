"""AES-256 key wrap with padding (RFC 5649), versioned, plain or bound to a context.

Wrapped-key layout (docs/spec/crypto.md, "Wrapped key")::

    version (1) = 0x01 | alg (1) = 0x02 | RFC 5649 output (len(key) rounded up to 8, plus 8)

RFC 5649 takes no associated data, so a wrapped key is not bound to a label: a KEK
MUST be used only for wrapping keys. The RFC 5649 integrity check (the alternative
initial value and the padding) is verified by ``cryptography``; every failure
raises the one opaque :class:`~tensafe.crypto.errors.DecryptionError`.

Bound wrapped-key layout (docs/spec/crypto.md, "Bound wrapped key")::

    version (1) = 0x01 | alg (1) = 0x04 | RFC 5649 output of key || SHA-256("tensafe/bound-key/v1" || context)

:func:`wrap_key_bound` binds the wrapped key to a caller-defined ``context`` (for
example a tenant id and key version): a blob copied to a place with another context
fails to unwrap. A PKCS#11 token computes the same bytes with ``CKM_AES_KEY_WRAP_PAD``
over :func:`bound_key_payload`; :func:`frame_bound_wrap`, :func:`unframe_bound_wrap`
and :func:`open_bound_key_payload` are the halves of the format around the token.

Example:
    >>> import os
    >>> kek, dek = os.urandom(32), os.urandom(32)
    >>> unwrap_key(kek, wrap_key(kek, dek)) == dek
    True
    >>> blob = wrap_key_bound(kek, dek, context=b"tenant-a/1")
    >>> unwrap_key_bound(kek, blob, context=b"tenant-a/1") == dek
    True
"""

from __future__ import annotations

import hashlib
import hmac
from typing import Final

from tensafe.crypto.errors import CryptoUsageError, DecryptionError
from tensafe.crypto.hazmat import primitives
from tensafe.crypto.hazmat.formats import (
    ALG_AES256_KWP,
    ALG_AES256_KWP_BOUND,
    FORMAT_VERSION,
    LABEL_BOUND_KEY,
)

__all__ = [
    "BOUND_WRAP_PREFIX",
    "KEK_SIZE",
    "MAX_BINDING_CONTEXT",
    "MAX_WRAPPED_KEY",
    "MIN_WRAPPED_KEY",
    "WRAP_PREFIX",
    "bound_key_payload",
    "frame_bound_wrap",
    "open_bound_key_payload",
    "unframe_bound_wrap",
    "unwrap_key",
    "unwrap_key_bound",
    "wrap_key",
    "wrap_key_bound",
]

#: KEK length in bytes (AES-256).
KEK_SIZE: Final = 32
#: Smallest key accepted for wrapping (128 bits).
MIN_WRAPPED_KEY: Final = 16
#: Largest key accepted for wrapping.
MAX_WRAPPED_KEY: Final = 4096
_HEADER: Final = bytes([FORMAT_VERSION, ALG_AES256_KWP])
_BOUND_HEADER: Final = bytes([FORMAT_VERSION, ALG_AES256_KWP_BOUND])
#: First two bytes of a plain wrapped key (:func:`wrap_key`).
WRAP_PREFIX: Final = _HEADER
#: First two bytes of a bound wrapped key (:func:`wrap_key_bound`).
BOUND_WRAP_PREFIX: Final = _BOUND_HEADER
#: Largest binding context accepted, in bytes.
MAX_BINDING_CONTEXT: Final = 4096
_DIGEST: Final = 32


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


# -- bound wrapped keys -------------------------------------------------------------------


def _binding_digest(context: bytes) -> bytes:
    if not isinstance(context, bytes | bytearray | memoryview) or not 0 < len(context) <= MAX_BINDING_CONTEXT:
        raise CryptoUsageError(f"the binding context must be 1 to {MAX_BINDING_CONTEXT} bytes")
    return hashlib.sha256(LABEL_BOUND_KEY + bytes(context)).digest()


def bound_key_payload(key_to_wrap: bytes, *, context: bytes) -> bytes:
    """Return ``key || SHA-256("tensafe/bound-key/v1" || context)``: the RFC 5649 input of a bound wrap.

    For wrapping inside a token (PKCS#11 ``CKM_AES_KEY_WRAP_PAD``); software callers use
    :func:`wrap_key_bound`.

    Raises:
        CryptoUsageError: A key outside 16 to 4096 bytes or a context outside 1 to 4096 bytes.
    """
    if not MIN_WRAPPED_KEY <= len(key_to_wrap) <= MAX_WRAPPED_KEY:
        raise CryptoUsageError(f"the key to wrap must be {MIN_WRAPPED_KEY} to {MAX_WRAPPED_KEY} bytes")
    return bytes(key_to_wrap) + _binding_digest(context)


def open_bound_key_payload(payload: bytes, *, context: bytes) -> bytes:
    """Check the binding digest of an unwrapped payload and return the key.

    Raises:
        DecryptionError: The payload was bound to another context, or is malformed.
        CryptoUsageError: A context outside 1 to 4096 bytes (a programming error).
    """
    expected = _binding_digest(context)
    data = bytes(payload)
    if not MIN_WRAPPED_KEY + _DIGEST <= len(data) <= MAX_WRAPPED_KEY + _DIGEST:
        raise DecryptionError
    if not hmac.compare_digest(data[-_DIGEST:], expected):
        raise DecryptionError
    return data[:-_DIGEST]


def frame_bound_wrap(rfc5649_output: bytes) -> bytes:
    """Prefix the RFC 5649 output of :func:`bound_key_payload` with the format header.

    Raises:
        CryptoUsageError: The output has an impossible length (not produced by RFC 5649
            over a bound payload).
    """
    body = bytes(rfc5649_output)
    if not _bound_body_length_ok(len(body)):
        raise CryptoUsageError("not the RFC 5649 output of a bound key payload")
    return _BOUND_HEADER + body


def unframe_bound_wrap(wrapped: bytes) -> bytes:
    """Check the header and length of a bound wrapped key and return its RFC 5649 part.

    Raises:
        DecryptionError: Wrong prefix or length (one error for all).
    """
    if not isinstance(wrapped, bytes | bytearray | memoryview):
        raise DecryptionError
    w = bytes(wrapped)
    if w[:2] != _BOUND_HEADER or not _bound_body_length_ok(len(w) - 2):
        raise DecryptionError
    return w[2:]


def _bound_body_length_ok(n: int) -> bool:
    return n % 8 == 0 and MIN_WRAPPED_KEY + _DIGEST + 8 <= n <= MAX_WRAPPED_KEY + _DIGEST + 8


def wrap_key_bound(kek: bytes, key_to_wrap: bytes, *, context: bytes) -> bytes:
    """Wrap a key under a KEK with AES-256-KWP, bound to ``context``.

    Args:
        kek: The 32-byte key-encryption key.
        key_to_wrap: The key to protect, 16 to 4096 bytes.
        context: What the wrapped key belongs to (1 to 4096 bytes, the caller's
            domain-separated encoding); :func:`unwrap_key_bound` needs the same bytes.

    Returns:
        The versioned bound wrapped key (``0x01 0x04 ...``).

    Raises:
        CryptoUsageError: Bad KEK length, key or context length.
    """
    k = _check_kek(kek)
    return frame_bound_wrap(primitives.kwp_wrap_raw(k, bound_key_payload(key_to_wrap, context=context)))


def unwrap_key_bound(kek: bytes, wrapped: bytes, *, context: bytes) -> bytes:
    """Unwrap a key made by :func:`wrap_key_bound` with the same ``context``.

    Returns:
        The unwrapped key.

    Raises:
        DecryptionError: Wrong KEK or context, a plain (unbound) wrapped key, modified,
            truncated or malformed input (one error for all).
        CryptoUsageError: Bad KEK or context length (a programming error).
    """
    k = _check_kek(kek)
    _binding_digest(context)  # a bad context is a usage error even when the blob is bad too
    body = unframe_bound_wrap(wrapped)
    try:
        payload = primitives.kwp_unwrap_raw(k, body)
    except (primitives.InvalidUnwrap, ValueError):
        raise DecryptionError from None
    return open_bound_key_payload(payload, context=context)
