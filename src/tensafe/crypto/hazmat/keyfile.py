"""Armored, versioned key files, optionally sealed under a passphrase.

A key's *binary encoding* is ``version (1) | alg (1) | key bytes (fixed length per
alg)``. The armored file wraps either that encoding (plain) or a *sealed* encoding::

    sealed = 0x01 | 0x30 | inner alg (1) | Argon2id params (9) | salt (16) | nonce (12)
             | AES-256-GCM(k, nonce, binary encoding, aad) (len + 16)
    k      = Argon2id(passphrase, salt, params, ad="tensafe/passphrase-kdf/v1"), 32 bytes
    aad    = "tensafe/key-seal/v1" || sealed[0:29] || armor type line (ASCII)

Binding the armor type line means a sealed signing key cannot be relabelled as a
KEM key (or the reverse) without failing to open. See docs/spec/crypto.md.
"""

from __future__ import annotations

import os
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Final

from cryptography.exceptions import InvalidTag
from cryptography.hazmat.primitives.ciphers.aead import AESGCM

from tensafe.crypto.errors import CryptoUsageError, DecryptionError, KeyFormatError
from tensafe.crypto.hazmat import armor as _armor
from tensafe.crypto.hazmat.formats import (
    ALG_SEALED_ARGON2ID_AES256GCM,
    CLASSICAL_ONLY_ALGS,
    FORMAT_VERSION,
    LABEL_KEY_SEAL,
)
from tensafe.crypto.hazmat.policy import enforce_pqc_policy, pqc_required
from tensafe.crypto.kdf import Argon2idParams, derive_key_from_passphrase

__all__ = [
    "AlgSpec",
    "KeyFamily",
    "decode_private",
    "decode_public",
    "encode_private",
    "encode_public",
    "public_binary",
]

_SALT: Final = 16
_NONCE: Final = 12
_TAG: Final = 16
_SEALED_HEADER: Final = 3 + Argon2idParams.ENCODED_LEN + _SALT
_MAX_PASSPHRASE: Final = 4096


@dataclass(frozen=True)
class AlgSpec:
    """One algorithm of a key family.

    Attributes:
        alg: The algorithm identifier byte.
        name: The ``Algorithm`` armor header value.
        tag: The word in the armor type line (``HYBRID``, ``ED25519``...).
        private_len: Length of the private key bytes after the 2-byte prefix.
        public_len: Length of the public key bytes after the 2-byte prefix.
        supported: False for identifiers that are reserved and always refused.
    """

    alg: int
    name: str
    tag: str
    private_len: int
    public_len: int
    supported: bool = True


@dataclass(frozen=True)
class KeyFamily:
    """A family of keys (signing or KEM) and its armor type lines.

    Attributes:
        what: Human name used in messages, for example ``"signing key"``.
        private_kind: Format of the private type line, with ``{tag}`` placeholder.
        public_kind: Format of the public type line, with ``{tag}`` placeholder.
        algs: The algorithms of the family by identifier.
    """

    what: str
    private_kind: str
    public_kind: str
    algs: Mapping[int, AlgSpec]

    def kind(self, spec: AlgSpec, *, private: bool, sealed: bool = False) -> str:
        """Return the armor type line for ``spec``."""
        base = (self.private_kind if private else self.public_kind).format(tag=spec.tag)
        return f"TENSAFE ENCRYPTED {base}" if sealed else f"TENSAFE {base}"

    def kinds(self, *, private: bool) -> dict[str, tuple[AlgSpec, bool]]:
        """Map every acceptable type line to its algorithm and whether it is sealed."""
        out: dict[str, tuple[AlgSpec, bool]] = {}
        for spec in self.algs.values():
            out[self.kind(spec, private=private)] = (spec, False)
            if private:
                out[self.kind(spec, private=True, sealed=True)] = (spec, True)
        return out


def _check_policy(family: KeyFamily, spec: AlgSpec) -> None:
    if spec.alg in CLASSICAL_ONLY_ALGS:
        if not spec.supported and not pqc_required():
            raise KeyFormatError(f"unsupported {family.what} algorithm {spec.name!r}")
        enforce_pqc_policy(f"this {spec.name} {family.what}")
    elif not spec.supported:
        raise KeyFormatError(f"unsupported {family.what} algorithm {spec.name!r}")


def _check_binary(family: KeyFamily, spec: AlgSpec, binary: bytes, *, private: bool) -> bytes:
    want = spec.private_len if private else spec.public_len
    if len(binary) != 2 + want or binary[0] != FORMAT_VERSION or binary[1] != spec.alg:
        raise KeyFormatError(f"malformed {family.what}: wrong version, algorithm or length")
    return binary[2:]


def _parse(family: KeyFamily, data: bytes, *, private: bool) -> tuple[AlgSpec, bool, _armor.ArmorBlock, str]:
    kinds = family.kinds(private=private)
    block = _armor.dearmor(data, kinds=frozenset(kinds))
    spec, sealed = kinds[block.kind]
    if block.version != FORMAT_VERSION:
        raise KeyFormatError(
            f"unsupported {family.what} format version {block.version}; this TenSafe reads version "
            f"{FORMAT_VERSION} (upgrade TenSafe to read newer keys)"
        )
    if block.algorithm != spec.name:
        raise KeyFormatError(f"malformed {family.what}: the Algorithm header does not match the key type")
    _check_policy(family, spec)
    return spec, sealed, block, block.kind


