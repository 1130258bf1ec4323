"""The binding context encoding and the bound wrapped-key format (docs/spec/crypto.md §4.1).

Oracles: the frozen vectors in ``tests/vectors/crypto/tensafe_bound_kwp.json`` (made with
pycryptodome and hashlib, not with TenSafe), pycryptodome's RFC 5649 recomputed here, and a
naive parser that decodes a context back into its fields.
"""

from __future__ import annotations

import hashlib
import json
from pathlib import Path
from typing import Any

import pytest
from Crypto.Cipher import AES
from hypothesis import given, settings
from hypothesis import strategies as st

from tensafe.crypto.errors import CryptoUsageError, DecryptionError
from tensafe.crypto.keywrap import (
    BOUND_WRAP_PREFIX,
    unwrap_key,
    unwrap_key_bound,
    wrap_key,
    wrap_key_bound,
)
from tensafe.keys import BINDING_LABEL, KeyManagementError, dek_context, deployment_key_context

VECTORS = Path(__file__).parents[1] / "vectors" / "crypto" / "tensafe_bound_kwp.json"


def _vectors() -> list[dict[str, Any]]:
    tests: list[dict[str, Any]] = json.loads(VECTORS.read_text(encoding="utf-8"))["tests"]
    return tests


def _parse_context(context: bytes) -> list[bytes]:
    """Naive decoder: a list of u16-length-prefixed fields that must consume every byte."""
    fields, i = [], 0
    while i < len(context):
        n = int.from_bytes(context[i : i + 2], "big")
        assert i + 2 + n <= len(context)
        fields.append(context[i + 2 : i + 2 + n])
        i += 2 + n
    return fields


@pytest.mark.parametrize(
    "vector", [v for v in _vectors() if v["result"] == "valid"], ids=lambda v: str(v["tcId"])
)
def test_valid_vectors(vector: dict[str, Any]) -> None:
    kek, key = bytes.fromhex(vector["kek"]), bytes.fromhex(vector["key"])
    context, wrapped = bytes.fromhex(vector["context"]), bytes.fromhex(vector["wrapped"])
    assert wrap_key_bound(kek, key, context=context) == wrapped  # RFC 5649 is deterministic
    assert unwrap_key_bound(kek, wrapped, context=context) == key
    # pycryptodome unwraps the body to key || SHA-256(label || context).
    digest = hashlib.sha256(b"tensafe/bound-key/v1" + context).digest()
    assert AES.new(kek, AES.MODE_KWP).unseal(wrapped[2:]) == key + digest


@pytest.mark.parametrize(
    "vector", [v for v in _vectors() if v["result"] == "invalid"], ids=lambda v: str(v["tcId"])
)
def test_invalid_vectors(vector: dict[str, Any]) -> None:
    kek, context, wrapped = (bytes.fromhex(vector[k]) for k in ("kek", "context", "wrapped"))
    with pytest.raises(DecryptionError):
        unwrap_key_bound(kek, wrapped, context=context)


def test_the_context_encoding_matches_the_vectors() -> None:
    vectors = {v["tcId"]: bytes.fromhex(v["context"]) for v in _vectors()}
    assert dek_context(tenant="acme", version=1) == vectors[1]
    assert dek_context(tenant="acme", version=2) == vectors[2]
    assert dek_context(tenant="zürich-7", version=2**32 - 1) == vectors[3]
    assert deployment_key_context(name="signing", key_id="00112233445566778899aabbccddeeff") == vectors[4]


@settings(max_examples=200, deadline=None)
@given(
    a=st.tuples(st.text(min_size=1, max_size=40), st.integers(1, 2**32 - 1)),
    b=st.tuples(st.text(min_size=1, max_size=40), st.integers(1, 2**32 - 1)),
)
def test_contexts_are_injective_and_decode_to_their_fields(a: tuple[str, int], b: tuple[str, int]) -> None:
    ca, cb = dek_context(tenant=a[0], version=a[1]), dek_context(tenant=b[0], version=b[1])
    assert _parse_context(ca) == [BINDING_LABEL, b"tenant-dek", a[0].encode(), a[1].to_bytes(4, "big")]
    assert (ca == cb) == (a == b)
    assert ca != deployment_key_context(name=a[0], key_id=str(a[1]))  # purposes never collide


@settings(max_examples=100, deadline=None)
@given(
    kek=st.binary(min_size=32, max_size=32),
    key=st.binary(min_size=16, max_size=96),
    context=st.binary(min_size=1, max_size=200),
    other=st.binary(min_size=1, max_size=200),
    flip=st.integers(0, 10_000),
)
def test_bound_wrap_round_trips_and_rejects_other_contexts_and_any_change(
    kek: bytes, key: bytes, context: bytes, other: bytes, flip: int
) -> None:
    wrapped = wrap_key_bound(kek, key, context=context)
    assert wrapped[:2] == BOUND_WRAP_PREFIX
    assert unwrap_key_bound(kek, wrapped, context=context) == key
    if other != context:
        with pytest.raises(DecryptionError):
            unwrap_key_bound(kek, wrapped, context=other)
    damaged = bytearray(wrapped)
    damaged[flip % len(damaged)] ^= 1 << (flip % 8)
    with pytest.raises(DecryptionError):
        unwrap_key_bound(kek, bytes(damaged), context=context)
    with pytest.raises(DecryptionError):
        unwrap_key_bound(kek, wrapped[:-8], context=context)


def test_plain_and_bound_formats_never_open_as_each_other() -> None:
    kek, key, context = bytes(32), bytes(range(32)), dek_context(tenant="t", version=1)
    with pytest.raises(DecryptionError):
        unwrap_key(kek, wrap_key_bound(kek, key, context=context))
    with pytest.raises(DecryptionError):
        unwrap_key_bound(kek, wrap_key(kek, key), context=context)


def test_bad_arguments_are_usage_errors() -> None:
    kek, key = bytes(32), bytes(32)
    for context in (b"", b"x" * 4097):
        with pytest.raises(CryptoUsageError, match="binding context"):
            wrap_key_bound(kek, key, context=context)
        with pytest.raises(CryptoUsageError, match="binding context"):
            unwrap_key_bound(kek, b"\x01\x04" + bytes(80), context=context)
    with pytest.raises(CryptoUsageError):
        wrap_key_bound(kek, bytes(8), context=b"c")
    for version in (0, 2**32, True, -1):
        with pytest.raises(KeyManagementError):
            dek_context(tenant="t", version=version)
    with pytest.raises(KeyManagementError):
        dek_context(tenant="", version=1)
    with pytest.raises(KeyManagementError):
        deployment_key_context(name="signing", key_id="")
