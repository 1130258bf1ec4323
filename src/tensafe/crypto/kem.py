"""Hybrid key encapsulation: X25519 + ML-KEM-768 with an X-Wing-style combiner.

The shared secret stays secret as long as *either* X25519 or ML-KEM-768 holds
(docs/spec/crypto.md, "Hybrid KEM")::

    ss = SHA3-256("tensafe/kem/x25519-mlkem768/v1" || ss_M || ss_X || ct_X || pk_X || ct_M || pk_M)

where ``ss_M``/``ct_M``/``pk_M`` are ML-KEM-768's shared secret, ciphertext and
encapsulation key, and ``ss_X``/``ct_X``/``pk_X`` are the X25519 shared secret, the
ephemeral public key and the recipient's public key. Every input has a fixed
length, so the concatenation is unambiguous. Unlike X-Wing, the ML-KEM ciphertext
and public key are also hashed (ML-KEM is not relied on to be ciphertext-binding).

Encapsulation layout: ``0x01 | 0x20 | ct_X (32) | ct_M (1088)`` = 1122 bytes.

ML-KEM uses implicit rejection: a modified encapsulation of the right length
decapsulates to an unrelated secret instead of failing, so tampering is detected
by the AEAD that uses the secret. A malformed encapsulation raises the opaque
:class:`~tensafe.crypto.errors.DecryptionError`.

Classical-only (X25519) KEM keys are not offered. Algorithm id 0x21 is reserved:
inputs claiming it fail with :class:`~tensafe.crypto.errors.PQCRequiredError`
while ``TS_PQC_REQUIRED=true`` and with ``KeyFormatError``/``DecryptionError`` otherwise.

Example:
    >>> sk = HybridKemPrivateKey.generate()
    >>> ss, enc = sk.public_key().encapsulate()
    >>> sk.decapsulate(enc) == ss
    True
"""

from __future__ import annotations

import hashlib
from typing import Final, NoReturn

from cryptography.hazmat.primitives.asymmetric.mlkem import MLKEM768PrivateKey, MLKEM768PublicKey
from cryptography.hazmat.primitives.asymmetric.x25519 import X25519PrivateKey, X25519PublicKey

from tensafe.crypto.errors import DecryptionError, KeyFormatError, PQCRequiredError
from tensafe.crypto.hazmat import keyfile, primitives
from tensafe.crypto.hazmat.formats import ALG_HYBRID_KEM, ALG_X25519, FORMAT_VERSION, LABEL_KEM
from tensafe.crypto.hazmat.policy import ENV_PQC_REQUIRED, pqc_required
from tensafe.crypto.kdf import Argon2idParams

__all__ = ["ENCAPSULATION_SIZE", "SHARED_SECRET_SIZE", "HybridKemPrivateKey", "HybridKemPublicKey"]

_X_PUB: Final = 32
_X_PRIV: Final = 32
_M_PUB: Final = 1184
_M_SEED: Final = 64
_M_CT: Final = 1088
#: Length of an encoded encapsulation.
ENCAPSULATION_SIZE: Final = 2 + _X_PUB + _M_CT
#: Length of the shared secret.
SHARED_SECRET_SIZE: Final = 32
_HEADER: Final = bytes([FORMAT_VERSION, ALG_HYBRID_KEM])

_FAMILY: Final = keyfile.KeyFamily(
    what="KEM key",
    private_kind="{tag} KEM PRIVATE KEY",
    public_kind="{tag} KEM PUBLIC KEY",
    algs={
        ALG_HYBRID_KEM: keyfile.AlgSpec(
            ALG_HYBRID_KEM, "x25519+ml-kem-768", "HYBRID", _X_PRIV + _M_SEED, _X_PUB + _M_PUB
        ),
        ALG_X25519: keyfile.AlgSpec(ALG_X25519, "x25519", "X25519", _X_PRIV, _X_PUB, supported=False),
    },
)


