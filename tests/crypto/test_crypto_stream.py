"""STREAM chunked AEAD: round trips, every kind of tampering, constant memory, spec conformance."""

from __future__ import annotations

import hashlib
import hmac
import io
import os
import pathlib
import tracemalloc

import pytest
from Crypto.Cipher import AES as PyCryptodomeAES
from hypothesis import given, settings
from hypothesis import strategies as st

from tensafe.crypto import CryptoUsageError, DecryptionError
from tensafe.crypto.stream import (
    CHUNK_SIZE,
    HEADER_SIZE,
    TAG_SIZE,
    StreamDecryptor,
    StreamEncryptor,
    decrypt_stream,
    encrypt_stream,
)

CS = 1024  # small chunks keep the boundary tests fast
AD = b"tensafe/test-artifact/42"


def _enc(key: bytes, pt: bytes, ad: bytes = AD, chunk_size: int = CS) -> bytes:
    out = io.BytesIO()
    n = encrypt_stream(key, io.BytesIO(pt), out, associated_data=ad, chunk_size=chunk_size)
    assert n == len(out.getvalue())
    return out.getvalue()


def _dec(key: bytes, ct: bytes, ad: bytes = AD) -> bytes:
    out = io.BytesIO()
    n = decrypt_stream(key, io.BytesIO(ct), out, associated_data=ad)
    assert n == len(out.getvalue())
    return out.getvalue()


def _chunks(ct: bytes, cs: int = CS) -> list[bytes]:
    body = ct[HEADER_SIZE:]
    step = cs + TAG_SIZE
    return [body[i : i + step] for i in range(0, len(body), step)]


