"""Fuzz every parser of untrusted input: only CryptoError subclasses may escape.

Inputs are random bytes and random mutations (flip, delete, insert, truncate, CRLF) of
valid encodings, so the fuzzer reaches the deep branches behind the armor and headers.
"""

from __future__ import annotations

import io
import os
from collections.abc import Callable

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from tensafe.crypto import CryptoError, DecryptionError, InvalidSignature
from tensafe.crypto.aead import open_sealed, seal
from tensafe.crypto.hazmat.armor import armor, dearmor
from tensafe.crypto.kdf import Argon2idParams
from tensafe.crypto.kem import HybridKemPrivateKey, HybridKemPublicKey
from tensafe.crypto.keywrap import unwrap_key, wrap_key
from tensafe.crypto.signing import HybridSigningKey, HybridVerifyingKey
from tensafe.crypto.stream import StreamDecryptor, decrypt_stream, encrypt_stream

pytestmark = pytest.mark.filterwarnings("ignore::tensafe.crypto.ClassicalOnlyWarning")

FUZZ = settings(max_examples=150, deadline=None, suppress_health_check=[HealthCheck.too_slow])

SK = HybridSigningKey.generate()
VK = SK.verifying_key()
KEM = HybridKemPrivateKey.generate()
KEY = os.urandom(32)
CTX = "tensafe/fuzz/v1"
SIG = SK.sign(b"msg", context=CTX)
_SS, ENC = KEM.public_key().encapsulate()
SEALED_SIG = SK.private_bytes(passphrase=b"pw", kdf_params=Argon2idParams.minimum())
SEALED_KEM = KEM.private_bytes(passphrase=b"pw", kdf_params=Argon2idParams.minimum())
ENVELOPE = seal(KEY, b"payload", label="tensafe/fuzz/v1")
WRAPPED = wrap_key(KEY, os.urandom(32))
_buf = io.BytesIO()
encrypt_stream(KEY, io.BytesIO(os.urandom(3000)), _buf, associated_data=b"ad", chunk_size=1024)
STREAM = _buf.getvalue()

VALID: dict[str, bytes] = {
    "sig-public": VK.public_bytes(),
    "sig-private": SK.private_bytes(passphrase=None),
    "sig-sealed": SEALED_SIG,
    "kem-public": KEM.public_key().public_bytes(),
    "kem-private": KEM.private_bytes(passphrase=None),
    "kem-sealed": SEALED_KEM,
}


@st.composite
def mutated(draw: st.DrawFn, base: bytes) -> bytes:
    data = bytearray(base)
    for _ in range(draw(st.integers(1, 4))):
        op = draw(st.sampled_from(["flip", "delete", "insert", "truncate", "crlf", "set"]))
        i = draw(st.integers(0, max(0, len(data) - 1)))
        if op == "flip" and data:
            data[i] ^= 1 << draw(st.integers(0, 7))
        elif op == "set" and data:
            data[i] = draw(st.sampled_from(b"=-+/\n\r A0\x00\xff"))
        elif op == "delete":
            del data[i : i + draw(st.integers(1, 8))]
        elif op == "insert":
            data[i:i] = draw(st.binary(min_size=1, max_size=8))
        elif op == "truncate":
            del data[i:]
        elif op == "crlf":
            data = bytearray(bytes(data).replace(b"\n", b"\r\n"))
    return bytes(data)


def _only_crypto_errors(fn: Callable[[], object]) -> None:
    try:
        fn()
    except CryptoError:
        pass


PARSERS: dict[str, Callable[[bytes], object]] = {
    "sig-public": HybridVerifyingKey.from_public_bytes,
    "sig-private": lambda d: HybridSigningKey.from_private_bytes(d, passphrase=None),
    "sig-sealed": lambda d: HybridSigningKey.from_private_bytes(d, passphrase=None),
    "kem-public": HybridKemPublicKey.from_public_bytes,
    "kem-private": lambda d: HybridKemPrivateKey.from_private_bytes(d, passphrase=None),
    "kem-sealed": lambda d: HybridKemPrivateKey.from_private_bytes(d, passphrase=None),
}