def _combine(ss_m: bytes, ss_x: bytes, ct_x: bytes, pk_x: bytes, ct_m: bytes, pk_m: bytes) -> bytes:
    return primitives.sha3_256(LABEL_KEM, ss_m, ss_x, ct_x, pk_x, ct_m, pk_m)


class HybridKemPublicKey:
    """A recipient's public key: encapsulates a fresh shared secret to it."""

    __slots__ = ("_m", "_m_raw", "_x", "_x_raw")

    def __init__(self, _x: X25519PublicKey, _m: MLKEM768PublicKey, /) -> None:
        """Use :meth:`from_public_bytes` or :meth:`HybridKemPrivateKey.public_key`."""
        self._x = _x
        self._m = _m
        self._x_raw = _x.public_bytes_raw()
        self._m_raw = _m.public_bytes_raw()

    @property
    def algorithm(self) -> str:
        """The algorithm name, ``"x25519+ml-kem-768"``."""
        return _FAMILY.algs[ALG_HYBRID_KEM].name

    @property
    def key_id(self) -> str:
        """Stable fingerprint: hex of the first 16 bytes of SHA-256 over the binary encoding."""
        encoding = keyfile.public_binary(ALG_HYBRID_KEM, self._x_raw + self._m_raw)
        return hashlib.sha256(encoding).digest()[:16].hex()

    def __repr__(self) -> str:
        return f"HybridKemPublicKey(algorithm={self.algorithm!r}, key_id={self.key_id!r})"

    def __eq__(self, other: object) -> bool:
        if not isinstance(other, HybridKemPublicKey):
            return NotImplemented
        return (self._x_raw, self._m_raw) == (other._x_raw, other._m_raw)

    def __hash__(self) -> int:
        return hash((self._x_raw, self._m_raw))

    def public_bytes(self) -> bytes:
        """Return the armored public key (``TENSAFE HYBRID KEM PUBLIC KEY``)."""
        return keyfile.encode_public(_FAMILY, ALG_HYBRID_KEM, self._x_raw + self._m_raw)

    @classmethod
    def from_public_bytes(cls, data: bytes) -> HybridKemPublicKey:
        """Parse an armored public key made by :meth:`public_bytes`.

        Raises:
            KeyFormatError: Malformed input, an invalid ML-KEM key or a low-order X25519 point.
            PQCRequiredError: A classical-only key id while ``TS_PQC_REQUIRED=true``.
        """
        _alg, raw = keyfile.decode_public(_FAMILY, data)
        x = X25519PublicKey.from_public_bytes(raw[:_X_PUB])
        try:
            # A low-order point makes every exchange all-zero: refuse it now.
            X25519PrivateKey.generate().exchange(x)
        except ValueError:
            raise KeyFormatError("malformed KEM key: invalid X25519 public key") from None
        try:
            m = MLKEM768PublicKey.from_public_bytes(raw[_X_PUB:])
        except ValueError:
            raise KeyFormatError("malformed KEM key: invalid ML-KEM-768 public key") from None
        return cls(x, m)

    def encapsulate(self) -> tuple[bytes, bytes]:
        """Create a fresh shared secret for the holder of the private key.

        Returns:
            ``(shared_secret, encapsulation)``: 32 secret bytes, and the 1122-byte
            encapsulation to send to the recipient.
        """
        eph = X25519PrivateKey.generate()
        ct_x = eph.public_key().public_bytes_raw()
        ss_x = eph.exchange(self._x)
        ss_m, ct_m = self._m.encapsulate()
        ss = _combine(ss_m, ss_x, ct_x, self._x_raw, ct_m, self._m_raw)
        return ss, _HEADER + ct_x + ct_m


