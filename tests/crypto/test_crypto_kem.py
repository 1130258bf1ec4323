"""Hybrid X25519 + ML-KEM-768 KEM: round trips, the combiner, interop with kyber-py."""

from __future__ import annotations

import hashlib

import pytest
from cryptography.hazmat.primitives.asymmetric.x25519 import X25519PrivateKey, X25519PublicKey
from kyber_py.ml_kem import ML_KEM_768

from tensafe.crypto import DecryptionError, KeyFormatError
from tensafe.crypto.kem import ENCAPSULATION_SIZE, HybridKemPrivateKey, HybridKemPublicKey

LABEL = b"tensafe/kem/x25519-mlkem768/v1"


@pytest.fixture(scope="module")
def sk() -> HybridKemPrivateKey:
    return HybridKemPrivateKey.generate()


def _parts(sk: HybridKemPrivateKey) -> tuple[bytes, bytes, bytes, bytes]:
    """(x25519 private, ML-KEM seed, x25519 public, ML-KEM public) from the binary encoding."""
    return (
        sk._x.private_bytes_raw(),
        sk._m.private_bytes_raw(),
        sk.public_key()._x_raw,
        sk.public_key()._m_raw,
    )


def _oracle_decaps(sk: HybridKemPrivateKey, enc: bytes) -> bytes:
    """Recompute the shared secret with kyber-py, X25519 and hashlib, from the spec alone."""
    x_priv, m_seed, pk_x, pk_m = _parts(sk)
    assert enc[:2] == b"\x01\x20"
    ct_x, ct_m = enc[2:34], enc[34:]
    _ek, dk = ML_KEM_768.key_derive(m_seed)
    ss_m = ML_KEM_768.decaps(dk, ct_m)
    ss_x = X25519PrivateKey.from_private_bytes(x_priv).exchange(X25519PublicKey.from_public_bytes(ct_x))
    return hashlib.sha3_256(LABEL + ss_m + ss_x + ct_x + pk_x + ct_m + pk_m).digest()


def test_round_trip_and_combiner(sk: HybridKemPrivateKey) -> None:
    ss, enc = sk.public_key().encapsulate()
    assert len(ss) == 32 and len(enc) == ENCAPSULATION_SIZE == 1122
    assert sk.decapsulate(enc) == ss
    assert _oracle_decaps(sk, enc) == ss
    ss2, enc2 = sk.public_key().encapsulate()
    assert ss2 != ss and enc2 != enc


def test_kyber_py_encapsulates_to_our_key(sk: HybridKemPrivateKey) -> None:
    _x_priv, _seed, pk_x, pk_m = _parts(sk)
    # An independent sender: kyber-py for ML-KEM-768, cryptography for X25519.
    k_m, ct_m = ML_KEM_768.encaps(pk_m)
    eph = X25519PrivateKey.generate()
    ct_x = eph.public_key().public_bytes_raw()
    ss_x = eph.exchange(X25519PublicKey.from_public_bytes(pk_x))
    expected = hashlib.sha3_256(LABEL + k_m + ss_x + ct_x + pk_x + ct_m + pk_m).digest()
    assert sk.decapsulate(b"\x01\x20" + ct_x + ct_m) == expected


def test_binding_of_every_component(sk: HybridKemPrivateKey) -> None:
    ss, enc = sk.public_key().encapsulate()
    # ML-KEM implicit rejection: modified ciphertexts give unrelated secrets, not errors.
    for i in (2, 20, 33, 34, 500, len(enc) - 1):
        bad = enc[:i] + bytes([enc[i] ^ 1]) + enc[i + 1 :]
        try:
            assert sk.decapsulate(bad) != ss
        except DecryptionError:
            assert i < 34  # only a low-order X25519 point can make it fail
    # Another recipient's key yields another secret.
    assert HybridKemPrivateKey.generate().decapsulate(enc) != ss


def test_malformed_encapsulations_raise_one_error(sk: HybridKemPrivateKey) -> None:
    _ss, enc = sk.public_key().encapsulate()
    low_order = bytes(32)  # the X25519 point 0 has order 1: exchange gives all zeros
    cases = [
        b"",
        enc[:-1],
        enc + b"\x00",
        b"\x02" + enc[1:],
        b"\x01\x10" + enc[2:],
        enc[:2] + low_order + enc[34:],
    ]
    messages = set()
    for bad in cases:
        with pytest.raises(DecryptionError) as info:
            sk.decapsulate(bad)
        messages.add(str(info.value))
    assert len(messages) == 1


def test_key_files(sk: HybridKemPrivateKey, fast_kdf: object) -> None:
    pub = sk.public_key().public_bytes()
    assert pub.startswith(
        b"-----BEGIN TENSAFE HYBRID KEM PUBLIC KEY-----\nVersion: 1\nAlgorithm: x25519+ml-kem-768\n"
    )
    pk = HybridKemPublicKey.from_public_bytes(pub)
    assert pk == sk.public_key() and pk.key_id == sk.key_id
    ss, enc = pk.encapsulate()
    plain = sk.private_bytes(passphrase=None)
    assert plain.startswith(b"-----BEGIN TENSAFE HYBRID KEM PRIVATE KEY-----\n")
    assert HybridKemPrivateKey.from_private_bytes(plain, passphrase=None).decapsulate(enc) == ss
    sealed = sk.private_bytes(passphrase=b"pw", kdf_params=fast_kdf)  # type: ignore[arg-type]
    assert sealed.startswith(b"-----BEGIN TENSAFE ENCRYPTED HYBRID KEM PRIVATE KEY-----\n")
    assert HybridKemPrivateKey.from_private_bytes(sealed, passphrase=b"pw").decapsulate(enc) == ss
    with pytest.raises(DecryptionError):
        HybridKemPrivateKey.from_private_bytes(sealed, passphrase=b"pW")
    from tensafe.crypto.signing import HybridVerifyingKey

    with pytest.raises(KeyFormatError):
        HybridVerifyingKey.from_public_bytes(pub)
    assert sk._x.private_bytes_raw().hex() not in repr(sk)


def test_low_order_x25519_public_key_is_refused(sk: HybridKemPrivateKey) -> None:
    from tensafe.crypto.hazmat import keyfile
    from tensafe.crypto.kem import _FAMILY

    forged = keyfile.encode_public(_FAMILY, 0x20, bytes(32) + sk.public_key()._m_raw)
    with pytest.raises(KeyFormatError, match="X25519"):
        HybridKemPublicKey.from_public_bytes(forged)
    forged = keyfile.encode_public(_FAMILY, 0x20, sk.public_key()._x_raw + b"\xff" * 1184)
    with pytest.raises(KeyFormatError, match="ML-KEM"):
        HybridKemPublicKey.from_public_bytes(forged)
