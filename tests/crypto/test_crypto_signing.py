"""Hybrid Ed25519 + ML-DSA-65 signatures: both components required, encodings, key files."""

from __future__ import annotations

import pickle

import pytest
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PublicKey
from cryptography.hazmat.primitives.asymmetric.mldsa import MLDSA65PublicKey
from dilithium_py.ml_dsa import ML_DSA_65

from tensafe.crypto import CryptoUsageError, DecryptionError, InvalidSignature, KeyFormatError
from tensafe.crypto.kdf import Argon2idParams
from tensafe.crypto.signing import (
    HYBRID_SIGNATURE_SIZE,
    HybridSigningKey,
    HybridVerifyingKey,
)

CTX = "tensafe/test-manifest/v1"
MSG = b"manifest digest 0123456789abcdef"


@pytest.fixture(scope="module")
def sk() -> HybridSigningKey:
    return HybridSigningKey.generate()


@pytest.fixture(scope="module")
def other() -> HybridSigningKey:
    return HybridSigningKey.generate()


def _m_prime(context: str, message: bytes, alg: int = 0x10) -> bytes:
    """M' exactly as docs/spec/crypto.md defines it."""
    ctx = context.encode()
    return b"tensafe/sig/v1" + bytes([alg, len(ctx)]) + ctx + message


def _ed_pub(vk: HybridVerifyingKey) -> bytes:
    return vk._encoding[2:34]


def _ml_pub(vk: HybridVerifyingKey) -> bytes:
    return vk._encoding[34:]


def test_round_trip_and_layout(sk: HybridSigningKey) -> None:
    sig = sk.sign(MSG, context=CTX)
    assert len(sig) == HYBRID_SIGNATURE_SIZE == 3375
    assert sig[:2] == b"\x01\x10"
    sk.verifying_key().verify(sig, MSG, context=CTX)
    # Both components are valid signatures over the same M' (checked with the raw primitives).
    vk = sk.verifying_key()
    Ed25519PublicKey.from_public_bytes(_ed_pub(vk)).verify(sig[2:66], _m_prime(CTX, MSG))
    MLDSA65PublicKey.from_public_bytes(_ml_pub(vk)).verify(sig[66:], _m_prime(CTX, MSG), b"tensafe/sig/v1")


def test_each_single_component_failure_is_rejected(sk: HybridSigningKey, other: HybridSigningKey) -> None:
    vk = sk.verifying_key()
    sig = sk.sign(MSG, context=CTX)
    sig_other = other.sign(MSG, context=CTX)
    ed, ml = sig[2:66], sig[66:]
    ed_o, ml_o = sig_other[2:66], sig_other[66:]
    flip = lambda b, i: b[:i] + bytes([b[i] ^ 1]) + b[i + 1 :]  # noqa: E731
    bad = {
        "ed25519 part wrong": sig[:2] + flip(ed, 10) + ml,
        "ml-dsa part wrong": sig[:2] + ed + flip(ml, 100),
        "ed25519 part from another key": sig[:2] + ed_o + ml,
        "ml-dsa part from another key": sig[:2] + ed + ml_o,
        "ed25519 part missing": sig[:2] + ml,
        "ml-dsa part missing": sig[:2] + ed,
        "ed25519 zeroed": sig[:2] + bytes(64) + ml,
        "ml-dsa zeroed": sig[:2] + ed + bytes(len(ml)),
        "truncated": sig[:-1],
        "extended": sig + b"\x00",
        "wrong version": b"\x02" + sig[1:],
        "classical alg id": b"\x01\x11" + sig[2:],
        "unknown alg id": b"\x01\x7f" + sig[2:],
        "empty": b"",
    }
    for name, s in bad.items():
        with pytest.raises(InvalidSignature):
            vk.verify(s, MSG, context=CTX)
            pytest.fail(name)
    with pytest.raises(InvalidSignature):
        vk.verify(sig, MSG + b"x", context=CTX)
    with pytest.raises(InvalidSignature):
        vk.verify(sig, MSG, context=CTX + "x")
    with pytest.raises(InvalidSignature):
        other.verifying_key().verify(sig, MSG, context=CTX)  # swapped keys


def test_context_and_message_are_length_delimited(sk: HybridSigningKey) -> None:
    # ("ab", b"c...") and ("a", b"bc...") must not collide.
    sig = sk.sign(b"cmsg", context="tensafe/ab")
    with pytest.raises(InvalidSignature):
        sk.verifying_key().verify(sig, b"bcmsg", context="tensafe/a")


def test_context_rules(sk: HybridSigningKey) -> None:
    for bad in ("", "x" * 256):
        with pytest.raises(CryptoUsageError):
            sk.sign(MSG, context=bad)
    sig = sk.sign(MSG, context="é" * 127)  # 254 bytes of UTF-8
    sk.verifying_key().verify(sig, MSG, context="é" * 127)


def test_ml_dsa_component_interoperates_with_dilithium_py(sk: HybridSigningKey) -> None:
    vk = sk.verifying_key()
    sig = sk.sign(MSG, context=CTX)
    # cryptography's ML-DSA-65 signature verifies under the independent implementation
    # (pure FIPS 204 ML-DSA, no pre-hash, context string "tensafe/sig/v1").
    assert ML_DSA_65.verify(_ml_pub(vk), _m_prime(CTX, MSG), sig[66:], ctx=b"tensafe/sig/v1")
    assert not ML_DSA_65.verify(_ml_pub(vk), _m_prime(CTX, MSG), sig[66:], ctx=b"")
    # And the reverse: a dilithium-py signature from the same seed verifies in cryptography.
    seed = sk._ml.private_bytes_raw()  # type: ignore[union-attr]
    pk, dsk = ML_DSA_65.key_derive(seed)
    assert pk == _ml_pub(vk)
    theirs = ML_DSA_65.sign(dsk, _m_prime(CTX, MSG), ctx=b"tensafe/sig/v1")
    hybrid = sig[:66] + theirs
    vk.verify(hybrid, MSG, context=CTX)