class HybridKemPrivateKey:
    """A recipient's private key; decapsulates shared secrets.

    ``repr`` shows the algorithm and key id only; the key cannot be pickled.
    """

    __slots__ = ("_m", "_pk", "_x")

    def __init__(self, _x: X25519PrivateKey, _m: MLKEM768PrivateKey, /) -> None:
        """Use :meth:`generate` or :meth:`from_private_bytes`."""
        self._x = _x
        self._m = _m
        self._pk = HybridKemPublicKey(_x.public_key(), _m.public_key())

    @classmethod
    def generate(cls) -> HybridKemPrivateKey:
        """Create a new random key pair."""
        return cls(X25519PrivateKey.generate(), MLKEM768PrivateKey.generate())

    @property
    def algorithm(self) -> str:
        """The algorithm name, ``"x25519+ml-kem-768"``."""
        return self._pk.algorithm

    @property
    def key_id(self) -> str:
        """The key id of the public key."""
        return self._pk.key_id

    def __repr__(self) -> str:
        return f"HybridKemPrivateKey(algorithm={self.algorithm!r}, key_id={self.key_id!r})"

    def __reduce__(self) -> NoReturn:
        raise TypeError("KEM private keys cannot be pickled; use private_bytes(passphrase=...)")

    def public_key(self) -> HybridKemPublicKey:
        """Return the matching public key."""
        return self._pk

    def decapsulate(self, encapsulation: bytes) -> bytes:
        """Recover the shared secret from an encapsulation.

        Args:
            encapsulation: Bytes from :meth:`HybridKemPublicKey.encapsulate` (untrusted).

        Returns:
            The 32-byte shared secret. A modified encapsulation of the right length
            yields an unrelated secret (implicit rejection), never an error.

        Raises:
            DecryptionError: The encapsulation is malformed.
            PQCRequiredError: It claims the classical-only algorithm while
                ``TS_PQC_REQUIRED=true``.
        """
        if not isinstance(encapsulation, bytes | bytearray | memoryview):
            raise DecryptionError
        enc = bytes(encapsulation)
        if len(enc) >= 2 and enc[0] == FORMAT_VERSION and enc[1] == ALG_X25519 and pqc_required():
            raise PQCRequiredError(
                f"a classical-only (x25519) encapsulation was presented and {ENV_PQC_REQUIRED}=true"
            )
        if len(enc) != ENCAPSULATION_SIZE or enc[:2] != _HEADER:
            raise DecryptionError
        ct_x, ct_m = enc[2 : 2 + _X_PUB], enc[2 + _X_PUB :]
        try:
            ss_x = self._x.exchange(X25519PublicKey.from_public_bytes(ct_x))
            ss_m = self._m.decapsulate(ct_m)
        except ValueError:
            raise DecryptionError from None
        return _combine(ss_m, ss_x, ct_x, self._pk._x_raw, ct_m, self._pk._m_raw)

    def private_bytes(self, *, passphrase: bytes | None, kdf_params: Argon2idParams | None = None) -> bytes:
        """Return the armored private key, sealed under ``passphrase`` when given.

        Args:
            passphrase: When given, the key is sealed with Argon2id + AES-256-GCM
                (``TENSAFE ENCRYPTED HYBRID KEM PRIVATE KEY``); ``None`` writes it in the clear.
            kdf_params: Argon2id parameters for sealing (default: 64 MiB, 3 passes, 4 lanes).
        """
        raw = self._x.private_bytes_raw() + self._m.private_bytes_raw()
        return keyfile.encode_private(_FAMILY, ALG_HYBRID_KEM, raw, passphrase=passphrase, params=kdf_params)

    @classmethod
    def from_private_bytes(cls, data: bytes, *, passphrase: bytes | None) -> HybridKemPrivateKey:
        """Load a key written by :meth:`private_bytes`.

        Raises:
            KeyFormatError: Malformed input or the wrong ``passphrase`` mode.
            DecryptionError: Wrong passphrase or a modified sealed key.
            PQCRequiredError: A classical-only key id while ``TS_PQC_REQUIRED=true``.
        """
        _alg, raw = keyfile.decode_private(_FAMILY, data, passphrase=passphrase)
        x = X25519PrivateKey.from_private_bytes(raw[:_X_PRIV])
        try:
            m = MLKEM768PrivateKey.from_seed_bytes(raw[_X_PRIV:])
        except ValueError:
            raise KeyFormatError("malformed KEM key: invalid ML-KEM-768 seed") from None
        return cls(x, m)
