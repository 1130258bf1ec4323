"""Published test vectors (RFC 5649, RFC 5869, RFC 9106, Wycheproof) and independent oracles.

Each vector runs against the exact primitive call the recipes make (the functions in
``tensafe.crypto.hazmat.primitives``) and, where the recipe can carry it, through the
public API. pycryptodome (an implementation that shares no code with OpenSSL) and a
naive HMAC loop serve as second implementations.
"""

from __future__ import annotations

import hashlib
import hmac
import json
import os
import pathlib
from typing import Any

import pytest
from argon2.low_level import ARGON2_VERSION, Type, core, ffi, lib
from Crypto.Cipher import AES as PyCryptodomeAES
from cryptography.hazmat.primitives.ciphers.aead import AESGCM
from cryptography.hazmat.primitives.kdf.argon2 import Argon2id

from tensafe.crypto import CryptoUsageError, DecryptionError
from tensafe.crypto.hazmat import primitives
from tensafe.crypto.kdf import Argon2idParams, derive_key_from_passphrase, hkdf_sha256
from tensafe.crypto.keywrap import unwrap_key, wrap_key

VECTORS = pathlib.Path(__file__).resolve().parent.parent / "vectors" / "crypto"
KWP_PREFIX = b"\x01\x02"


def _tests(name: str) -> list[dict[str, Any]]:
    doc = json.loads((VECTORS / name).read_text())
    if "testGroups" in doc:
        return [t for g in doc["testGroups"] for t in g["tests"]]
    return list(doc["tests"])


def _id(t: dict[str, Any]) -> str:
    return f"tc{t['tcId']}-{t['result'] if 'result' in t else 'valid'}"


def _h(s: str) -> bytes:
    return bytes.fromhex(s)


# --- RFC 5649 (AES key wrap with padding), 192-bit KEK -------------------------------


@pytest.mark.parametrize("t", _tests("rfc5649_kwp.json"), ids=_id)
def test_rfc5649_vectors_primitive(t: dict[str, Any]) -> None:
    kek, msg, ct = _h(t["key"]), _h(t["msg"]), _h(t["ct"])
    assert primitives.kwp_wrap_raw(kek, msg) == ct
    assert primitives.kwp_unwrap_raw(kek, ct) == msg
    # Independent implementation.
    assert PyCryptodomeAES.new(kek, PyCryptodomeAES.MODE_KWP).seal(msg) == ct


# --- Wycheproof AES-256-KWP -------------------------------------------------------------


@pytest.mark.parametrize("t", _tests("wycheproof_aes256_kwp_subset.json"), ids=_id)
def test_wycheproof_kwp(t: dict[str, Any]) -> None:
    kek, msg, ct = _h(t["key"]), _h(t["msg"]), _h(t["ct"])
    if t["result"] == "valid":
        assert primitives.kwp_unwrap_raw(kek, ct) == msg
        assert PyCryptodomeAES.new(kek, PyCryptodomeAES.MODE_KWP).unseal(ct) == msg
        if "SmallKey" in t["flags"]:
            # Keys under 128 bits are refused by the recipe in both directions.
            with pytest.raises(CryptoUsageError):
                wrap_key(kek, msg)
            with pytest.raises(DecryptionError):
                unwrap_key(kek, KWP_PREFIX + ct)
        else:
            # RFC 5649 is deterministic: the recipe output is prefix || vector.
            assert wrap_key(kek, msg) == KWP_PREFIX + ct
            assert unwrap_key(kek, KWP_PREFIX + ct) == msg
    else:
        with pytest.raises(primitives.InvalidUnwrap):
            primitives.kwp_unwrap_raw(kek, ct)
        with pytest.raises(DecryptionError):
            unwrap_key(kek, KWP_PREFIX + ct)


def test_kwp_interoperates_with_pycryptodome_both_ways() -> None:
    for size in (16, 17, 24, 31, 32, 64, 100):
        kek, key = os.urandom(32), os.urandom(size)
        wrapped = wrap_key(kek, key)
        assert PyCryptodomeAES.new(kek, PyCryptodomeAES.MODE_KWP).unseal(wrapped[2:]) == key
        theirs = PyCryptodomeAES.new(kek, PyCryptodomeAES.MODE_KWP).seal(key)
        assert unwrap_key(kek, KWP_PREFIX + theirs) == key


# --- Wycheproof AES-256-GCM -------------------------------------------------------------


@pytest.mark.parametrize("t", _tests("wycheproof_aes256_gcm_subset.json"), ids=_id)
def test_wycheproof_gcm(t: dict[str, Any]) -> None:
    key, iv, aad, msg, ct, tag = (_h(t[k]) for k in ("key", "iv", "aad", "msg", "ct", "tag"))
    oracle = PyCryptodomeAES.new(key, PyCryptodomeAES.MODE_GCM, nonce=iv)
    oracle.update(aad)
    if t["result"] == "valid":
        assert AESGCM(key).encrypt(iv, msg, aad) == ct + tag
        assert AESGCM(key).decrypt(iv, ct + tag, aad) == msg
        assert oracle.decrypt_and_verify(ct, tag) == msg
    else:
        from cryptography.exceptions import InvalidTag

        with pytest.raises(InvalidTag):
            AESGCM(key).decrypt(iv, ct + tag, aad)
        with pytest.raises(ValueError):
            oracle.decrypt_and_verify(ct, tag)


