"""TenSafe cryptography: safe recipes over ``cryptography`` (pyca).

Public modules (each with its own ``__all__``):

* :mod:`tensafe.crypto.aead`: versioned AES-256-GCM envelopes with a label.
* :mod:`tensafe.crypto.keywrap`: AES-256 key wrap with padding (RFC 5649).
* :mod:`tensafe.crypto.kdf`: HKDF-SHA256 and Argon2id with recorded parameters.
* :mod:`tensafe.crypto.stream`: chunked STREAM AES-256-GCM for large data, constant memory.
* :mod:`tensafe.crypto.signing`: hybrid Ed25519 + ML-DSA-65 signatures.
* :mod:`tensafe.crypto.kem`: hybrid X25519 + ML-KEM-768 key encapsulation.

Everything that can be misused lives in :mod:`tensafe.crypto.hazmat`, which only this
package imports. Every output carries a format version and an algorithm identifier,
and every format is specified byte by byte in docs/spec/crypto.md. Verification raises
:class:`InvalidSignature`; every decryption failure raises the one opaque
:class:`DecryptionError`.

The environment variable ``TS_PQC_REQUIRED=true`` makes every classical-only key or
signature fail with :class:`PQCRequiredError`.
"""

from __future__ import annotations

from tensafe.crypto.errors import (
    ClassicalOnlyWarning,
    CryptoConfigurationError,
    CryptoError,
    CryptoUsageError,
    DecryptionError,
    InvalidSignature,
    KeyFormatError,
    PQCRequiredError,
)

__all__ = [
    "ClassicalOnlyWarning",
    "CryptoConfigurationError",
    "CryptoError",
    "CryptoUsageError",
    "DecryptionError",
    "InvalidSignature",
    "KeyFormatError",
    "PQCRequiredError",
]
