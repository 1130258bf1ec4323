"""Versioned, domain-separated AES-256-GCM envelopes for small payloads.

Envelope layout (docs/spec/crypto.md, "AEAD envelope")::

    version (1) = 0x01 | alg (1) = 0x01 | nonce (12, random) | ciphertext || tag (16)

The GCM associated data is ``"tensafe/aead/v1" || version || alg || len(label) (1) ||
label || associated_data``, so an envelope opens only under the same key, the same
label and the same associated data. Every failure raises the one opaque
:class:`~tensafe.crypto.errors.DecryptionError`.

Nonces are random: use one key for at most 2**32 envelopes. Payloads above
2 GiB are refused; use :mod:`tensafe.crypto.stream` for large data.

Example:
    >>> import os
    >>> key = os.urandom(32)
    >>> env = seal(key, b"secret", label="tensafe/example/v1")
    >>> open_sealed(key, env, label="tensafe/example/v1")
    b'secret'
"""

from __future__ import annotations

import os
from typing import Final

from cryptography.exceptions import InvalidTag
from cryptography.hazmat.primitives.ciphers.aead import AESGCM

from tensafe.crypto.errors import CryptoUsageError, DecryptionError
from tensafe.crypto.hazmat.formats import ALG_AES256_GCM, FORMAT_VERSION, LABEL_AEAD
from tensafe.crypto.hazmat.labels import label_bytes

__all__ = ["KEY_SIZE", "OVERHEAD", "open_sealed", "seal"]

#: Key length in bytes (AES-256).
KEY_SIZE: Final = 32
_NONCE: Final = 12
_TAG: Final = 16
_HEADER: Final = bytes([FORMAT_VERSION, ALG_AES256_GCM])
#: Bytes an envelope adds to its plaintext.
OVERHEAD: Final = len(_HEADER) + _NONCE + _TAG
_MAX_PLAINTEXT: Final = 2**31 - 1 - _TAG


def _check_key(key: bytes) -> AESGCM:
    if not isinstance(key, bytes | bytearray | memoryview) or len(key) != KEY_SIZE:
        raise CryptoUsageError("the AEAD key must be 32 bytes (AES-256)")
    return AESGCM(bytes(key))


def _aad(label: str, associated_data: bytes) -> bytes:
    lab = label_bytes(label)
    return b"".join((LABEL_AEAD, _HEADER, bytes([len(lab)]), lab, bytes(associated_data)))


def seal(key: bytes, plaintext: bytes, *, label: str, associated_data: bytes = b"") -> bytes:
    """Encrypt and authenticate ``plaintext`` into a versioned envelope.

    Args:
        key: A 32-byte AES-256 key.
        plaintext: The data to protect (at most 2 GiB).
        label: Domain-separation label, ``"tensafe/<purpose>/v<N>"``.
        associated_data: Data authenticated but not encrypted (for example a record id).

    Returns:
        The envelope bytes.

    Raises:
        CryptoUsageError: Bad key length, bad label or an oversized plaintext.
    """
    aead = _check_key(key)
    if len(plaintext) > _MAX_PLAINTEXT:
        raise CryptoUsageError("plaintext too large for one envelope; use tensafe.crypto.stream")
    nonce = os.urandom(_NONCE)
    return _HEADER + nonce + aead.encrypt(nonce, bytes(plaintext), _aad(label, associated_data))


def open_sealed(key: bytes, envelope: bytes, *, label: str, associated_data: bytes = b"") -> bytes:
    """Authenticate and decrypt an envelope made by :func:`seal`.

    Args:
        key: The 32-byte key used to seal.
        envelope: The envelope bytes (untrusted).
        label: The label used to seal.
        associated_data: The associated data used to seal.

    Returns:
        The plaintext.

    Raises:
        DecryptionError: For any failure of the envelope (the same error for every cause).
        CryptoUsageError: Bad key length or bad label (programming errors).
    """
    aead = _check_key(key)
    aad = _aad(label, associated_data)
    if not isinstance(envelope, bytes | bytearray | memoryview):
        raise DecryptionError
    env = bytes(envelope)
    if len(env) < OVERHEAD or env[:2] != _HEADER:
        raise DecryptionError
    try:
        return aead.decrypt(env[2 : 2 + _NONCE], env[2 + _NONCE :], aad)
    except (InvalidTag, ValueError, OverflowError):
        raise DecryptionError from None
