"""TS_PQC_REQUIRED: classical-only keys, signatures and encapsulations are refused when it is true."""

from __future__ import annotations

import pytest

from tensafe.crypto import (
    ClassicalOnlyWarning,
    CryptoConfigurationError,
    InvalidSignature,
    KeyFormatError,
    PQCRequiredError,
)
from tensafe.crypto.hazmat import keyfile
from tensafe.crypto.kdf import Argon2idParams
from tensafe.crypto.kem import _FAMILY as KEM_FAMILY
from tensafe.crypto.kem import HybridKemPrivateKey, HybridKemPublicKey
from tensafe.crypto.signing import _FAMILY as SIG_FAMILY
from tensafe.crypto.signing import HybridSigningKey, HybridVerifyingKey

CTX = "tensafe/test/v1"


@pytest.fixture
def legacy() -> HybridSigningKey:
    with pytest.warns(ClassicalOnlyWarning):
        return HybridSigningKey.generate(classical_only=True)


def _require(monkeypatch: pytest.MonkeyPatch, value: str = "true") -> None:
    monkeypatch.setenv("TS_PQC_REQUIRED", value)


def test_legacy_mode_works_with_warnings_when_not_required(legacy: HybridSigningKey) -> None:
    assert not legacy.is_hybrid and legacy.algorithm == "ed25519"
    with pytest.warns(ClassicalOnlyWarning):
        sig = legacy.sign(b"m", context=CTX)
    assert sig[:2] == b"\x01\x11" and len(sig) == 66
    text = legacy.verifying_key().public_bytes()
    assert text.startswith(b"-----BEGIN TENSAFE ED25519 VERIFYING KEY-----\nVersion: 1\nAlgorithm: ed25519\n")
    with pytest.warns(ClassicalOnlyWarning):
        vk = HybridVerifyingKey.from_public_bytes(text)
    with pytest.warns(ClassicalOnlyWarning):
        vk.verify(sig, b"m", context=CTX)
    with pytest.warns(ClassicalOnlyWarning), pytest.raises(InvalidSignature):
        vk.verify(sig, b"other", context=CTX)


@pytest.mark.parametrize("value", ["true", "TRUE", "1", "yes", "on"])
def test_required_refuses_every_classical_path(
    legacy: HybridSigningKey, monkeypatch: pytest.MonkeyPatch, value: str, fast_kdf: Argon2idParams
) -> None:
    with pytest.warns(ClassicalOnlyWarning):
        sig = legacy.sign(b"m", context=CTX)
    pub = legacy.verifying_key().public_bytes()
    priv = legacy.private_bytes(passphrase=None)
    sealed = legacy.private_bytes(passphrase=b"pw", kdf_params=fast_kdf)
    vk = legacy.verifying_key()
    hybrid = HybridSigningKey.generate()
    _require(monkeypatch, value)
    with pytest.raises(PQCRequiredError, match="TS_PQC_REQUIRED"):
        HybridSigningKey.generate(classical_only=True)
    with pytest.raises(PQCRequiredError):
        HybridVerifyingKey.from_public_bytes(pub)
    with pytest.raises(PQCRequiredError):
        HybridSigningKey.from_private_bytes(priv, passphrase=None)
    with pytest.raises(PQCRequiredError):
        HybridSigningKey.from_private_bytes(sealed, passphrase=b"pw")  # refused before the KDF runs
    with pytest.raises(PQCRequiredError):
        vk.verify(sig, b"m", context=CTX)  # a key loaded before the policy was switched on
    with pytest.raises(PQCRequiredError):
        legacy.sign(b"m", context=CTX)
    # A classical-only signature presented to a hybrid key names the policy.
    with pytest.raises(PQCRequiredError):
        hybrid.verifying_key().verify(sig, b"m", context=CTX)
    # Hybrid keys keep working.
    hybrid.verifying_key().verify(hybrid.sign(b"m", context=CTX), b"m", context=CTX)


def test_hybrid_key_never_accepts_a_classical_signature(legacy: HybridSigningKey) -> None:
    hybrid = HybridSigningKey.generate()
    with pytest.warns(ClassicalOnlyWarning):
        sig = legacy.sign(b"m", context=CTX)
    with pytest.raises(InvalidSignature):
        hybrid.verifying_key().verify(sig, b"m", context=CTX)
    # Nor a hybrid signature whose algorithm byte was rewritten and ML-DSA part stripped.
    hsig = hybrid.sign(b"m", context=CTX)
    with pytest.raises(InvalidSignature):
        hybrid.verifying_key().verify(b"\x01\x11" + hsig[2:66], b"m", context=CTX)
    # And the Ed25519 half of a hybrid signature is no classical signature either (alg byte in M').
    forged_vk_text = keyfile.encode_public(SIG_FAMILY, 0x11, hybrid.verifying_key()._encoding[2:34])
    with pytest.warns(ClassicalOnlyWarning):
        ed_only = HybridVerifyingKey.from_public_bytes(forged_vk_text)
    with pytest.warns(ClassicalOnlyWarning), pytest.raises(InvalidSignature):
        ed_only.verify(b"\x01\x11" + hsig[2:66], b"m", context=CTX)


def test_reserved_classical_kem_id(monkeypatch: pytest.MonkeyPatch) -> None:
    sk = HybridKemPrivateKey.generate()
    pub = keyfile.encode_public(KEM_FAMILY, 0x21, bytes(range(32)))
    priv = keyfile.encode_private(KEM_FAMILY, 0x21, bytes(range(32)), passphrase=None, params=None)
    _ss, enc = sk.public_key().encapsulate()
    classical_enc = b"\x01\x21" + enc[2:34]
    with pytest.raises(KeyFormatError, match="unsupported"):
        HybridKemPublicKey.from_public_bytes(pub)
    with pytest.raises(KeyFormatError, match="unsupported"):
        HybridKemPrivateKey.from_private_bytes(priv, passphrase=None)
    from tensafe.crypto import DecryptionError

    with pytest.raises(DecryptionError):
        sk.decapsulate(classical_enc)
    _require(monkeypatch)
    with pytest.raises(PQCRequiredError):
        HybridKemPublicKey.from_public_bytes(pub)
    with pytest.raises(PQCRequiredError):
        HybridKemPrivateKey.from_private_bytes(priv, passphrase=None)
    with pytest.raises(PQCRequiredError):
        sk.decapsulate(classical_enc)
    assert sk.decapsulate(enc) == sk.decapsulate(enc)


@pytest.mark.parametrize("value", ["", "0", "false", "No", "off"])
def test_false_values(monkeypatch: pytest.MonkeyPatch, value: str) -> None:
    _require(monkeypatch, value)
    with pytest.warns(ClassicalOnlyWarning):
        HybridSigningKey.generate(classical_only=True)


@pytest.mark.parametrize("value", ["treu", "2", "required", "enabled"])
def test_unknown_values_fail_closed(monkeypatch: pytest.MonkeyPatch, value: str) -> None:
    _require(monkeypatch, value)
    with pytest.raises(CryptoConfigurationError, match="TS_PQC_REQUIRED"):
        HybridSigningKey.generate(classical_only=True)
    assert CryptoConfigurationError.exit_code == 2
