"""The exception tree of :mod:`tensafe.crypto`.

Every error that TenSafe's cryptography raises on purpose derives from
:class:`CryptoError`, which derives from :class:`tensafe.errors.TenSafeError`.

Messages never contain key material, plaintext, passphrases or any detail that
tells an attacker *why* a decryption failed: every AEAD, key-unwrap, stream or
decapsulation failure is the same :class:`DecryptionError` with the same message.
"""

from __future__ import annotations

from tensafe.errors import ConfigurationError, TenSafeError

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


class CryptoError(TenSafeError):
    """Root of the crypto error tree."""


class DecryptionError(CryptoError):
    """Opaque failure of a decryption, unwrap or decapsulation.

    Wrong key, wrong associated data, a modified, truncated or extended
    ciphertext and a malformed envelope all raise this error with the same
    message, so that callers (and attackers) learn nothing about the cause.
    """

    _MESSAGE = "decryption failed: wrong key or associated data, or the data was modified or truncated"

    def __init__(self) -> None:
        super().__init__(self._MESSAGE)

    def __reduce__(self) -> tuple[type[DecryptionError], tuple[()]]:
        return (type(self), ())


class InvalidSignature(CryptoError):
    """A signature did not verify (any component, any reason)."""

    _MESSAGE = "signature verification failed"

    def __init__(self, message: str | None = None) -> None:
        super().__init__(message or self._MESSAGE)


class PQCRequiredError(CryptoError):
    """A classical-only key or signature was presented while ``TS_PQC_REQUIRED=true``."""


class KeyFormatError(CryptoError, ValueError):
    """A serialized key is malformed, unsupported or of the wrong kind."""


class CryptoUsageError(CryptoError, ValueError):
    """The caller used the API wrongly (wrong key length, bad label, bad parameters).

    This reports a programming error, never a property of untrusted input.
    """


class CryptoConfigurationError(CryptoError, ConfigurationError):
    """A crypto setting in the environment (such as ``TS_PQC_REQUIRED``) is invalid."""


class ClassicalOnlyWarning(UserWarning):
    """A classical-only (not post-quantum) key or signature is being created or accepted.

    Emitted in the legacy Ed25519-only mode while ``TS_PQC_REQUIRED`` is not true.
    """
