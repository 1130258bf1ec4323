"""A 2 GiB payload packs and unpacks in constant memory (peak RSS growth bounded)."""

from __future__ import annotations

import hashlib
import json
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest

SIZE = 2 << 30  # 2 GiB
BOUND = 64 << 20  # allowed peak-memory growth

SCRIPT = textwrap.dedent(
    """
    import json, os, resource, sys, tracemalloc
    from pathlib import Path
    sys.path.insert(0, sys.argv[2])
    from package.tssp_helpers import make_adapter
    from tensafe.crypto.kem import HybridKemPrivateKey
    from tensafe.crypto.signing import HybridSigningKey
    from tensafe.package import pack, unpack

    root = Path(sys.argv[1]); size = int(sys.argv[3])
    sk, rk = HybridSigningKey.generate(), HybridKemPrivateKey.generate()
    def rss(): return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024
    common = dict(name="big", version="1.0.0", signing_keys=[sk], recipients=[rk.public_key()])
    # Warm-up with a tiny adapter so that imports and buffers are counted in the baseline.
    pack(make_adapter(root / "tiny"), root / "tiny.tssp", **common)
    unpack(root / "tiny.tssp", root / "tiny-out", recipient_key=rk, trust=[sk.verifying_key()], state=None)
    big = make_adapter(root / "big")
    with open(big / "adapter_model.safetensors", "r+b") as fh:  # sparse: no 2 GiB written up front
        fh.truncate(size)
    base = rss()
    tracemalloc.start()
    pack(big, root / "big.tssp", **common)
    after_pack = rss()
    unpack(root / "big.tssp", root / "big-out", recipient_key=rk, trust=[sk.verifying_key()], state=None)
    after_unpack = rss()
    peak_py = tracemalloc.get_traced_memory()[1]
    print(json.dumps({"base": base, "after_pack": after_pack, "after_unpack": after_unpack,
                      "tracemalloc_peak": peak_py, "package_size": os.path.getsize(root / "big.tssp")}))
    """
)


def _sha256_of_prefix_and_zeros(prefix: bytes, size: int) -> str:
    digest = hashlib.sha256(prefix)
    zeros = bytes(1 << 20)
    left = size - len(prefix)
    while left:
        n = min(left, len(zeros))
        digest.update(zeros[:n])
        left -= n
    return digest.hexdigest()


@pytest.mark.slow
def test_two_gib_payload_in_constant_memory(tmp_path: Path) -> None:
    tests_dir = str(Path(__file__).parents[1])
    proc = subprocess.run(
        [sys.executable, "-c", SCRIPT, str(tmp_path), tests_dir, str(SIZE)],
        capture_output=True,
        text=True,
        timeout=1200,
        check=False,
    )
    assert proc.returncode == 0, proc.stderr[-2000:]
    figures = json.loads(proc.stdout.strip().splitlines()[-1])
    assert figures["after_pack"] - figures["base"] < BOUND, figures
    assert figures["after_unpack"] - figures["base"] < BOUND, figures
    assert figures["tracemalloc_peak"] < BOUND, figures
    assert figures["package_size"] > SIZE
    out = tmp_path / "big-out" / "adapter_model.safetensors"
    assert out.stat().st_size == SIZE
    # Independent oracle: the sparse file is its first bytes followed by zeros only.
    src = tmp_path / "big" / "adapter_model.safetensors"
    with src.open("rb") as fh:
        head = fh.read(4096)
    manifest = json.loads((tmp_path / "big-out" / "tssp_manifest.json").read_text())
    entry = next(f for f in manifest["files"] if f["path"] == "adapter_model.safetensors")
    assert entry["sha256"] == _sha256_of_prefix_and_zeros(head, SIZE)
