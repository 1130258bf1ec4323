"""Generate the TSSP v1 golden packages and their keys (run once per format version).

Usage::

    python tests/vectors/tssp/generate.py                   # refuses if the goldens exist
    python tests/vectors/tssp/generate.py --update-goldens  # regenerate everything (new keys!)

Goldens are *frozen*: every later TenSafe version must verify and unpack them unchanged
(tests/package/test_tssp_golden.py). Regenerate only when introducing a new format version,
and then add new files rather than replacing the old ones. See PROVENANCE.md.
"""

from __future__ import annotations

import argparse
import hashlib
import json
import shutil
import sys
from datetime import UTC, datetime, timedelta
from pathlib import Path

import numpy as np
from safetensors.numpy import save_file

from tensafe.crypto.kem import HybridKemPrivateKey
from tensafe.crypto.signing import HybridSigningKey
from tensafe.package import build_evidence, inspect, pack

HERE = Path(__file__).resolve().parent
CREATED = datetime(2026, 11, 29, tzinfo=UTC)
VALIDITY = timedelta(days=365 * 100)  # goldens must keep verifying with the real clock


def _adapter(root: Path, *, nested: bool, cert: bool) -> None:
    root.mkdir(parents=True)
    config = {
        "base_model_name_or_path": "HuggingFaceTB/SmolLM2-135M-Instruct",
        "peft_type": "LORA",
        "task_type": "CAUSAL_LM",
        "r": 4,
        "lora_alpha": 8,
        "target_modules": ["q_proj", "v_proj"],
    }
    (root / "adapter_config.json").write_text(json.dumps(config, indent=2, sort_keys=True) + "\n")
    rng = np.random.default_rng(20261129)
    save_file(
        {
            "base_model.model.layers.0.self_attn.q_proj.lora_A.weight": rng.standard_normal((4, 96)).astype(
                "float32"
            ),
            "base_model.model.layers.0.self_attn.q_proj.lora_B.weight": rng.standard_normal((96, 4)).astype(
                "float32"
            ),
        },
        str(root / "adapter_model.safetensors"),
    )
    if cert:
        doc = {
            "schema": "tensafe.dp_certificate/v1",
            "dp_enabled": True,
            "epsilon": 7.25,
            "delta": 1e-05,
            "accountant": "prv",
            "noise_multiplier": 1.1,
            "max_grad_norm": 1.0,
            "sample_rate": 0.01,
            "steps": 500,
        }
        (root / "dp_certificate.json").write_text(json.dumps(doc, sort_keys=True) + "\n")
    if nested:
        (root / "tokenizer").mkdir()
        (root / "tokenizer" / "special_tokens_map.json").write_text('{"eos_token": "</s>"}\n')
        (root / "empty.txt").write_bytes(b"")


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--update-goldens", action="store_true", help="delete and regenerate all goldens")
    args = parser.parse_args(argv)
    targets = [
        HERE / "keys",
        HERE / "adapters",
        HERE / "v1-basic.tssp",
        HERE / "v1-multi.tssp",
        HERE / "expected.json",
    ]
    if any(t.exists() for t in targets):
        if not args.update_goldens:
            print(
                "goldens exist; pass --update-goldens to regenerate them (this changes every key)",
                file=sys.stderr,
            )
            return 1
        for t in targets:
            if t.is_dir():
                shutil.rmtree(t)
            elif t.exists():
                t.unlink()

    keys = HERE / "keys"
    keys.mkdir()
    signers = [HybridSigningKey.generate() for _ in range(2)]
    recipients = [HybridKemPrivateKey.generate() for _ in range(2)]
    for i, sk in enumerate(signers, 1):
        (keys / f"signer{i}.key").write_bytes(sk.private_bytes(passphrase=None))
        (keys / f"signer{i}.pub").write_bytes(sk.verifying_key().public_bytes())
    for i, rk in enumerate(recipients, 1):
        (keys / f"recipient{i}.key").write_bytes(rk.private_bytes(passphrase=None))
        (keys / f"recipient{i}.pub").write_bytes(rk.public_key().public_bytes())

    _adapter(HERE / "adapters" / "basic", nested=False, cert=True)
    _adapter(HERE / "adapters" / "multi", nested=True, cert=False)
    pack(
        HERE / "adapters" / "basic",
        HERE / "v1-basic.tssp",
        name="golden-basic",
        version="1.0.0",
        signing_keys=[signers[0]],
        recipients=[recipients[0].public_key()],
        expires_in=VALIDITY,
        now=CREATED,
        chunk_size=1024,
    )
    pack(
        HERE / "adapters" / "multi",
        HERE / "v1-multi.tssp",
        name="golden-multi",
        version="2.1.0-rc.1",
        signing_keys=signers,
        recipients=[r.public_key() for r in recipients],
        threshold=2,
        expires_in=VALIDITY,
        now=CREATED,
        base_model_sha256="ab" * 32,
        evidence=build_evidence(
            training_run_id="golden-run",
            config_sha256="cd" * 32,
            dataset_commitment="ef" * 32,
            audit_chain_head="01" * 32,
        ),
    )

    expected = {}
    for name, signer_files, recipient_files in [
        ("v1-basic.tssp", ["signer1.pub"], ["recipient1.key"]),
        ("v1-multi.tssp", ["signer1.pub", "signer2.pub"], ["recipient1.key", "recipient2.key"]),
    ]:
        info = inspect(HERE / name)
        expected[name] = {
            "name": info.name,
            "version": info.version,
            "header_sha256": info.header_sha256,
            "package_sha256": hashlib.sha256((HERE / name).read_bytes()).hexdigest(),
            "trust": signer_files,
            "recipients": recipient_files,
            "threshold": info.threshold,
            "files": {f.path: f.sha256 for f in info.files},
            "has_dp_certificate": info.dp_certificate is not None,
        }
    (HERE / "expected.json").write_text(json.dumps(expected, indent=2, sort_keys=True) + "\n")
    print(f"wrote goldens to {HERE}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
