"""Keyed digests (tensafe.crypto.mac) against Python's own hmac module, an independent HMAC."""

from __future__ import annotations

import hashlib
import hmac

import pytest
from hypothesis import given
from hypothesis import strategies as st

from tensafe.crypto import CryptoUsageError, InvalidSignature
from tensafe.crypto.mac import KeyedDigest, keyed_digest, verify_keyed_digest

LABEL = b"tensafe/test-digest/v1"


@given(key=st.binary(min_size=32, max_size=80), pieces=st.lists(st.binary(max_size=200), max_size=5))
def test_matches_the_standard_library(key: bytes, pieces: list[bytes]) -> None:
    oracle = hmac.new(key, LABEL + b"\x00" + b"".join(pieces), hashlib.sha256).digest()
    assert keyed_digest(key, label=LABEL, data=pieces) == oracle
    d = KeyedDigest(key, label=LABEL)
    for piece in pieces:
        d.update(piece)
    assert d.hexdigest() == oracle.hex()


def test_label_and_key_rules() -> None:
    with pytest.raises(CryptoUsageError, match="at least 32 bytes"):
        keyed_digest(b"short", label=LABEL, data=b"x")
    with pytest.raises(CryptoUsageError, match="tensafe/"):
        keyed_digest(b"k" * 32, label=b"other/label", data=b"x")
    with pytest.raises(CryptoUsageError, match="NUL"):
        keyed_digest(b"k" * 32, label=b"tensafe/a\x00b", data=b"x")


def test_domain_separation_and_verification() -> None:
    key = b"\x01" * 32
    a = keyed_digest(key, label=b"tensafe/a/v1", data=b"same")
    b = keyed_digest(key, label=b"tensafe/b/v1", data=b"same")
    assert a != b
    verify_keyed_digest(key, label=b"tensafe/a/v1", data=b"same", expected=a)
    with pytest.raises(InvalidSignature):
        verify_keyed_digest(key, label=b"tensafe/a/v1", data=b"same", expected=b)
    with pytest.raises(InvalidSignature):
        verify_keyed_digest(b"\x02" * 32, label=b"tensafe/a/v1", data=b"same", expected=a)


def test_a_low_entropy_value_cannot_be_confirmed_without_the_key() -> None:
    """The point of keying: hashing the candidates finds nothing."""
    key = bytes(range(32))
    digest = keyed_digest(key, label=LABEL, data=b"diagnosis=B").hex()
    candidates = [b"diagnosis=A", b"diagnosis=B"]
    assert digest not in {hashlib.sha256(c).hexdigest() for c in candidates}
    assert digest not in {hashlib.sha256(LABEL + b"\x00" + c).hexdigest() for c in candidates}
    assert digest == keyed_digest(key, label=LABEL, data=candidates[1]).hex()  # the key holder can
