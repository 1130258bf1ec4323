"""Thin, typed calls into ``cryptography`` with no policy of their own.

These functions exist so that published test vectors (RFC 5869, RFC 5649) can be
checked against exactly the primitive calls the safe recipes make. They do not
add labels, versions or length rules: use the top-level modules instead.
"""

from __future__ import annotations

from cryptography.hazmat.primitives import hashes
from cryptography.hazmat.primitives.kdf.argon2 import Argon2id
from cryptography.hazmat.primitives.kdf.hkdf import HKDF
from cryptography.hazmat.primitives.keywrap import (
    InvalidUnwrap,
    aes_key_unwrap_with_padding,
    aes_key_wrap_with_padding,
)

__all__ = [
    "InvalidUnwrap",
    "argon2id_raw",
    "hkdf_sha256_raw",
    "kwp_unwrap_raw",
    "kwp_wrap_raw",
    "sha3_256",
]


def hkdf_sha256_raw(ikm: bytes, *, salt: bytes | None, info: bytes, length: int) -> bytes:
    """Return HKDF-SHA256 (RFC 5869) output, extract then expand."""
    return HKDF(algorithm=hashes.SHA256(), length=length, salt=salt, info=info).derive(ikm)


def argon2id_raw(
    secret: bytes,
    *,
    salt: bytes,
    memory_cost: int,
    iterations: int,
    lanes: int,
    length: int,
    ad: bytes | None,
) -> bytes:
    """Return Argon2id (RFC 9106, version 0x13) output with optional associated data."""
    kdf = Argon2id(
        salt=salt, length=length, iterations=iterations, lanes=lanes, memory_cost=memory_cost, ad=ad
    )
    return kdf.derive(secret)


def kwp_wrap_raw(kek: bytes, key_to_wrap: bytes) -> bytes:
    """Return the RFC 5649 AES key wrap with padding of ``key_to_wrap`` under ``kek``."""
    return aes_key_wrap_with_padding(kek, key_to_wrap)


def kwp_unwrap_raw(kek: bytes, wrapped: bytes) -> bytes:
    """Undo :func:`kwp_wrap_raw`; raises ``InvalidUnwrap`` on any integrity failure."""
    return aes_key_unwrap_with_padding(kek, wrapped)


def sha3_256(*parts: bytes) -> bytes:
    """Return SHA3-256 over the concatenation of ``parts``."""
    h = hashes.Hash(hashes.SHA3_256())
    for part in parts:
        h.update(part)
    return h.finalize()
