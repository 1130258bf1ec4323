"""Encrypted artifact store throughput and memory vs raw AES-256-GCM, in one process.

Streams a generated artifact (default 1 GiB, no plaintext on disk) through
``EncryptedArtifactStore.put`` to a ``LocalFilesystemBackend`` (fsync + rename) and back
through ``get``, then runs two baselines over the same byte sequence and chunk size
with no I/O: raw AES-256-GCM (``cryptography`` AESGCM), and AES-256-GCM plus the
SHA-256 of the plaintext that the store records. Reports throughput, store/baseline
ratios in wall and CPU time (goal: >= 0.8; CPU time is the fair figure on a shared
machine) and the peak RSS growth over the RSS just before the store runs (goal: flat,
< 64 MiB). The last line printed is JSON.

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


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--size-mib", type=int, default=1024, help="artifact size in MiB (default 1024)")
    parser.add_argument("--dir", default=None, help="directory for the store (default: a temp dir)")
    args = parser.parse_args()
    size = args.size_mib * MIB
    blocks = [os.urandom(BLOCK) for _ in range(8)]
    root = Path(args.dir or tempfile.mkdtemp(prefix="tensafe-bench-"))
    store = EncryptedArtifactStore(LocalFilesystemBackend(root), FixedKeys())
    store.put("bench", "warmup", Generated(4 * MIB, blocks), kind="bench")  # type: ignore[arg-type]
    store.get("bench", "warmup", NullSink())  # type: ignore[arg-type]

    reset_ok = _reset_peak_rss()
    base_rss = _rss_kib("VmRSS")
    with Timer() as t_put:
        info = store.put("bench", "big", Generated(size, blocks), kind="bench")  # type: ignore[arg-type]
    sink = NullSink()
    with Timer() as t_get:
        got = store.get("bench", "big", sink)  # type: ignore[arg-type]
    peak_rss = _rss_kib("VmHWM")
    assert reset_ok or peak_rss > 0
    assert sink.n == size and got.sha256 == info.sha256
    stored = (root / "bench" / "big.tsa").stat().st_size
    if args.dir is None:
        shutil.rmtree(root, ignore_errors=True)

    # Baselines over the same bytes and chunk size, no I/O: raw AES-256-GCM, and
    # AES-256-GCM plus the SHA-256 of the plaintext that the store must compute.
    aead = AESGCM(os.urandom(32))
    nonce = os.urandom(12)
    cts: list[bytes] = []
    with Timer() as t_enc:
        src = Generated(size, blocks)
        while chunk := src.read(BLOCK):
            ct = aead.encrypt(nonce, chunk, None)
            if len(cts) < 8:
                cts.append(ct)
    with Timer() as t_dec:
        for i in range(size // BLOCK):
            aead.decrypt(nonce, cts[i % len(cts)], None)
    with Timer() as t_enc_sha:
        src = Generated(size, blocks)
        digest = hashlib.sha256()
        while chunk := src.read(BLOCK):
            digest.update(chunk)
            aead.encrypt(nonce, chunk, None)

    mib = size / MIB
    result = {
        "size_mib": args.size_mib,
        "store_put_mib_s": round(mib / t_put.wall, 1),
        "store_get_mib_s": round(mib / t_get.wall, 1),
        "raw_aes_gcm_encrypt_mib_s": round(mib / t_enc.wall, 1),
        "raw_aes_gcm_decrypt_mib_s": round(mib / t_dec.wall, 1),
        "raw_aes_gcm_sha256_mib_s": round(mib / t_enc_sha.wall, 1),
        "put_ratio_vs_raw": round(t_enc.wall / t_put.wall, 3),
        "get_ratio_vs_raw": round(t_dec.wall / t_get.wall, 3),
        "put_ratio_vs_raw_cpu": round(t_enc.cpu / t_put.cpu, 3),
        "get_ratio_vs_raw_cpu": round(t_dec.cpu / t_get.cpu, 3),
        "put_ratio_vs_gcm_plus_sha256_cpu": round(t_enc_sha.cpu / t_put.cpu, 3),
        "get_ratio_vs_gcm_plus_sha256_cpu": round((t_dec.cpu + t_enc_sha.cpu - t_enc.cpu) / t_get.cpu, 3),
        "peak_rss_over_baseline_mib": round((peak_rss - base_rss) / 1024, 1),
        "storage_overhead_bytes": stored - size,
        "load_average_1m": round(os.getloadavg()[0], 2),
        "cpus": os.cpu_count(),
    }
    r = result
    print(f"store put {r['store_put_mib_s']:>8} MiB/s; raw GCM enc {r['raw_aes_gcm_encrypt_mib_s']} MiB/s")
    print(f"store get {r['store_get_mib_s']:>8} MiB/s; raw GCM dec {r['raw_aes_gcm_decrypt_mib_s']} MiB/s")
    print(
        f"ratios (CPU time) vs raw GCM: put {r['put_ratio_vs_raw_cpu']} get {r['get_ratio_vs_raw_cpu']}; "
        f"vs GCM+SHA-256: put {result['put_ratio_vs_gcm_plus_sha256_cpu']} "
        f"get {result['get_ratio_vs_gcm_plus_sha256_cpu']} (goal >= 0.8)"
    )
    print(f"peak RSS +{result['peak_rss_over_baseline_mib']} MiB over baseline (goal < 64)")
    print(json.dumps(result, sort_keys=True))


if __name__ == "__main__":
    main()
