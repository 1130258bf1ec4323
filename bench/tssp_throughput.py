"""TSSP throughput: pack, and verify + unpack, against raw SHA-256 + AES-256-GCM on the same bytes.

Run: ``python bench/tssp_throughput.py [--size-mib 1024] [--dir /path/on/disk]``

The baseline is what any encrypt-and-hash tool must do at least: read the adapter, SHA-256 it,
AES-256-GCM it in 1 MiB chunks and write the ciphertext (and the reverse for opening). TSSP pack
additionally hashes the files once before encrypting (the hashes go into the signed header that the
payload binds to), signs, and wraps the key; unpack verifies signatures and policy, then decrypts
and checks each file's hash. Ratios are baseline time / TSSP time (1.0 = as fast as the baseline;
goal >= 0.7). Peak memory is the growth of the process's peak RSS over the start of the run.
The last line printed is one JSON object.
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

from tensafe.crypto.kem import HybridKemPrivateKey
from tensafe.crypto.signing import HybridSigningKey
from tensafe.package import RollbackState, pack, unpack

MIB = 1 << 20


def peak_rss() -> int:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024


def make_adapter(root: Path, size: int) -> Path:
    root.mkdir(parents=True)
    (root / "adapter_config.json").write_text(
        json.dumps(
            {"base_model_name_or_path": "HuggingFaceTB/SmolLM2-135M-Instruct", "peft_type": "LORA", "r": 8}
        )
    )
    # Incompressible weights; a minimal safetensors header keeps the file recognisable.
    header = json.dumps({"w": {"dtype": "U8", "shape": [size], "data_offsets": [0, size]}}).encode()
    with (root / "adapter_model.safetensors").open("wb") as fh:
        fh.write(len(header).to_bytes(8, "little") + header)
        left = size
        block = os.urandom(MIB)
        while left:
            n = min(left, len(block))
            fh.write(block[:n])
            left -= n
    return root


def baseline_seal(src: Path, dst: Path, key: bytes) -> None:
    aead = AESGCM(key)
    digest = hashlib.sha256()
    buf = bytearray(MIB)
    with src.open("rb", buffering=0) as fin, dst.open("wb") as fout:
        index = 0
        while n := fin.readinto(buf):
            chunk = memoryview(buf)[:n]
            digest.update(chunk)
            fout.write(aead.encrypt(index.to_bytes(12, "big"), chunk, None))
            index += 1
        fout.flush()
        os.fsync(fout.fileno())
    digest.hexdigest()


def baseline_open(src: Path, dst: Path, key: bytes) -> None:
    aead = AESGCM(key)
    digest = hashlib.sha256()
    buf = bytearray(MIB + 16)
    with src.open("rb", buffering=0) as fin, dst.open("wb") as fout:
        index = 0
        while n := fin.readinto(buf):
            plain = aead.decrypt(index.to_bytes(12, "big"), memoryview(buf)[:n], None)
            digest.update(plain)
            fout.write(plain)
            index += 1
        fout.flush()
        os.fsync(fout.fileno())
    digest.hexdigest()


def timed(fn, *args, **kwargs) -> float:  # type: ignore[no-untyped-def]
    start = time.perf_counter()
    fn(*args, **kwargs)
    return time.perf_counter() - start


def main() -> None:
    parser = argparse.ArgumentParser(description="TSSP pack/unpack throughput vs raw SHA-256 + AES-256-GCM")
    parser.add_argument(
        "--size-mib", type=int, default=1024, help="adapter weight size in MiB (default 1024)"
    )
    parser.add_argument("--dir", default=None, help="scratch directory (default: a temporary directory)")
    parser.add_argument("--repeat", type=int, default=3, help="repetitions; the best time is reported")
    args = parser.parse_args()
    size = args.size_mib * MIB
    scratch = Path(tempfile.mkdtemp(prefix="tssp-bench-", dir=args.dir))
    try:
        adapter = make_adapter(scratch / "adapter", size)
        weights = adapter / "adapter_model.safetensors"
        total = sum(p.stat().st_size for p in adapter.iterdir())
        sk, rk = HybridSigningKey.generate(), HybridKemPrivateKey.generate()
        key = os.urandom(32)
        # Warm the page cache and the code paths once.
        baseline_seal(weights, scratch / "warm.bin", key)
        (scratch / "warm.bin").unlink()
        rss0 = peak_rss()

        best: dict[str, float] = {}
        rss_pack = rss_unpack = rss0
        for i in range(args.repeat):
            t_bseal = timed(baseline_seal, weights, scratch / "base.bin", key)
            t_bopen = timed(baseline_open, scratch / "base.bin", scratch / "base.out", key)
            (scratch / "base.bin").unlink()
            (scratch / "base.out").unlink()
            pkg = scratch / f"a{i}.tssp"
            t_pack = timed(
                pack,
                adapter,
                pkg,
                name="bench",
                version=f"1.0.{i}",
                signing_keys=[sk],
                recipients=[rk.public_key()],
            )
            rss_pack = max(rss_pack, peak_rss())
            out = scratch / f"out{i}"
            t_unpack = timed(
                unpack,
                pkg,
                out,
                recipient_key=rk,
                trust=[sk.verifying_key()],
                state=RollbackState(scratch / "state.json"),
            )
            rss_unpack = max(rss_unpack, peak_rss())
            pkg.unlink()
            shutil.rmtree(out)
            for name, value in [
                ("baseline_seal_s", t_bseal),
                ("baseline_open_s", t_bopen),
                ("pack_s", t_pack),
                ("verify_unpack_s", t_unpack),
            ]:
                best[name] = min(best.get(name, value), value)

        mib = total / MIB
        figures = {
            "size_mib": round(mib, 1),
            "pack_mib_s": round(mib / best["pack_s"], 1),
            "verify_unpack_mib_s": round(mib / best["verify_unpack_s"], 1),
            "baseline_seal_mib_s": round(mib / best["baseline_seal_s"], 1),
            "baseline_open_mib_s": round(mib / best["baseline_open_s"], 1),
            "pack_vs_baseline": round(best["baseline_seal_s"] / best["pack_s"], 3),
            "unpack_vs_baseline": round(best["baseline_open_s"] / best["verify_unpack_s"], 3),
            "pack_peak_rss_growth_mib": round((rss_pack - rss0) / MIB, 1),
            "unpack_peak_rss_growth_mib": round((rss_unpack - rss0) / MIB, 1),
            "repeat": args.repeat,
        }
        print(
            f"TSSP pack          {figures['pack_mib_s']:8.1f} MiB/s  "
            f"({figures['pack_vs_baseline']:.2f}x baseline "
            f"{figures['baseline_seal_mib_s']:.1f} MiB/s)"
        )
        print(
            f"TSSP verify+unpack {figures['verify_unpack_mib_s']:8.1f} MiB/s  "
            f"({figures['unpack_vs_baseline']:.2f}x baseline {figures['baseline_open_mib_s']:.1f} MiB/s)"
        )
        print(
            f"peak RSS growth: pack {figures['pack_peak_rss_growth_mib']} MiB, "
            f"unpack {figures['unpack_peak_rss_growth_mib']} MiB"
        )
        print(json.dumps(figures, sort_keys=True))
    finally:
        shutil.rmtree(scratch, ignore_errors=True)


if __name__ == "__main__":
    main()
