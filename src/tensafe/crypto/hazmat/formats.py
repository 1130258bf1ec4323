"""Format constants shared by every TenSafe crypto encoding.

Each binary object starts with two bytes: the format version and an algorithm
identifier. The identifiers below are a single registry for all object kinds so
that no byte string can be read as two different things. See docs/spec/crypto.md.
"""

from __future__ import annotations

from typing import Final

__all__ = [
    "ALG_AES256_GCM",
    "ALG_AES256_KWP",
    "ALG_AES256_KWP_BOUND",
    "ALG_ED25519",
    "ALG_HYBRID_KEM",
    "ALG_HYBRID_SIG",
    "ALG_SEALED_ARGON2ID_AES256GCM",
    "ALG_STREAM_AES256_GCM",
    "ALG_X25519",
    "CLASSICAL_ONLY_ALGS",
    "FORMAT_VERSION",
    "LABEL_AEAD",
    "LABEL_BOUND_KEY",
    "LABEL_KEM",
    "LABEL_KEY_SEAL",
    "LABEL_PASSPHRASE_KDF",
    "LABEL_SIG",
    "LABEL_STREAM",
]

#: Version byte of every format defined in docs/spec/crypto.md.
FORMAT_VERSION: Final = 0x01

#: AEAD envelope, AES-256-GCM (tensafe.crypto.aead).
ALG_AES256_GCM: Final = 0x01
#: AES-256 key wrap with padding, RFC 5649 (tensafe.crypto.keywrap).
ALG_AES256_KWP: Final = 0x02
#: Chunked STREAM of AES-256-GCM (tensafe.crypto.stream).
ALG_STREAM_AES256_GCM: Final = 0x03
#: AES-256 key wrap with padding of a key bound to a context (tensafe.crypto.keywrap).
ALG_AES256_KWP_BOUND: Final = 0x04
#: Hybrid signature Ed25519 + ML-DSA-65.
ALG_HYBRID_SIG: Final = 0x10
#: Classical-only Ed25519 (legacy mode, refused when TS_PQC_REQUIRED=true).
ALG_ED25519: Final = 0x11
#: Hybrid KEM X25519 + ML-KEM-768.
ALG_HYBRID_KEM: Final = 0x20
#: Classical-only X25519 KEM: reserved, never produced, always refused.
ALG_X25519: Final = 0x21
#: Private key sealed under a passphrase (Argon2id + AES-256-GCM).
ALG_SEALED_ARGON2ID_AES256GCM: Final = 0x30

#: Algorithm identifiers that carry no post-quantum component.
CLASSICAL_ONLY_ALGS: Final = frozenset({ALG_ED25519, ALG_X25519})

#: Domain-separation labels. Every one is listed in docs/spec/crypto.md.
LABEL_AEAD: Final = b"tensafe/aead/v1"
LABEL_SIG: Final = b"tensafe/sig/v1"
LABEL_KEM: Final = b"tensafe/kem/x25519-mlkem768/v1"
LABEL_STREAM: Final = b"tensafe/stream/v1"
LABEL_KEY_SEAL: Final = b"tensafe/key-seal/v1"
LABEL_PASSPHRASE_KDF: Final = b"tensafe/passphrase-kdf/v1"
LABEL_BOUND_KEY: Final = b"tensafe/bound-key/v1"
