"""Frozen v1 objects: everything written by format version 1 must open and verify forever.

The golden file ``tests/vectors/crypto/tensafe_v1_golden.json`` was produced once by this
module (``python tests/crypto/test_crypto_golden.py --update``). Never regenerate it for an
existing format version: a failing golden test means a compatibility break. Add a new file
for a new version instead.
"""

from __future__ import annotations

import base64
import io
import json
import os
import pathlib
import sys
from typing import Any

import pytest
from dilithium_py.ml_dsa import ML_DSA_65

from tensafe.crypto import InvalidSignature
from tensafe.crypto.aead import open_sealed, seal
from tensafe.crypto.kdf import Argon2idParams
from tensafe.crypto.kem import HybridKemPrivateKey, HybridKemPublicKey
from tensafe.crypto.keywrap import unwrap_key, wrap_key
from tensafe.crypto.signing import HybridSigningKey, HybridVerifyingKey
from tensafe.crypto.stream import decrypt_stream, encrypt_stream

GOLDEN = pathlib.Path(__file__).resolve().parent.parent / "vectors" / "crypto" / "tensafe_v1_golden.json"
PASSPHRASE = b"tensafe golden passphrase"


def _generate() -> dict[str, Any]:
    sk = HybridSigningKey.generate()
    kem = HybridKemPrivateKey.generate()
    ss, enc = kem.public_key().encapsulate()
    key, kek, dek = os.urandom(32), os.urandom(32), os.urandom(32)
    message, context = b"tensafe golden message", "tensafe/golden/v1"
    pt = bytes(range(256)) * 10  # 2560 bytes: two full 1 KiB chunks and a partial one
    out = io.BytesIO()
    encrypt_stream(key, io.BytesIO(pt), out, associated_data=b"tensafe/golden-stream", chunk_size=1024)
    minimum = Argon2idParams.minimum()
    return {
        "note": "Frozen TenSafe crypto format v1 objects. Never regenerate; see test_crypto_golden.py.",
        "signing": {
            "private": sk.private_bytes(passphrase=None).decode(),
            "private_sealed": sk.private_bytes(passphrase=PASSPHRASE, kdf_params=minimum).decode(),
            "passphrase": PASSPHRASE.decode(),
            "public": sk.verifying_key().public_bytes().decode(),
            "key_id": sk.key_id,
            "message_hex": message.hex(),
            "context": context,
            "signature_b64": base64.b64encode(sk.sign(message, context=context)).decode(),
        },
        "kem": {
            "private": kem.private_bytes(passphrase=None).decode(),
            "private_sealed": kem.private_bytes(passphrase=PASSPHRASE, kdf_params=minimum).decode(),
            "public": kem.public_key().public_bytes().decode(),
            "key_id": kem.key_id,
            "encapsulation_b64": base64.b64encode(enc).decode(),
            "shared_secret_hex": ss.hex(),
        },
        "aead": {
            "key_hex": key.hex(),
            "label": "tensafe/golden/v1",
            "associated_data_hex": b"record-7".hex(),
            "plaintext_hex": b"golden plaintext".hex(),
            "envelope_b64": base64.b64encode(
                seal(key, b"golden plaintext", label="tensafe/golden/v1", associated_data=b"record-7")
            ).decode(),
        },
        "keywrap": {
            "kek_hex": kek.hex(),
            "key_hex": dek.hex(),
            "wrapped_b64": base64.b64encode(wrap_key(kek, dek)).decode(),
        },
        "stream": {
            "key_hex": key.hex(),
            "associated_data_hex": b"tensafe/golden-stream".hex(),
            "plaintext_hex": pt.hex(),
            "ciphertext_b64": base64.b64encode(out.getvalue()).decode(),
        },
    }


@pytest.fixture(scope="module")
def golden() -> dict[str, Any]:
    return json.loads(GOLDEN.read_text())  # type: ignore[no-any-return]


def test_signing_v1(golden: dict[str, Any]) -> None:
    g = golden["signing"]
    msg, sig = bytes.fromhex(g["message_hex"]), base64.b64decode(g["signature_b64"])
    vk = HybridVerifyingKey.from_public_bytes(g["public"].encode())
    assert vk.key_id == g["key_id"]
    vk.verify(sig, msg, context=g["context"])
    with pytest.raises(InvalidSignature):
        vk.verify(sig, msg + b"!", context=g["context"])
    sk = HybridSigningKey.from_private_bytes(g["private"].encode(), passphrase=None)
    sealed = HybridSigningKey.from_private_bytes(
        g["private_sealed"].encode(), passphrase=g["passphrase"].encode()
    )
    assert sk.verifying_key() == sealed.verifying_key() == vk
    # Independent check of the ML-DSA-65 half (dilithium-py), from the frozen bytes alone.
    ctx = g["context"].encode()
    m_prime = b"tensafe/sig/v1" + bytes([0x10, len(ctx)]) + ctx + msg
    ml_pub = base64.b64decode("".join(g["public"].strip().split("\n")[4:-1]))[34:]
    assert ML_DSA_65.verify(ml_pub, m_prime, sig[66:], ctx=b"tensafe/sig/v1")


def test_kem_v1(golden: dict[str, Any]) -> None:
    g = golden["kem"]
    enc, ss = base64.b64decode(g["encapsulation_b64"]), bytes.fromhex(g["shared_secret_hex"])
    sk = HybridKemPrivateKey.from_private_bytes(g["private"].encode(), passphrase=None)
    assert sk.decapsulate(enc) == ss
    sealed = HybridKemPrivateKey.from_private_bytes(g["private_sealed"].encode(), passphrase=PASSPHRASE)
    assert sealed.decapsulate(enc) == ss
    pk = HybridKemPublicKey.from_public_bytes(g["public"].encode())
    assert pk == sk.public_key() and pk.key_id == g["key_id"]


def test_symmetric_v1(golden: dict[str, Any]) -> None:
    a = golden["aead"]
    assert open_sealed(
        bytes.fromhex(a["key_hex"]),
        base64.b64decode(a["envelope_b64"]),
        label=a["label"],
        associated_data=bytes.fromhex(a["associated_data_hex"]),
    ) == bytes.fromhex(a["plaintext_hex"])
    w = golden["keywrap"]
    assert unwrap_key(bytes.fromhex(w["kek_hex"]), base64.b64decode(w["wrapped_b64"])) == bytes.fromhex(
        w["key_hex"]
    )
    s = golden["stream"]
    out = io.BytesIO()
    decrypt_stream(
        bytes.fromhex(s["key_hex"]),
        io.BytesIO(base64.b64decode(s["ciphertext_b64"])),
        out,
        associated_data=bytes.fromhex(s["associated_data_hex"]),
    )
    assert out.getvalue() == bytes.fromhex(s["plaintext_hex"])


if __name__ == "__main__":
    if sys.argv[1:] != ["--update"]:
        sys.exit("usage: python tests/crypto/test_crypto_golden.py --update  (only for a NEW format version)")
    if GOLDEN.exists():
        sys.exit(f"{GOLDEN} exists: golden files of a released format version are never regenerated")
    GOLDEN.write_text(json.dumps(_generate(), indent=2) + "\n")
    print(f"wrote {GOLDEN}")
