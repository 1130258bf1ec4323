"""Coverage-guided fuzzing of the TSSP parser with atheris (not collected by pytest).

Run: ``python tests/package/fuzz_tssp_atheris.py -atheris_runs=200000`` (add a corpus directory
to keep findings). Any exception other than :class:`tensafe.package.PackageError` is a crash.
The harness seeds itself with a freshly made valid package so mutations reach deep fields.
"""

from __future__ import annotations

import io
import sys
import tempfile
import warnings
from pathlib import Path

import atheris

with atheris.instrument_imports():
    from tensafe.package import PackageError
    from tensafe.package._format import read_header


def _seed_package() -> bytes:
    sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
    from package.tssp_helpers import certificate, make_adapter
    from tensafe.crypto.kem import HybridKemPrivateKey
    from tensafe.crypto.signing import HybridSigningKey
    from tensafe.package import pack

    with tempfile.TemporaryDirectory() as tmp:
        root = Path(tmp)
        out = root / "seed.tssp"
        pack(
            make_adapter(root / "a", certificate=certificate()),
            out,
            name="seed",
            version="1.0.0",
            signing_keys=[HybridSigningKey.generate()],
            recipients=[HybridKemPrivateKey.generate().public_key()],
            chunk_size=1024,
        )
        return out.read_bytes()


def test_one_input(data: bytes) -> None:
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        try:
            read_header(io.BytesIO(data), file_size=len(data))
        except PackageError:
            pass


def main() -> None:
    corpus = Path(tempfile.mkdtemp(prefix="tssp-corpus-"))
    (corpus / "seed.tssp").write_bytes(_seed_package())
    argv = [*sys.argv, str(corpus)] if not any(not a.startswith("-") for a in sys.argv[1:]) else sys.argv
    atheris.Setup(argv, test_one_input)
    atheris.Fuzz()


if __name__ == "__main__":
    main()
