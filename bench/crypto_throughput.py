"""Encrypted artifact store throughput and memory vs raw AES-256-GCM, in one process.

Streams a generated artifact (default 1 GiB, no plaintext on disk) through
``EncryptedArtifactStore.put`` to a ``LocalFilesystemBackend`` (fsync + rename) and back
through ``get``, then runs baselines over the same byte sequence in 1 MiB chunks:

* raw AES-256-GCM (``cryptography`` AESGCM), no I/O;
* AES-256-GCM plus the SHA-256 of the plaintext that the store must record, no I/O;
* the same plus the I/O any store must do: write the ciphertext to a file in the same
  directory and fsync it (put), read it back (get).

Ratios are baseline time / store time (1.0 = as fast as the baseline), in wall-clock
and in CPU time (all threads of the process); each figure is the best of ``--repeat``
runs. Goals: >= 0.9 against AES-GCM + SHA-256; peak RSS growth flat (< 64 MiB). The
0.8x goal against *bare* AES-GCM is out of reach while the plaintext SHA-256 is
required: SHA-256 runs several times slower than AES-GCM on this CPU (the ``sha256_mib_s``
and ``raw_aes_gcm_*_mib_s`` figures), so ``sha256_bound_vs_raw`` is the most any
hashing store can reach against bare AES-GCM. The store hashes on a worker thread
(``tensafe.crypto.hashing.ThreadedSha256``), so on a machine with a free core its
wall-clock time can beat the single-threaded baselines; CPU time cannot drop below
the sum of the work. The last line printed is JSON.

Usage::

    python bench/crypto_throughput.py                 # 1 GiB
    python bench/crypto_throughput.py --size-mib 256  # smaller
"""

from __future__ import annotations

import argparse
import hashlib
import json
import os
import resource
import shutil
import tempfile
import time
from pathlib import Path

from cryptography.hazmat.primitives.ciphers.aead import AESGCM

from tensafe.storage import EncryptedArtifactStore, LocalFilesystemBackend

MIB = 1 << 20
BLOCK = MIB


class Generated:
    """A readable of ``size`` bytes cycling through a few random 1 MiB blocks (flat memory)."""

    def __init__(self, size: int, blocks: list[bytes]) -> None:
        self.left = size
        self.blocks = blocks
        self.i = 0

    def read(self, n: int = -1) -> bytes:
        if self.left <= 0:
            return b""
        block = self.blocks[self.i % len(self.blocks)]
        self.i += 1
        if n < 0 or n >= BLOCK:
            out = block[: min(BLOCK, self.left)]
        else:
            out = block[: min(n, self.left)]
        self.left -= len(out)
        return out


class NullSink:
    def __init__(self) -> None:
        self.n = 0

    def write(self, data: bytes) -> int:
        self.n += len(data)
        return len(data)


class FixedKeys:
    """One random DEK (the key layer is measured elsewhere; this isolates the store)."""

    def __init__(self) -> None:
        self.dek = os.urandom(32)

    def encryption_key(self, tenant: str) -> tuple[int, bytes]:
        return 1, self.dek

    def decryption_key(self, tenant: str, dek_version: int) -> bytes:
        return self.dek


class Timer:
    """Wall-clock and process CPU time of a block (CPU time is robust to a busy machine)."""

    wall = 0.0
    cpu = 0.0

    def __enter__(self) -> Timer:
        self._w = time.perf_counter()
        self._c = time.process_time()
        return self

    def __exit__(self, *exc: object) -> None:
        self.wall = time.perf_counter() - self._w
        self.cpu = time.process_time() - self._c


def _reset_peak_rss() -> bool:
    try:
        with open("/proc/self/clear_refs", "w") as f:  # "5" resets VmHWM (Linux >= 4.0)
            f.write("5")
        return True
    except OSError:
        return False


def _rss_kib(field: str) -> int:
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith(field + ":"):
                return int(line.split()[1])
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss


