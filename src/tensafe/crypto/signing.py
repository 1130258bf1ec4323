"""Hybrid signatures: Ed25519 and ML-DSA-65 over the same domain-separated message.

A signature verifies only if *both* component signatures verify (an AND
combiner): forging one requires breaking both Ed25519 and ML-DSA-65. Both sign
the same message (docs/spec/crypto.md, "Hybrid signature")::

    M' = "tensafe/sig/v1" || alg (1) || len(context) (1) || context || message

ML-DSA-65 additionally receives ``"tensafe/sig/v1"`` as its FIPS 204 context string.
The algorithm byte in ``M'`` keeps an Ed25519 component of a hybrid signature from
being reused as a classical-only signature.

Signature layout: ``0x01 | 0x10 | Ed25519 signature (64) | ML-DSA-65 signature (3309)``.

Classical-only (Ed25519) keys exist only as an explicit legacy mode,
``HybridSigningKey.generate(classical_only=True)``; they carry algorithm id 0x11 in
every encoding, emit :class:`~tensafe.crypto.errors.ClassicalOnlyWarning`,
and fail with :class:`~tensafe.crypto.errors.PQCRequiredError` while
``TS_PQC_REQUIRED=true``. A hybrid key never accepts a classical-only signature.

Example:
    >>> sk = HybridSigningKey.generate()
    >>> sig = sk.sign(b"manifest", context="tensafe/example/v1")
    >>> sk.verifying_key().verify(sig, b"manifest", context="tensafe/example/v1")
"""

from __future__ import annotations

import hashlib
from typing import Final, NoReturn

from cryptography.exceptions import InvalidSignature as _PycaInvalidSignature
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey, Ed25519PublicKey
from cryptography.hazmat.primitives.asymmetric.mldsa import MLDSA65PrivateKey, MLDSA65PublicKey

from tensafe.crypto.errors import CryptoUsageError, InvalidSignature, KeyFormatError, PQCRequiredError
from tensafe.crypto.hazmat import keyfile
from tensafe.crypto.hazmat.formats import ALG_ED25519, ALG_HYBRID_SIG, FORMAT_VERSION, LABEL_SIG
from tensafe.crypto.hazmat.labels import context_bytes
from tensafe.crypto.hazmat.policy import ENV_PQC_REQUIRED, enforce_pqc_policy, pqc_required
from tensafe.crypto.kdf import Argon2idParams

__all__ = [
    "ED25519_SIGNATURE_SIZE",
    "HYBRID_SIGNATURE_SIZE",
    "MLDSA65_SIGNATURE_SIZE",
    "HybridSigningKey",
    "HybridVerifyingKey",
]

ED25519_SIGNATURE_SIZE: Final = 64
MLDSA65_SIGNATURE_SIZE: Final = 3309
#: Length of an encoded hybrid signature.
HYBRID_SIGNATURE_SIZE: Final = 2 + ED25519_SIGNATURE_SIZE + MLDSA65_SIGNATURE_SIZE
_CLASSICAL_SIGNATURE_SIZE: Final = 2 + ED25519_SIGNATURE_SIZE
_ED_PUB: Final = 32
_ML_PUB: Final = 1952
_SEED: Final = 32

_FAMILY: Final = keyfile.KeyFamily(
    what="signing key",
    private_kind="{tag} SIGNING KEY",
    public_kind="{tag} VERIFYING KEY",
    algs={
        ALG_HYBRID_SIG: keyfile.AlgSpec(
            ALG_HYBRID_SIG, "ed25519+ml-dsa-65", "HYBRID", _SEED + _SEED, _ED_PUB + _ML_PUB
        ),
        ALG_ED25519: keyfile.AlgSpec(ALG_ED25519, "ed25519", "ED25519", _SEED, _ED_PUB),
    },
)


def _message(alg: int, context: str, message: bytes) -> bytes:
    ctx = context_bytes(context)
    if not isinstance(message, bytes | bytearray | memoryview):
        raise CryptoUsageError("the message must be bytes")
    return b"".join((LABEL_SIG, bytes([alg, len(ctx)]), ctx, bytes(message)))


def _alg_name(alg: int) -> str:
    return _FAMILY.algs[alg].name


