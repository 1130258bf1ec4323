"""Key derivation: HKDF-SHA256 for keys, Argon2id for passphrases.

Both functions bind a domain-separation label. :func:`hkdf_sha256` requires the
caller's ``info`` to start with ``b"tensafe/"`` (the caller's label, listed in
docs/spec/crypto.md); :func:`derive_key_from_passphrase` passes the fixed label
``tensafe/passphrase-kdf/v1`` as Argon2id associated data.

Example:
    >>> key = hkdf_sha256(b"\\x00" * 32, salt=None, info=b"tensafe/example/v1")
    >>> len(key)
    32
"""

from __future__ import annotations

import struct
from dataclasses import dataclass
from typing import ClassVar, Final

from tensafe.crypto.errors import CryptoUsageError, KeyFormatError
from tensafe.crypto.hazmat import primitives
from tensafe.crypto.hazmat.formats import LABEL_PASSPHRASE_KDF

__all__ = ["Argon2idParams", "derive_key_from_passphrase", "hkdf_sha256"]

_INFO_PREFIX: Final = b"tensafe/"
_HKDF_MAX: Final = 255 * 32
_MIN_SALT: Final = 16


def hkdf_sha256(ikm: bytes, *, salt: bytes | None, info: bytes, length: int = 32) -> bytes:
    """Derive key material with HKDF-SHA256 (RFC 5869).

    Args:
        ikm: Input keying material (a uniformly random secret or a shared secret).
        salt: Optional salt; ``None`` means a string of zeros as RFC 5869 says.
        info: Context and application label. It MUST start with ``b"tensafe/"`` and
            name the purpose and version, for example ``b"tensafe/dek/v1"``.
        length: Output length in bytes, 1 to 8160.

    Returns:
        ``length`` bytes of output keying material.

    Raises:
        CryptoUsageError: ``info`` lacks the ``tensafe/`` label or ``length`` is out of range.
    """
    if not bytes(info).startswith(_INFO_PREFIX):
        raise CryptoUsageError("HKDF info must start with b'tensafe/' (a domain-separation label)")
    if not 1 <= length <= _HKDF_MAX:
        raise CryptoUsageError(f"HKDF length must be between 1 and {_HKDF_MAX} bytes")
    if len(ikm) == 0:
        raise CryptoUsageError("HKDF input keying material must not be empty")
    return primitives.hkdf_sha256_raw(bytes(ikm), salt=salt, info=bytes(info), length=length)


@dataclass(frozen=True, slots=True)
class Argon2idParams:
    """Argon2id cost parameters, recorded next to everything derived with them.

    The defaults are RFC 9106's second recommended option (64 MiB, 3 passes,
    4 lanes). Construction refuses parameters weaker than the OWASP minimum
    (19 MiB with 2 passes) and parameters so large that a hostile file could use
    them to exhaust memory (over 4 GiB).

    Attributes:
        memory_cost: Memory in KiB.
        iterations: Number of passes.
        lanes: Degree of parallelism.
    """

    memory_cost: int = 65536
    iterations: int = 3
    lanes: int = 4

    MIN_MEMORY_COST: ClassVar[int] = 19456
    MAX_MEMORY_COST: ClassVar[int] = 4 * 1024 * 1024
    MAX_ITERATIONS: ClassVar[int] = 64
    MAX_LANES: ClassVar[int] = 16
    #: Smallest accepted memory_cost * iterations (19 MiB x 2 passes).
    MIN_WORK: ClassVar[int] = 19456 * 2
    #: Encoded size: memory_cost u32, iterations u32, lanes u8.
    ENCODED_LEN: ClassVar[int] = 9

    def __post_init__(self) -> None:
        for name in ("memory_cost", "iterations", "lanes"):
            if type(getattr(self, name)) is not int:
                raise CryptoUsageError(f"Argon2idParams.{name} must be an int")
        if not self.MIN_MEMORY_COST <= self.memory_cost <= self.MAX_MEMORY_COST:
            raise CryptoUsageError(
                f"Argon2id memory_cost must be between {self.MIN_MEMORY_COST} and {self.MAX_MEMORY_COST} KiB"
            )
        if not 1 <= self.iterations <= self.MAX_ITERATIONS:
            raise CryptoUsageError(f"Argon2id iterations must be between 1 and {self.MAX_ITERATIONS}")
        if not 1 <= self.lanes <= self.MAX_LANES:
            raise CryptoUsageError(f"Argon2id lanes must be between 1 and {self.MAX_LANES}")
        if self.memory_cost * self.iterations < self.MIN_WORK:
            raise CryptoUsageError("Argon2id parameters are below the minimum (19 MiB with 2 passes)")

    @classmethod
    def minimum(cls) -> Argon2idParams:
        """Return the weakest accepted parameters (19 MiB, 2 passes, 1 lane).

        Meant for tests and constrained machines; prefer the defaults.
        """
        return cls(memory_cost=cls.MIN_MEMORY_COST, iterations=2, lanes=1)

    def encode(self) -> bytes:
        """Return the 9-byte encoding: u32 memory_cost, u32 iterations, u8 lanes (big-endian)."""
        return struct.pack(">IIB", self.memory_cost, self.iterations, self.lanes)

    @classmethod
    def decode(cls, data: bytes) -> Argon2idParams:
        """Parse :meth:`encode` output.

        Raises:
            KeyFormatError: The bytes are not 9 long or hold parameters out of bounds.
        """
        if len(data) != cls.ENCODED_LEN:
            raise KeyFormatError("malformed Argon2id parameters")
        memory_cost, iterations, lanes = struct.unpack(">IIB", data)
        try:
            return cls(memory_cost=memory_cost, iterations=iterations, lanes=lanes)
        except CryptoUsageError:
            raise KeyFormatError("Argon2id parameters in the input are out of the accepted bounds") from None


def derive_key_from_passphrase(
    passphrase: bytes, *, salt: bytes, params: Argon2idParams = Argon2idParams()
) -> bytes:
    """Derive a 32-byte key from a passphrase with Argon2id.

    The label ``tensafe/passphrase-kdf/v1`` is passed as Argon2id associated data, so
    the output differs from a plain Argon2id hash of the same passphrase.

    Args:
        passphrase: The passphrase, non-empty.
        salt: A random salt of at least 16 bytes, stored with whatever is derived.
        params: Cost parameters, stored with whatever is derived.

    Returns:
        A 32-byte key.

    Raises:
        CryptoUsageError: Empty passphrase or a salt shorter than 16 bytes.
    """
    if not isinstance(params, Argon2idParams):
        raise CryptoUsageError("params must be an Argon2idParams")
    if len(passphrase) == 0:
        raise CryptoUsageError("the passphrase must not be empty")
    if len(salt) < _MIN_SALT:
        raise CryptoUsageError(f"the Argon2id salt must be at least {_MIN_SALT} bytes")
    return primitives.argon2id_raw(
        bytes(passphrase),
        salt=bytes(salt),
        memory_cost=params.memory_cost,
        iterations=params.iterations,
        lanes=params.lanes,
        length=32,
        ad=LABEL_PASSPHRASE_KDF,
    )
