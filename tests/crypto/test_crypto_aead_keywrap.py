"""AEAD envelopes and key wrap: round trips, tamper detection, one opaque error, spec conformance."""

from __future__ import annotations

import os

import pytest
from Crypto.Cipher import AES as PyCryptodomeAES
from hypothesis import given, settings
from hypothesis import strategies as st

from tensafe.crypto import CryptoUsageError, DecryptionError
from tensafe.crypto.aead import OVERHEAD, open_sealed, seal
from tensafe.crypto.keywrap import unwrap_key, wrap_key

LABEL = "tensafe/test-envelope/v1"


def _spec_open(key: bytes, envelope: bytes, label: str, ad: bytes) -> bytes:
    """Open an envelope with pycryptodome, following docs/spec/crypto.md only."""
    assert envelope[:2] == b"\x01\x01"
    nonce, body = envelope[2:14], envelope[14:]
    lab = label.encode()
    aad = b"tensafe/aead/v1" + b"\x01\x01" + bytes([len(lab)]) + lab + ad
    cipher = PyCryptodomeAES.new(key, PyCryptodomeAES.MODE_GCM, nonce=nonce)
    cipher.update(aad)
    return cipher.decrypt_and_verify(body[:-16], body[-16:])


@settings(max_examples=50, deadline=None)
@given(pt=st.binary(max_size=2048), ad=st.binary(max_size=64))
def test_seal_round_trip_and_spec_conformance(pt: bytes, ad: bytes) -> None:
    key = os.urandom(32)
    env = seal(key, pt, label=LABEL, associated_data=ad)
    assert len(env) == len(pt) + OVERHEAD
    assert env[:2] == b"\x01\x01"
    assert open_sealed(key, env, label=LABEL, associated_data=ad) == pt
    assert _spec_open(key, env, LABEL, ad) == pt


def test_nonces_are_fresh() -> None:
    key = os.urandom(32)
    envs = {seal(key, b"same", label=LABEL)[2:14] for _ in range(64)}
    assert len(envs) == 64


def _all_failures(key: bytes, pt: bytes) -> list[bytes]:
    """Every way an envelope can be wrong; returns the error messages seen."""
    env = seal(key, pt, label=LABEL, associated_data=b"ad")
    messages = []
    cases = [
        (os.urandom(32), env, LABEL, b"ad"),  # wrong key
        (key, env, "tensafe/other/v1", b"ad"),  # wrong label
        (key, env, LABEL, b"AD"),  # wrong associated data
        (key, env[:-1], LABEL, b"ad"),  # truncated
        (key, env + b"\x00", LABEL, b"ad"),  # extended
        (key, b"", LABEL, b"ad"),  # empty
        (key, b"\x02" + env[1:], LABEL, b"ad"),  # unknown version
        (key, env[:1] + b"\x02" + env[2:], LABEL, b"ad"),  # wrong algorithm id
    ]
    for i in range(len(env)):
        flipped = bytearray(env)
        flipped[i] ^= 0x01
        cases.append((key, bytes(flipped), LABEL, b"ad"))
    for k, e, lab, ad in cases:
        with pytest.raises(DecryptionError) as info:
            open_sealed(k, e, label=lab, associated_data=ad)
        messages.append(str(info.value).encode())
    return messages


def test_every_failure_is_the_same_opaque_error() -> None:
    key = os.urandom(32)
    messages = _all_failures(key, b"top secret payload")
    assert len(set(messages)) == 1
    assert b"top secret" not in messages[0]
    assert key.hex().encode() not in messages[0]


def test_usage_errors() -> None:
    key = os.urandom(32)
    with pytest.raises(CryptoUsageError):
        seal(os.urandom(16), b"x", label=LABEL)
    for bad in ("", "dek", "tensafe/", "tensafe/has space", "tensafe/" + "x" * 300, "tensafe/é"):
        with pytest.raises(CryptoUsageError):
            seal(key, b"x", label=bad)
    with pytest.raises(CryptoUsageError):
        open_sealed(key, seal(key, b"x", label=LABEL), label="nolabel")


# --- key wrap -----------------------------------------------------------------------------


@settings(max_examples=30, deadline=None)
@given(size=st.integers(min_value=16, max_value=512))
def test_wrap_round_trip(size: int) -> None:
    kek, key = os.urandom(32), os.urandom(size)
    wrapped = wrap_key(kek, key)
    assert wrapped[:2] == b"\x01\x02"
    assert len(wrapped) == 2 + ((size + 7) // 8) * 8 + 8
    assert unwrap_key(kek, wrapped) == key


def test_unwrap_failures_are_opaque() -> None:
    kek, key = os.urandom(32), os.urandom(32)
    wrapped = wrap_key(kek, key)
    bad = [wrapped[:-8], wrapped + b"\x00" * 8, wrapped[:-1], b"\x01\x03" + wrapped[2:], b"", b"\x01\x02"]
    bad += [wrapped[:i] + bytes([wrapped[i] ^ 0x80]) + wrapped[i + 1 :] for i in range(len(wrapped))]
    messages = set()
    for w in [*bad, None]:
        with pytest.raises(DecryptionError) as info:
            unwrap_key(os.urandom(32) if w is None else kek, wrapped if w is None else w)
        messages.add(str(info.value))
    assert len(messages) == 1


def test_wrap_usage_errors() -> None:
    with pytest.raises(CryptoUsageError):
        wrap_key(os.urandom(24), os.urandom(32))
    with pytest.raises(CryptoUsageError):
        wrap_key(os.urandom(32), os.urandom(15))
    with pytest.raises(CryptoUsageError):
        wrap_key(os.urandom(32), os.urandom(4097))