def _n_chunks(size: int, cs: int = CS) -> int:
    return max(1, -(-size // cs))


def _spec_decrypt(key: bytes, ct: bytes, ad: bytes) -> bytes:
    """Decrypt with pycryptodome and an HMAC-written HKDF, following docs/spec/crypto.md only."""
    header = ct[:35]
    assert header[:2] == b"\x01\x03"
    cs = 1 << header[2]
    salt = header[3:35]
    prk = hmac.new(salt, key, hashlib.sha256).digest()
    info = b"tensafe/stream/v1" + header[:3]
    t1 = hmac.new(prk, info + b"\x01", hashlib.sha256).digest()
    t2 = hmac.new(prk, t1 + info + b"\x02", hashlib.sha256).digest()
    okm = (t1 + t2)[:39]
    stream_key, prefix = okm[:32], okm[32:]
    body, out, i, pos = ct[35:], [], 0, 0
    while True:
        chunk = body[pos : pos + cs + 16]
        pos += len(chunk)
        final = pos == len(body)
        trailer = i.to_bytes(4, "big") + (b"\x01" if final else b"\x00")
        cipher = PyCryptodomeAES.new(stream_key, PyCryptodomeAES.MODE_GCM, nonce=prefix + trailer)
        cipher.update(header + ad + trailer)
        out.append(cipher.decrypt_and_verify(chunk[:-16], chunk[-16:]))
        if final:
            return b"".join(out)
        i += 1


SIZES = st.one_of(
    st.sampled_from([0, 1, CS - 1, CS, CS + 1, 2 * CS, 3 * CS, 3 * CS + 7]),
    st.integers(min_value=0, max_value=5 * CS),
)


@settings(max_examples=60, deadline=None)
@given(size=SIZES, data=st.data())
def test_round_trip_all_forms(size: int, data: st.DataObject) -> None:
    key = os.urandom(32)
    pt = os.urandom(size)
    ct = _enc(key, pt)
    assert len(ct) == HEADER_SIZE + size + TAG_SIZE * _n_chunks(size)
    assert _dec(key, ct) == pt
    assert _spec_decrypt(key, ct, AD) == pt

    # Incremental encryption with arbitrary split points gives the same layout.
    cuts = sorted(data.draw(st.lists(st.integers(0, size), max_size=6)))
    enc = StreamEncryptor(key, associated_data=AD, chunk_size=CS)
    parts, prev = [], 0
    for c in [*cuts, size]:
        parts.append(enc.update(pt[prev:c]))
        prev = c
    parts.append(enc.finalize())
    ct2 = b"".join(parts)
    assert len(ct2) == len(ct)
    assert _dec(key, ct2) == pt

    # Incremental decryption with arbitrary split points.
    dcuts = sorted(data.draw(st.lists(st.integers(0, len(ct)), max_size=6)))
    dec = StreamDecryptor(key, associated_data=AD)
    got, prev = [], 0
    for c in [*dcuts, len(ct)]:
        got.append(dec.update(ct[prev:c]))
        prev = c
    got.append(dec.finalize())
    assert b"".join(got) == pt


def test_empty_stream_is_one_empty_final_chunk() -> None:
    key = os.urandom(32)
    ct = _enc(key, b"")
    assert len(ct) == HEADER_SIZE + TAG_SIZE
    assert _dec(key, ct) == b""
    enc = StreamEncryptor(key, associated_data=AD)
    assert len(enc.finalize()) == HEADER_SIZE + TAG_SIZE


def _assert_rejected(key: bytes, ct: bytes, ad: bytes = AD) -> str:
    with pytest.raises(DecryptionError) as info:
        _dec(key, ct, ad)
    dec = StreamDecryptor(key, associated_data=ad)
    with pytest.raises(DecryptionError):
        dec.update(ct)
        dec.finalize()
    return str(info.value)


def test_every_byte_flip_is_rejected() -> None:
    key = os.urandom(32)
    ct = _enc(key, os.urandom(2 * CS + 500))
    messages = set()
    for i in range(len(ct)):
        bad = bytearray(ct)
        bad[i] ^= 0x01
        messages.add(_assert_rejected(key, bytes(bad)))
    assert len(messages) == 1


def test_truncation_anywhere_is_rejected() -> None:
    key = os.urandom(32)
    for size in (CS, 3 * CS, 3 * CS + 100):
        ct = _enc(key, os.urandom(size))
        boundaries = {HEADER_SIZE + k * (CS + TAG_SIZE) for k in range(_n_chunks(size) + 1)}
        for cut in sorted(boundaries | set(range(0, len(ct), 97))):
            if cut < len(ct):
                _assert_rejected(key, ct[:cut])


def test_reorder_drop_duplicate_and_append_are_rejected() -> None:
    key = os.urandom(32)
    ct = _enc(key, os.urandom(3 * CS + 10))
    h, c = ct[:HEADER_SIZE], _chunks(ct)
    assert len(c) == 4
    _assert_rejected(key, h + c[1] + c[0] + c[2] + c[3])  # swapped
    _assert_rejected(key, h + c[0] + c[2] + c[3])  # dropped middle
    _assert_rejected(key, h + c[0] + c[0] + c[1] + c[2] + c[3])  # duplicated
    _assert_rejected(key, ct + b"\x00")  # one byte appended
    _assert_rejected(key, ct + c[3])  # final chunk appended again
    _assert_rejected(key, ct + os.urandom(CS + TAG_SIZE))  # a full chunk appended


def test_appending_after_exact_multiple_is_rejected() -> None:
    key = os.urandom(32)
    ct = _enc(key, os.urandom(2 * CS))
    assert len(_chunks(ct)) == 2  # the last full chunk carries the final flag
    _assert_rejected(key, ct + os.urandom(TAG_SIZE))


def test_context_binding() -> None:
    key = os.urandom(32)
    pt = os.urandom(2 * CS + 1)
    ct = _enc(key, pt)
    _assert_rejected(key, ct, ad=b"tensafe/test-artifact/43")
    _assert_rejected(key, ct, ad=b"")
    _assert_rejected(os.urandom(32), ct)
    # Chunks of another stream under the same key and associated data do not fit.
    other = _enc(key, pt)
    _assert_rejected(key, ct[:HEADER_SIZE] + _chunks(other)[0] + b"".join(_chunks(ct)[1:]))
    _assert_rejected(key, other[:HEADER_SIZE] + ct[HEADER_SIZE:])
    # A header claiming another chunk size.
    for exp in (9, 11, 25, 255):
        _assert_rejected(key, ct[:2] + bytes([exp]) + ct[3:])


def test_decryptor_releases_only_authenticated_chunks_and_then_refuses() -> None:
    key = os.urandom(32)
    pt = os.urandom(3 * CS + 5)
    ct = bytearray(_enc(key, pt))
    ct[-1] ^= 1  # damage the final chunk only
    dec = StreamDecryptor(key, associated_data=AD)
    released = dec.update(bytes(ct))
    assert released == pt[: 3 * CS]  # the three intact chunks, nothing from the damaged one
    with pytest.raises(DecryptionError):
        dec.finalize()
    with pytest.raises(DecryptionError):
        dec.update(b"more")


def test_usage_errors() -> None:
    key = os.urandom(32)
    for bad in (1000, 512, 1 << 25, 3000):
        with pytest.raises(CryptoUsageError):
            StreamEncryptor(key, associated_data=AD, chunk_size=bad)
    with pytest.raises(CryptoUsageError):
        StreamEncryptor(os.urandom(16), associated_data=AD)
    enc = StreamEncryptor(key, associated_data=AD)
    enc.finalize()
    with pytest.raises(CryptoUsageError):
        enc.update(b"x")
    with pytest.raises(CryptoUsageError):
        enc.finalize()


class _Zeros(io.RawIOBase):
    """A reader of ``n`` zero bytes that never holds more than the caller's buffer."""

    def __init__(self, n: int) -> None:
        self.left = n

    def readable(self) -> bool:
        return True

    def readinto(self, b: bytearray | memoryview) -> int:  # type: ignore[override]
        n = min(len(b), self.left)
        memoryview(b)[:n] = bytes(n) if n <= 4096 else b"\x00" * n
        self.left -= n
        return n


class _Sink(io.RawIOBase):
    def __init__(self) -> None:
        self.count = 0
        self.digest = hashlib.sha256()

    def writable(self) -> bool:
        return True

    def write(self, b: bytes | bytearray | memoryview) -> int:  # type: ignore[override]
        self.digest.update(b)
        self.count += len(b)
        return len(b)


def test_constant_memory_on_64_mib(tmp_path: pathlib.Path) -> None:
    key = os.urandom(32)
    size = 64 * 1024 * 1024
    path = tmp_path / "stream.bin"
    tracemalloc.start()
    try:
        with path.open("wb") as f:
            encrypt_stream(key, _Zeros(size), f, associated_data=AD)
        _, enc_peak = tracemalloc.get_traced_memory()
        tracemalloc.reset_peak()
        sink = _Sink()
        with path.open("rb") as f:
            assert decrypt_stream(key, f, sink, associated_data=AD) == size
        _, dec_peak = tracemalloc.get_traced_memory()
    finally:
        tracemalloc.stop()
    assert path.stat().st_size == HEADER_SIZE + size + TAG_SIZE * (size // CHUNK_SIZE)
    assert sink.count == size
    # Three chunk-sized buffers plus small change: far below the 64 MiB payload.
    assert enc_peak < 6 * CHUNK_SIZE, enc_peak
    assert dec_peak < 6 * CHUNK_SIZE, dec_peak