# --- RFC 5869 HKDF-SHA256 ---------------------------------------------------------------


def _naive_hkdf(ikm: bytes, salt: bytes, info: bytes, length: int) -> bytes:
    """RFC 5869 written out with hmac, as an independent oracle."""
    prk = hmac.new(salt or b"\x00" * 32, ikm, hashlib.sha256).digest()
    okm, block, counter = b"", b"", 1
    while len(okm) < length:
        block = hmac.new(prk, block + info + bytes([counter]), hashlib.sha256).digest()
        okm += block
        counter += 1
    return okm[:length]


@pytest.mark.parametrize("t", _tests("rfc5869_hkdf_sha256.json"), ids=_id)
def test_rfc5869_hkdf_sha256(t: dict[str, Any]) -> None:
    ikm, salt, info, okm = _h(t["ikm"]), _h(t["salt"]), _h(t["info"]), _h(t["okm"])
    assert primitives.hkdf_sha256_raw(ikm, salt=salt or None, info=info, length=t["length"]) == okm
    assert _naive_hkdf(ikm, salt, info, t["length"]) == okm
    prk = hmac.new(salt or b"\x00" * 32, ikm, hashlib.sha256).digest()
    assert prk == _h(t["prk"])


def test_public_hkdf_matches_oracle_and_requires_label() -> None:
    ikm, salt = os.urandom(32), os.urandom(16)
    info = b"tensafe/test/v1"
    for length in (1, 32, 64, 255 * 32):
        assert hkdf_sha256(ikm, salt=salt, info=info, length=length) == _naive_hkdf(ikm, salt, info, length)
    with pytest.raises(CryptoUsageError, match="tensafe/"):
        hkdf_sha256(ikm, salt=salt, info=b"no-label")
    with pytest.raises(CryptoUsageError):
        hkdf_sha256(ikm, salt=salt, info=info, length=255 * 32 + 1)
    with pytest.raises(CryptoUsageError):
        hkdf_sha256(ikm, salt=salt, info=info, length=0)


# --- Argon2id ---------------------------------------------------------------------------


def test_rfc9106_argon2id_vector() -> None:
    # RFC 9106 section 5.3: password 32 x 0x01, salt 16 x 0x02, secret 8 x 0x03,
    # associated data 12 x 0x04, m=32 KiB, t=3, p=4, 32-byte tag.
    kdf = Argon2id(
        salt=b"\x02" * 16,
        length=32,
        iterations=3,
        lanes=4,
        memory_cost=32,
        ad=b"\x04" * 12,
        secret=b"\x03" * 8,
    )
    expected = "0d640df58d78766c08c037a34a8b53c9d01ef0452d75b65eb52520e96b01e659"
    assert kdf.derive(b"\x01" * 32).hex() == expected


def _argon2_cffi(secret: bytes, salt: bytes, ad: bytes, params: Argon2idParams) -> bytes:
    """Argon2id through the reference C implementation (argon2-cffi), with associated data."""
    out = ffi.new("uint8_t[]", 32)
    c_pwd, c_salt, c_ad = ffi.new("uint8_t[]", secret), ffi.new("uint8_t[]", salt), ffi.new("uint8_t[]", ad)
    ctx = ffi.new(
        "argon2_context *",
        {
            "version": ARGON2_VERSION,
            "out": out,
            "outlen": 32,
            "pwd": c_pwd,
            "pwdlen": len(secret),
            "salt": c_salt,
            "saltlen": len(salt),
            "secret": ffi.NULL,
            "secretlen": 0,
            "ad": c_ad,
            "adlen": len(ad),
            "t_cost": params.iterations,
            "m_cost": params.memory_cost,
            "lanes": params.lanes,
            "threads": params.lanes,
            "allocate_cbk": ffi.NULL,
            "free_cbk": ffi.NULL,
            "flags": lib.ARGON2_DEFAULT_FLAGS,
        },
    )
    assert core(ctx, Type.ID.value) == 0
    return bytes(ffi.buffer(out, 32))


def test_passphrase_kdf_matches_reference_argon2_with_label(fast_kdf: Argon2idParams) -> None:
    salt = os.urandom(16)
    got = derive_key_from_passphrase(b"correct horse", salt=salt, params=fast_kdf)
    assert got == _argon2_cffi(b"correct horse", salt, b"tensafe/passphrase-kdf/v1", fast_kdf)
    # The label is really bound: plain Argon2id (no associated data) differs.
    assert got != _argon2_cffi(b"correct horse", salt, b"", fast_kdf)


def test_argon2_params_bounds() -> None:
    assert Argon2idParams() == Argon2idParams(memory_cost=65536, iterations=3, lanes=4)
    for bad in (
        {"memory_cost": 1024},
        {"memory_cost": 19456, "iterations": 1},
        {"lanes": 0},
        {"lanes": 17},
        {"iterations": 65},
        {"memory_cost": 5 * 1024 * 1024},
    ):
        with pytest.raises(CryptoUsageError):
            Argon2idParams(**bad)
    p = Argon2idParams(memory_cost=20000, iterations=2, lanes=2)
    assert Argon2idParams.decode(p.encode()) == p
    with pytest.raises(CryptoUsageError):
        derive_key_from_passphrase(b"pw", salt=b"short", params=p)
    with pytest.raises(CryptoUsageError):
        derive_key_from_passphrase(b"", salt=b"s" * 16, params=p)