@pytest.mark.parametrize("name", sorted(PARSERS))
@FUZZ
@given(data=st.data())
def test_key_parsers(name: str, data: st.DataObject) -> None:
    blob = data.draw(st.one_of(st.binary(max_size=600), mutated(VALID[name]), mutated(VALID[name][::7])))
    _only_crypto_errors(lambda: PARSERS[name](blob))


@FUZZ
@given(text=st.text(max_size=400))
def test_armor_parser_on_text(text: str) -> None:
    _only_crypto_errors(lambda: dearmor(text, kinds=frozenset({"TENSAFE HYBRID SIGNING KEY"})))
    _only_crypto_errors(lambda: HybridVerifyingKey.from_public_bytes(text))  # type: ignore[arg-type]


@settings(max_examples=8, deadline=None)
@given(data=st.data())
def test_sealed_key_body_mutations_with_passphrase(data: st.DataObject) -> None:
    # Mutate only the base64 body (never the header lines): a changed parameter field
    # either fails the bounds check or the AEAD tag, never anything else.
    lines = SEALED_SIG.split(b"\n")
    body = b"\n".join(lines[4:-2])
    blob = b"\n".join([*lines[:4], data.draw(mutated(body)), *lines[-2:]])
    _only_crypto_errors(lambda: HybridSigningKey.from_private_bytes(blob, passphrase=b"pw"))


@FUZZ
@given(data=st.data())
def test_signature_decoding(data: st.DataObject) -> None:
    sig = data.draw(st.one_of(st.binary(max_size=4000), mutated(SIG)))
    if sig == SIG:
        return
    with pytest.raises(InvalidSignature):
        VK.verify(sig, b"msg", context=CTX)


@FUZZ
@given(data=st.data())
def test_decapsulation(data: st.DataObject) -> None:
    enc = data.draw(st.one_of(st.binary(max_size=1200), mutated(ENC)))
    _only_crypto_errors(lambda: KEM.decapsulate(enc))


@FUZZ
@given(data=st.data())
def test_envelope_and_wrap_decoding(data: st.DataObject) -> None:
    env = data.draw(st.one_of(st.binary(max_size=100), mutated(ENVELOPE)))
    if env != ENVELOPE:
        with pytest.raises(DecryptionError):
            open_sealed(KEY, env, label="tensafe/fuzz/v1")
    w = data.draw(st.one_of(st.binary(max_size=100), mutated(WRAPPED)))
    if w != WRAPPED:
        with pytest.raises(DecryptionError):
            unwrap_key(KEY, w)


@FUZZ
@given(data=st.data())
def test_stream_decoding(data: st.DataObject) -> None:
    ct = data.draw(st.one_of(st.binary(max_size=200), mutated(STREAM)))
    if ct == STREAM:
        return
    with pytest.raises(DecryptionError):
        decrypt_stream(KEY, io.BytesIO(ct), io.BytesIO(), associated_data=b"ad")
    dec = StreamDecryptor(KEY, associated_data=b"ad")
    with pytest.raises(DecryptionError):
        dec.update(ct)
        dec.finalize()


@pytest.mark.parametrize("name", sorted(PARSERS))
@FUZZ
@given(data=st.data())
def test_key_parsers_behind_valid_armor(name: str, data: st.DataObject) -> None:
    # Re-armor a mutated binary payload so every mutation reaches the binary parser.
    block = dearmor(VALID[name], kinds=frozenset({VALID[name].split(b"\n")[0][11:-5].decode()}))
    payload = data.draw(mutated(block.payload))
    kind = data.draw(st.sampled_from([block.kind, block.kind.replace("HYBRID", "ED25519")]))
    blob = armor(kind, version=block.version, algorithm=block.algorithm, payload=payload)
    _only_crypto_errors(lambda: PARSERS[name](blob))