def encode_public(family: KeyFamily, alg: int, key: bytes) -> bytes:
    """Return the armored public key for raw public key bytes."""
    spec = family.algs[alg]
    binary = bytes([FORMAT_VERSION, alg]) + key
    return _armor.armor(
        family.kind(spec, private=False), version=FORMAT_VERSION, algorithm=spec.name, payload=binary
    )


def public_binary(alg: int, key: bytes) -> bytes:
    """Return the canonical binary public encoding (the input of key ids)."""
    return bytes([FORMAT_VERSION, alg]) + key


def decode_public(family: KeyFamily, data: bytes) -> tuple[int, bytes]:
    """Parse an armored public key; return its algorithm id and raw key bytes.

    Raises:
        KeyFormatError: Malformed or unsupported input.
        PQCRequiredError: A classical-only key while ``TS_PQC_REQUIRED=true``.
    """
    spec, _, block, _kind = _parse(family, data, private=False)
    return spec.alg, _check_binary(family, spec, block.payload, private=False)


def _check_passphrase(passphrase: bytes) -> bytes:
    if not isinstance(passphrase, bytes | bytearray) or not 1 <= len(passphrase) <= _MAX_PASSPHRASE:
        raise CryptoUsageError(f"the passphrase must be 1 to {_MAX_PASSPHRASE} bytes")
    return bytes(passphrase)


def encode_private(
    family: KeyFamily,
    alg: int,
    key: bytes,
    *,
    passphrase: bytes | None,
    params: Argon2idParams | None,
) -> bytes:
    """Return the armored private key, sealed when ``passphrase`` is given."""
    spec = family.algs[alg]
    binary = bytes([FORMAT_VERSION, alg]) + key
    if passphrase is None:
        if params is not None:
            raise CryptoUsageError("kdf_params only apply when a passphrase is given")
        kind = family.kind(spec, private=True)
        return _armor.armor(kind, version=FORMAT_VERSION, algorithm=spec.name, payload=binary)
    pw = _check_passphrase(passphrase)
    params = params if params is not None else Argon2idParams()
    if not isinstance(params, Argon2idParams):
        raise CryptoUsageError("kdf_params must be an Argon2idParams")
    kind = family.kind(spec, private=True, sealed=True)
    salt = os.urandom(_SALT)
    header = bytes([FORMAT_VERSION, ALG_SEALED_ARGON2ID_AES256GCM, alg]) + params.encode() + salt
    k = derive_key_from_passphrase(pw, salt=salt, params=params)
    nonce = os.urandom(_NONCE)
    aad = LABEL_KEY_SEAL + header + kind.encode("ascii")
    sealed = header + nonce + AESGCM(k).encrypt(nonce, binary, aad)
    return _armor.armor(kind, version=FORMAT_VERSION, algorithm=spec.name, payload=sealed)


def decode_private(family: KeyFamily, data: bytes, *, passphrase: bytes | None) -> tuple[int, bytes]:
    """Parse (and open, when sealed) an armored private key.

    Returns:
        The algorithm id and the raw private key bytes.

    Raises:
        KeyFormatError: Malformed input, or a passphrase mismatch in kind (a sealed key
            without a passphrase, or a passphrase for a plain key).
        DecryptionError: Wrong passphrase or a modified sealed key.
        PQCRequiredError: A classical-only key while ``TS_PQC_REQUIRED=true``.
    """
    spec, sealed, block, kind = _parse(family, data, private=True)
    if not sealed:
        if passphrase is not None:
            raise KeyFormatError(f"this {family.what} is not passphrase-protected; call with passphrase=None")
        return spec.alg, _check_binary(family, spec, block.payload, private=True)
    if passphrase is None:
        raise KeyFormatError(f"this {family.what} is passphrase-protected; pass its passphrase")
    pw = _check_passphrase(passphrase)
    blob = block.payload
    expected = _SEALED_HEADER + _NONCE + 2 + spec.private_len + _TAG
    if (
        len(blob) != expected
        or blob[0] != FORMAT_VERSION
        or blob[1] != ALG_SEALED_ARGON2ID_AES256GCM
        or blob[2] != spec.alg
    ):
        raise KeyFormatError(f"malformed encrypted {family.what}")
    params = Argon2idParams.decode(blob[3 : 3 + Argon2idParams.ENCODED_LEN])
    header = blob[:_SEALED_HEADER]
    salt = header[3 + Argon2idParams.ENCODED_LEN :]
    nonce = blob[_SEALED_HEADER : _SEALED_HEADER + _NONCE]
    k = derive_key_from_passphrase(pw, salt=salt, params=params)
    aad = LABEL_KEY_SEAL + header + kind.encode("ascii")
    try:
        binary = AESGCM(k).decrypt(nonce, blob[_SEALED_HEADER + _NONCE :], aad)
    except InvalidTag:
        raise DecryptionError from None
    return spec.alg, _check_binary(family, spec, binary, private=True)