class HybridVerifyingKey:
    """A public key that verifies hybrid (or, in legacy mode, Ed25519-only) signatures."""

    __slots__ = ("_alg", "_ed", "_encoding", "_ml")

    def __init__(self, _ed: Ed25519PublicKey, _ml: MLDSA65PublicKey | None, /) -> None:
        """Use :meth:`from_public_bytes` or :meth:`HybridSigningKey.verifying_key`."""
        self._ed = _ed
        self._ml = _ml
        self._alg = ALG_HYBRID_SIG if _ml is not None else ALG_ED25519
        raw = _ed.public_bytes_raw() + (_ml.public_bytes_raw() if _ml is not None else b"")
        self._encoding = keyfile.public_binary(self._alg, raw)

    @property
    def algorithm(self) -> str:
        """The algorithm name, ``"ed25519+ml-dsa-65"`` or ``"ed25519"`` (legacy)."""
        return _alg_name(self._alg)

    @property
    def is_hybrid(self) -> bool:
        """Whether the key has a post-quantum component."""
        return self._ml is not None

    @property
    def key_id(self) -> str:
        """Stable fingerprint: hex of the first 16 bytes of SHA-256 over the binary encoding."""
        return hashlib.sha256(self._encoding).digest()[:16].hex()

    def __repr__(self) -> str:
        return f"HybridVerifyingKey(algorithm={self.algorithm!r}, key_id={self.key_id!r})"

    def __eq__(self, other: object) -> bool:
        if not isinstance(other, HybridVerifyingKey):
            return NotImplemented
        return self._encoding == other._encoding

    def __hash__(self) -> int:
        return hash(self._encoding)

    def public_bytes(self) -> bytes:
        """Return the armored public key (``TENSAFE HYBRID VERIFYING KEY``)."""
        return keyfile.encode_public(_FAMILY, self._alg, self._encoding[2:])

    @classmethod
    def from_public_bytes(cls, data: bytes) -> HybridVerifyingKey:
        """Parse an armored public key made by :meth:`public_bytes`.

        Raises:
            KeyFormatError: Malformed, wrong kind or unsupported.
            PQCRequiredError: A classical-only key while ``TS_PQC_REQUIRED=true``.
        """
        alg, raw = keyfile.decode_public(_FAMILY, data)
        try:
            ed = Ed25519PublicKey.from_public_bytes(raw[:_ED_PUB])
        except ValueError:
            raise KeyFormatError("malformed signing key: invalid Ed25519 public key") from None
        if alg == ALG_ED25519:
            return cls(ed, None)
        try:
            ml = MLDSA65PublicKey.from_public_bytes(raw[_ED_PUB:])
        except ValueError:
            raise KeyFormatError("malformed signing key: invalid ML-DSA-65 public key") from None
        return cls(ed, ml)

    def verify(self, signature: bytes, message: bytes, *, context: str) -> None:
        """Verify a signature made by :meth:`HybridSigningKey.sign`.

        Args:
            signature: The encoded signature (untrusted).
            message: The signed message.
            context: The context string given to ``sign``.

        Raises:
            InvalidSignature: Either component fails, the encoding is malformed, or the
                signature's algorithm does not match the key's.
            PQCRequiredError: The key or the signature is classical-only and
                ``TS_PQC_REQUIRED=true``.
        """
        if self._ml is None:
            enforce_pqc_policy("this ed25519 verifying key")
        if not isinstance(signature, bytes | bytearray | memoryview):
            self._reject()
        sig = bytes(signature)
        if len(sig) < 2 or sig[0] != FORMAT_VERSION:
            self._reject()
        if sig[1] == ALG_ED25519 and self._ml is not None:
            # A classical-only signature presented to a hybrid key: a downgrade attempt,
            # refused in any case; under TS_PQC_REQUIRED the policy is named as the reason.
            if pqc_required():
                raise PQCRequiredError(
                    f"a classical-only (ed25519) signature was presented and {ENV_PQC_REQUIRED}=true"
                )
            self._reject()
        if sig[1] != self._alg:
            self._reject()
        expected = HYBRID_SIGNATURE_SIZE if self._ml is not None else _CLASSICAL_SIGNATURE_SIZE
        if len(sig) != expected:
            self._reject()
        m = _message(self._alg, context, message)
        ed_sig = sig[2 : 2 + ED25519_SIGNATURE_SIZE]
        ok = True
        try:
            self._ed.verify(ed_sig, m)
        except _PycaInvalidSignature:
            ok = False
        if self._ml is not None:
            try:
                self._ml.verify(sig[2 + ED25519_SIGNATURE_SIZE :], m, LABEL_SIG)
            except _PycaInvalidSignature:
                ok = False
        if not ok:
            self._reject()

    @staticmethod
    def _reject() -> NoReturn:
        raise InvalidSignature


