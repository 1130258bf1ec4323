"""ThreadedSha256: published SHA-256 vectors, agreement with hashlib, the buffer contract."""

from __future__ import annotations

import hashlib
import os
import threading

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from tensafe.crypto import CryptoUsageError
from tensafe.crypto.hashing import INLINE_THRESHOLD, ThreadedSha256

# FIPS 180-2, appendix B (SHA-256 examples), plus the empty message (NIST CAVP ShortMsg, Len = 0).
VECTORS = [
    (b"", "e3b0c44298fc1c149afbf4c8996fb92427ae41e4649b934ca495991b7852b855"),
    (b"abc", "ba7816bf8f01cfea414140de5dae2223b00361a396177a9cb410ff61f20015ad"),
    (
        b"abcdbcdecdefdefgefghfghighijhijkijkljklmklmnlmnomnopnopq",
        "248d6a61d20638b8e5c026930c3e6039a33ce45964ff2167f6ecedd419db06c1",
    ),
]
MILLION_A = "cdc76e5c9914fb9281a1c7e284d73e67f1809a48a497200e046d39ccc7112cd0"


def _workers() -> list[threading.Thread]:
    return [t for t in threading.enumerate() if t.name.startswith("tensafe-sha256")]


@pytest.mark.parametrize(("message", "expected"), VECTORS)
def test_fips_180_vectors(message: bytes, expected: str) -> None:
    with ThreadedSha256() as digest:
        digest.update(message)
        assert digest.hexdigest() == expected


def test_one_million_a_in_threaded_chunks() -> None:
    """FIPS 180-2 B.3, fed in chunks large enough to go to the worker thread."""
    digest = ThreadedSha256(max_in_flight=3)
    block = b"a" * 200_000
    for _ in range(5):
        digest.update(block)
    assert digest.hexdigest() == MILLION_A
    assert digest.digest() == bytes.fromhex(MILLION_A)  # idempotent


@settings(max_examples=60, deadline=None)
@given(
    sizes=st.lists(
        st.one_of(st.integers(0, 4096), st.integers(INLINE_THRESHOLD - 1, INLINE_THRESHOLD + 70_000)),
        max_size=12,
    ),
    max_in_flight=st.integers(1, 4),
    seed=st.binary(min_size=1, max_size=8),
)
def test_matches_hashlib_for_any_mix_of_small_and_large_updates(
    sizes: list[int], max_in_flight: int, seed: bytes
) -> None:
    """Inline (small) and threaded (large) updates interleave and still hash in order."""
    oracle = hashlib.sha256()
    with ThreadedSha256(max_in_flight=max_in_flight) as digest:
        for i, size in enumerate(sizes):
            data = hashlib.shake_256(seed + i.to_bytes(2, "big")).digest(size) if size else b""
            digest.update(data if i % 2 else memoryview(data))
            oracle.update(data)
        assert digest.digest() == oracle.digest()


@pytest.mark.parametrize("max_in_flight", [1, 2, 3])
def test_ring_of_max_in_flight_plus_one_reused_buffers_is_safe(max_in_flight: int) -> None:
    """The documented contract: a buffer may be refilled max_in_flight + 1 updates later.

    Each buffer is overwritten with garbage right after the contract says it is free and
    before it is refilled; any read of it by a still-pending update would change the digest.
    """
    ring = [bytearray(1 << 20) for _ in range(max_in_flight + 1)]
    oracle = hashlib.sha256()
    digest = ThreadedSha256(max_in_flight=max_in_flight)
    for i in range(24):
        buf = ring[i % len(ring)]
        buf[:] = b"\xff" * len(buf)  # scribble: must not be seen by any pending update
        buf[:] = hashlib.shake_256(i.to_bytes(2, "big")).digest(len(buf))
        oracle.update(buf)
        digest.update(buf)
    assert digest.digest() == oracle.digest()


def test_wait_makes_every_buffer_reusable() -> None:
    buf = bytearray(os.urandom(1 << 20))
    expected = hashlib.sha256(bytes(buf)).digest()
    digest = ThreadedSha256(max_in_flight=4)
    digest.update(buf)
    digest.wait()
    buf[:] = bytes(len(buf))
    assert digest.digest() == expected


def test_small_inputs_never_start_a_thread_and_the_worker_stops() -> None:
    before = len(_workers())
    digest = ThreadedSha256()
    digest.update(b"x" * (INLINE_THRESHOLD - 1))
    assert len(_workers()) == before
    digest.update(b"y" * INLINE_THRESHOLD)
    assert len(_workers()) == before + 1
    digest.hexdigest()
    assert len(_workers()) == before


def test_lifecycle_errors() -> None:
    digest = ThreadedSha256()
    digest.update(b"abc")
    assert digest.hexdigest() == VECTORS[1][1]
    with pytest.raises(CryptoUsageError, match="finished or closed"):
        digest.update(b"more")
    digest.close()
    digest.close()  # idempotent

    closed = ThreadedSha256()
    with closed:
        closed.update(b"x" * INLINE_THRESHOLD)
    with pytest.raises(CryptoUsageError, match="closed before it finished"):
        closed.digest()
    assert "closed" in repr(closed)


@pytest.mark.parametrize("bad", [0, -1, 1.5, True, "2"])
def test_max_in_flight_must_be_a_positive_integer(bad: object) -> None:
    with pytest.raises(CryptoUsageError, match="positive integer"):
        ThreadedSha256(max_in_flight=bad)  # type: ignore[arg-type]