def _best(timers: list[Timer]) -> Timer:
    best = Timer()
    best.wall = min(t.wall for t in timers)
    best.cpu = min(t.cpu for t in timers)
    return best


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--size-mib", type=int, default=1024, help="artifact size in MiB (default 1024)")
    parser.add_argument("--repeat", type=int, default=3, help="runs per figure; the best is kept (default 3)")
    parser.add_argument("--dir", default=None, help="directory for the store (default: a temp dir)")
    args = parser.parse_args()
    size = args.size_mib * MIB
    blocks = [os.urandom(BLOCK) for _ in range(8)]
    root = Path(args.dir or tempfile.mkdtemp(prefix="tensafe-bench-"))
    store = EncryptedArtifactStore(LocalFilesystemBackend(root), FixedKeys())
    store.put("bench", "warmup", Generated(4 * MIB, blocks), kind="bench")  # type: ignore[arg-type]
    store.get("bench", "warmup", NullSink())  # type: ignore[arg-type]
    aead = AESGCM(os.urandom(32))
    nonce = os.urandom(12)
    io_file = root / "baseline.bin"
    buf = bytearray(BLOCK + 16)

    reset_ok = _reset_peak_rss()
    base_rss = _rss_kib("VmRSS")
    peak_rss = 0
    runs: dict[str, list[Timer]] = {}
    stored = 0

    def timed(name: str) -> Timer:
        timer = Timer()
        runs.setdefault(name, []).append(timer)
        return timer

    # Store and baselines alternate within each repeat, so that on a noisy machine the
    # best run of each saw similar conditions.
    for _ in range(args.repeat):
        with timed("put"):
            info = store.put("bench", "big", Generated(size, blocks), kind="bench", overwrite=True)  # type: ignore[arg-type]
        sink = NullSink()
        with timed("get"):
            got = store.get("bench", "big", sink)  # type: ignore[arg-type]
        assert sink.n == size and got.sha256 == info.sha256
        stored = (root / "bench" / "big.tsa").stat().st_size
        if not peak_rss:  # the store's own peak, before any baseline allocates
            peak_rss = _rss_kib("VmHWM")
        store.delete("bench", "big")

        cts: list[bytes] = []
        with timed("enc"):
            src = Generated(size, blocks)
            while chunk := src.read(BLOCK):
                ct = aead.encrypt(nonce, chunk, None)
                if len(cts) < 8:
                    cts.append(ct)
        with timed("dec"):
            for i in range(size // BLOCK):
                aead.decrypt(nonce, cts[i % len(cts)], None)
        with timed("sha"):
            src = Generated(size, blocks)
            digest = hashlib.sha256()
            while chunk := src.read(BLOCK):
                digest.update(chunk)
        with timed("enc_sha"):
            src = Generated(size, blocks)
            digest = hashlib.sha256()
            while chunk := src.read(BLOCK):
                digest.update(chunk)
                aead.encrypt(nonce, chunk, None)
        with timed("dec_sha"):
            for i in range(size // BLOCK):
                digest.update(aead.decrypt(nonce, cts[i % len(cts)], None))
        # The same work plus the I/O any store must do: write the ciphertext to a file in
        # the same directory and fsync it (put); read it back with readinto (get).
        with timed("seal_io"):
            src = Generated(size, blocks)
            digest = hashlib.sha256()
            with io_file.open("wb", buffering=0) as out:
                while chunk := src.read(BLOCK):
                    digest.update(chunk)
                    out.write(aead.encrypt(nonce, chunk, None))
                os.fsync(out.fileno())
        with timed("open_io"):
            digest = hashlib.sha256()
            with io_file.open("rb", buffering=0) as fin:
                while n := fin.readinto(buf):
                    digest.update(aead.decrypt(nonce, memoryview(buf)[:n], None))
        io_file.unlink()
    assert reset_ok or peak_rss > 0
    if args.dir is None:
        shutil.rmtree(root, ignore_errors=True)

    b = {name: _best(timers) for name, timers in runs.items()}
    mib = size / MIB
    put, get = b["put"], b["get"]
    result = {
        "size_mib": args.size_mib,
        "repeat": args.repeat,
        "store_put_mib_s": round(mib / put.wall, 1),
        "store_get_mib_s": round(mib / get.wall, 1),
        "raw_aes_gcm_encrypt_mib_s": round(mib / b["enc"].wall, 1),
        "raw_aes_gcm_decrypt_mib_s": round(mib / b["dec"].wall, 1),
        "sha256_mib_s": round(mib / b["sha"].wall, 1),
        "raw_aes_gcm_sha256_mib_s": round(mib / b["enc_sha"].wall, 1),
        "baseline_seal_io_mib_s": round(mib / b["seal_io"].wall, 1),
        "baseline_open_io_mib_s": round(mib / b["open_io"].wall, 1),
        "put_ratio_vs_raw": round(b["enc"].wall / put.wall, 3),
        "get_ratio_vs_raw": round(b["dec"].wall / get.wall, 3),
        "put_ratio_vs_raw_cpu": round(b["enc"].cpu / put.cpu, 3),
        "get_ratio_vs_raw_cpu": round(b["dec"].cpu / get.cpu, 3),
        "sha256_bound_vs_raw": round(b["enc"].cpu / (b["enc"].cpu + b["sha"].cpu), 3),
        "put_ratio_vs_gcm_plus_sha256": round(b["enc_sha"].wall / put.wall, 3),
        "get_ratio_vs_gcm_plus_sha256": round(b["dec_sha"].wall / get.wall, 3),
        "put_ratio_vs_gcm_plus_sha256_cpu": round(b["enc_sha"].cpu / put.cpu, 3),
        "get_ratio_vs_gcm_plus_sha256_cpu": round(b["dec_sha"].cpu / get.cpu, 3),
        "put_ratio_vs_gcm_sha256_io": round(b["seal_io"].wall / put.wall, 3),
        "get_ratio_vs_gcm_sha256_io": round(b["open_io"].wall / get.wall, 3),
        "put_ratio_vs_gcm_sha256_io_cpu": round(b["seal_io"].cpu / put.cpu, 3),
        "get_ratio_vs_gcm_sha256_io_cpu": round(b["open_io"].cpu / get.cpu, 3),
        "peak_rss_over_baseline_mib": round((peak_rss - base_rss) / 1024, 1),
        "storage_overhead_bytes": stored - size,
        "load_average_1m": round(os.getloadavg()[0], 2),
        "cpus": os.cpu_count(),
    }
    r = result
    print(f"store put {r['store_put_mib_s']:>8} MiB/s; raw GCM enc {r['raw_aes_gcm_encrypt_mib_s']} MiB/s")
    print(f"store get {r['store_get_mib_s']:>8} MiB/s; raw GCM dec {r['raw_aes_gcm_decrypt_mib_s']} MiB/s")
    print(
        f"vs AES-GCM + SHA-256 (goal >= 0.9): put {r['put_ratio_vs_gcm_plus_sha256']} wall / "
        f"{r['put_ratio_vs_gcm_plus_sha256_cpu']} CPU; get {r['get_ratio_vs_gcm_plus_sha256']} wall / "
        f"{r['get_ratio_vs_gcm_plus_sha256_cpu']} CPU"
    )
    print(
        f"vs AES-GCM + SHA-256 + file I/O: put {r['put_ratio_vs_gcm_sha256_io']} wall / "
        f"{r['put_ratio_vs_gcm_sha256_io_cpu']} CPU; get {r['get_ratio_vs_gcm_sha256_io']} wall / "
        f"{r['get_ratio_vs_gcm_sha256_io_cpu']} CPU"
    )
    print(
        f"vs bare AES-GCM (issue goal 0.8, unreachable while SHA-256 is required): put "
        f"{r['put_ratio_vs_raw_cpu']} get {r['get_ratio_vs_raw_cpu']} CPU; SHA-256 {r['sha256_mib_s']} MiB/s "
        f"vs AES-GCM {r['raw_aes_gcm_encrypt_mib_s']} MiB/s bounds any hashing store at "
        f"{r['sha256_bound_vs_raw']}x CPU"
    )
    print(f"peak RSS +{r['peak_rss_over_baseline_mib']} MiB over baseline (goal < 64)")
    print(json.dumps(result, sort_keys=True))


if __name__ == "__main__":
    main()