class HybridSigningKey:
    """A private key producing hybrid Ed25519 + ML-DSA-65 signatures.

    ``repr`` and ``str`` show the algorithm and key id only; the key cannot be pickled.
    """

    __slots__ = ("_ed", "_ml", "_vk")

    def __init__(self, _ed: Ed25519PrivateKey, _ml: MLDSA65PrivateKey | None, /) -> None:
        """Use :meth:`generate` or :meth:`from_private_bytes`."""
        self._ed = _ed
        self._ml = _ml
        self._vk = HybridVerifyingKey(_ed.public_key(), _ml.public_key() if _ml is not None else None)

    @classmethod
    def generate(cls, *, classical_only: bool = False) -> HybridSigningKey:
        """Create a new random key.

        Args:
            classical_only: Legacy mode: an Ed25519-only key without post-quantum
                protection. Refused while ``TS_PQC_REQUIRED=true``; warns otherwise.

        Raises:
            PQCRequiredError: ``classical_only`` while ``TS_PQC_REQUIRED=true``.
        """
        if classical_only:
            enforce_pqc_policy("a new ed25519 signing key")
            return cls(Ed25519PrivateKey.generate(), None)
        return cls(Ed25519PrivateKey.generate(), MLDSA65PrivateKey.generate())

    @property
    def algorithm(self) -> str:
        """The algorithm name, ``"ed25519+ml-dsa-65"`` or ``"ed25519"`` (legacy)."""
        return self._vk.algorithm

    @property
    def is_hybrid(self) -> bool:
        """Whether the key has a post-quantum component."""
        return self._ml is not None

    @property
    def key_id(self) -> str:
        """The key id of the verifying key."""
        return self._vk.key_id

    def __repr__(self) -> str:
        return f"HybridSigningKey(algorithm={self.algorithm!r}, key_id={self.key_id!r})"

    def __reduce__(self) -> NoReturn:
        raise TypeError("signing keys cannot be pickled; use private_bytes(passphrase=...)")

    def verifying_key(self) -> HybridVerifyingKey:
        """Return the matching public key."""
        return self._vk

    def sign(self, message: bytes, *, context: str) -> bytes:
        """Sign ``message`` under ``context``.

        Args:
            message: The bytes to sign (for example a manifest digest or a record).
            context: What the signature is for, 1 to 255 bytes of UTF-8, such as
                ``"tensafe/package-manifest/v1"``. Verification needs the same context.

        Returns:
            The encoded signature (3375 bytes for a hybrid key).

        Raises:
            PQCRequiredError: A classical-only key while ``TS_PQC_REQUIRED=true``.
        """
        alg = self._vk._alg
        if self._ml is None:
            enforce_pqc_policy("this ed25519 signing key")
        m = _message(alg, context, message)
        parts = [bytes([FORMAT_VERSION, alg]), self._ed.sign(m)]
        if self._ml is not None:
            parts.append(self._ml.sign(m, LABEL_SIG))
        return b"".join(parts)

    def private_bytes(self, *, passphrase: bytes | None, kdf_params: Argon2idParams | None = None) -> bytes:
        """Return the armored private key.

        Args:
            passphrase: When given, the key is sealed with Argon2id + AES-256-GCM
                (``TENSAFE ENCRYPTED HYBRID SIGNING KEY``). ``None`` writes it in the
                clear; protect such files by other means.
            kdf_params: Argon2id parameters for sealing (default: 64 MiB, 3 passes, 4 lanes).

        Returns:
            ASCII armored text.
        """
        raw = self._ed.private_bytes_raw() + (self._ml.private_bytes_raw() if self._ml is not None else b"")
        return keyfile.encode_private(_FAMILY, self._vk._alg, raw, passphrase=passphrase, params=kdf_params)

    @classmethod
    def from_private_bytes(cls, data: bytes, *, passphrase: bytes | None) -> HybridSigningKey:
        """Load a key written by :meth:`private_bytes`.

        Args:
            data: The armored text.
            passphrase: The passphrase for a sealed key, ``None`` for a plain one.

        Raises:
            KeyFormatError: Malformed input or the wrong ``passphrase`` mode.
            DecryptionError: Wrong passphrase or a modified sealed key.
            PQCRequiredError: A classical-only key while ``TS_PQC_REQUIRED=true``.
        """
        alg, raw = keyfile.decode_private(_FAMILY, data, passphrase=passphrase)
        ed = Ed25519PrivateKey.from_private_bytes(raw[:_SEED])
        if alg == ALG_ED25519:
            return cls(ed, None)
        return cls(ed, MLDSA65PrivateKey.from_seed_bytes(raw[_SEED:]))