def test_public_key_encoding(sk: HybridSigningKey) -> None:
    vk = sk.verifying_key()
    text = vk.public_bytes()
    assert text.startswith(
        b"-----BEGIN TENSAFE HYBRID VERIFYING KEY-----\nVersion: 1\nAlgorithm: ed25519+ml-dsa-65\n\n"
    )
    assert text.endswith(b"-----END TENSAFE HYBRID VERIFYING KEY-----\n")
    vk2 = HybridVerifyingKey.from_public_bytes(text)
    assert vk2 == vk and hash(vk2) == hash(vk)
    assert vk2.key_id == vk.key_id == sk.key_id
    assert len(vk.key_id) == 32
    import hashlib

    assert vk.key_id == hashlib.sha256(b"\x01\x10" + _ed_pub(vk) + _ml_pub(vk)).hexdigest()[:32]
    vk2.verify(sk.sign(MSG, context=CTX), MSG, context=CTX)
    # CRLF line endings are accepted.
    assert HybridVerifyingKey.from_public_bytes(text.replace(b"\n", b"\r\n")) == vk
    # A private key is not a public key.
    with pytest.raises(KeyFormatError):
        HybridVerifyingKey.from_public_bytes(sk.private_bytes(passphrase=None))


def test_private_key_plain_round_trip(sk: HybridSigningKey) -> None:
    text = sk.private_bytes(passphrase=None)
    assert text.startswith(b"-----BEGIN TENSAFE HYBRID SIGNING KEY-----\n")
    sk2 = HybridSigningKey.from_private_bytes(text, passphrase=None)
    assert sk2.key_id == sk.key_id
    sk.verifying_key().verify(sk2.sign(MSG, context=CTX), MSG, context=CTX)
    with pytest.raises(KeyFormatError, match="not passphrase-protected"):
        HybridSigningKey.from_private_bytes(text, passphrase=b"pw")


def test_private_key_sealed_round_trip(sk: HybridSigningKey, fast_kdf: Argon2idParams) -> None:
    text = sk.private_bytes(passphrase=b"hunter2 but longer", kdf_params=fast_kdf)
    assert text.startswith(b"-----BEGIN TENSAFE ENCRYPTED HYBRID SIGNING KEY-----\n")
    sk2 = HybridSigningKey.from_private_bytes(text, passphrase=b"hunter2 but longer")
    assert sk2.key_id == sk.key_id
    with pytest.raises(DecryptionError) as info:
        HybridSigningKey.from_private_bytes(text, passphrase=b"wrong")
    assert "hunter2" not in str(info.value) and "wrong" not in str(info.value).split(":")[0]
    with pytest.raises(KeyFormatError, match="passphrase-protected"):
        HybridSigningKey.from_private_bytes(text, passphrase=None)
    # Relabelling a sealed signing key as a KEM key fails (the type line is bound).
    from tensafe.crypto.kem import HybridKemPrivateKey

    with pytest.raises(KeyFormatError):
        HybridKemPrivateKey.from_private_bytes(text, passphrase=b"hunter2 but longer")


def test_sealed_key_parameters_are_authenticated(sk: HybridSigningKey, fast_kdf: Argon2idParams) -> None:
    import base64

    text = sk.private_bytes(passphrase=b"pw", kdf_params=fast_kdf).decode()
    lines = text.strip().split("\n")
    blob = bytearray(base64.b64decode("".join(lines[4:-1])))
    # Bump iterations from 2 to 3: still valid parameters, but the AAD no longer matches.
    assert blob[3:12] == fast_kdf.encode()
    blob[3:12] = Argon2idParams(memory_cost=fast_kdf.memory_cost, iterations=3, lanes=1).encode()
    b64 = base64.b64encode(bytes(blob)).decode()
    body = [b64[i : i + 64] for i in range(0, len(b64), 64)]
    forged = "\n".join([*lines[:4], *body, lines[-1]]) + "\n"
    with pytest.raises(DecryptionError):
        HybridSigningKey.from_private_bytes(forged.encode(), passphrase=b"pw")
    # Weak parameters are refused before any work is done.
    blob[3:12] = bytes([0, 0, 0, 8, 0, 0, 0, 1, 1])
    b64 = base64.b64encode(bytes(blob)).decode()
    body = [b64[i : i + 64] for i in range(0, len(b64), 64)]
    weak = "\n".join([*lines[:4], *body, lines[-1]]) + "\n"
    with pytest.raises(KeyFormatError, match="Argon2id"):
        HybridSigningKey.from_private_bytes(weak.encode(), passphrase=b"pw")


def test_no_key_material_in_repr_or_pickle(sk: HybridSigningKey) -> None:
    raw = sk._ed.private_bytes_raw()
    text = sk.private_bytes(passphrase=None).decode()
    for shown in (repr(sk), str(sk), repr(sk.verifying_key())):
        assert raw.hex() not in shown
        assert text.split("\n")[4][:20] not in shown
        assert sk.key_id in shown
    with pytest.raises(TypeError):
        pickle.dumps(sk)
