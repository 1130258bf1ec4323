"""Helpers for the TSSP tests: small fake-but-valid PEFT adapters and keys."""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
from safetensors.numpy import save_file

from tensafe.crypto.kem import HybridKemPrivateKey
from tensafe.crypto.signing import HybridSigningKey

BASE_MODEL = "HuggingFaceTB/SmolLM2-135M-Instruct"


def make_adapter(
    root: Path,
    *,
    rank: int = 4,
    certificate: dict[str, Any] | None = None,
    extra: dict[str, bytes] | None = None,
    seed: int = 0,
) -> Path:
    """Write a small PEFT LoRA adapter directory (config + safetensors), no model loaded."""
    root.mkdir(parents=True, exist_ok=True)
    config = {
        "base_model_name_or_path": BASE_MODEL,
        "peft_type": "LORA",
        "task_type": "CAUSAL_LM",
        "r": rank,
        "lora_alpha": 2 * rank,
        "target_modules": ["q_proj", "v_proj"],
    }
    (root / "adapter_config.json").write_text(json.dumps(config, indent=2))
    rng = np.random.default_rng(seed)
    tensors = {
        "base_model.model.layers.0.self_attn.q_proj.lora_A.weight": rng.standard_normal((rank, 64)).astype(
            "float32"
        ),
        "base_model.model.layers.0.self_attn.q_proj.lora_B.weight": np.zeros((64, rank), dtype="float32"),
    }
    save_file(tensors, str(root / "adapter_model.safetensors"))
    if certificate is not None:
        (root / "dp_certificate.json").write_text(json.dumps(certificate))
    for rel, data in (extra or {}).items():
        (root / rel).parent.mkdir(parents=True, exist_ok=True)
        (root / rel).write_bytes(data)
    return root


def certificate(epsilon: float = 7.5, delta: float = 1e-5) -> dict[str, Any]:
    """The policy-relevant members of a DP certificate in the engine's schema (v2).

    The package layer checks only the schema; the admission policy reads these members.
    """
    return {
        "schema": "tensafe.dp_certificate/v2",
        "private": True,
        "dp_enabled": True,
        "epsilon": epsilon,
        "delta": delta,
        "accountant": "prv",
        "noise_multiplier": 1.1,
        "max_grad_norm": 1.0,
        "sample_rate": 0.01,
        "steps": 100,
    }


@dataclass(frozen=True)
class Keys:
    """Signing and recipient keys for tests."""

    signers: tuple[HybridSigningKey, ...]
    recipients: tuple[HybridKemPrivateKey, ...]
