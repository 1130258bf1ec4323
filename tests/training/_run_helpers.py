"""Helpers shared by the ``tensafe train`` / ``tensafe demo`` tests: a run configuration and
an isolated deployment (its own SQLite database and development KEK under ``tmp_path``)."""

from __future__ import annotations

import pathlib
from typing import Any

import pytest
import yaml

from tensafe.training.synth import synthesize_dataset, write_jsonl

#: Variables that select or configure the deployment's keys; the tests start from none of them.
KEY_ENV = (
    "TS_ENVIRONMENT",
    "TS_KEK_PROVIDER",
    "TS_KEY_MASTER",
    "TS_LOCAL_KEK_FILE",
    "TS_DATA_DIR",
    "DATABASE_URL",
    "TS_DETERMINISTIC",
    "TS_PQC_REQUIRED",
    "TS_AUDIT_CHECKPOINT_EVERY",
)


def isolated_deployment(monkeypatch: pytest.MonkeyPatch, root: pathlib.Path) -> pathlib.Path:
    """Point ``TS_DATA_DIR`` and ``DATABASE_URL`` at a new folder ``root``; return the database file."""
    for name in KEY_ENV:
        monkeypatch.delenv(name, raising=False)
    root.mkdir(parents=True, exist_ok=True)
    database = root / "tensafe.db"
    monkeypatch.setenv("TS_DATA_DIR", str(root / "data"))
    monkeypatch.setenv("DATABASE_URL", f"sqlite:///{database}")
    return database


def write_run(tmp_path: pathlib.Path, model_dir: pathlib.Path, **overrides: Any) -> pathlib.Path:
    """Write data (200 train / 40 held-out clinical records) and a run configuration; return its path.

    ``overrides`` replace a section (``privacy={...}``) or one key of it (``privacy__delta=0.5``).
    """
    data = tmp_path / "data"
    data.mkdir(parents=True, exist_ok=True)
    if not (data / "train.jsonl").exists():
        ds = synthesize_dataset("clinical", 240, seed=3)
        write_jsonl(data / "train.jsonl", ds.records[:200])
        write_jsonl(data / "eval.jsonl", ds.records[200:])
    cfg: dict[str, Any] = {
        "model": str(model_dir),
        "output_dir": "run",
        "data": {"train": "data/train.jsonl", "eval": "data/eval.jsonl", "max_length": 160},
        "lora": {"rank": 4, "alpha": 8, "target_modules": ["q_proj", "v_proj", "down_proj"]},
        "optimizer": {"learning_rate": 0.05},
        "training": {"steps": 6, "batch_size": 20, "micro_batch_size": 8, "checkpoint_every": 2, "seed": 1},
        "privacy": {
            "enabled": True,
            "target_epsilon": 8.0,
            "delta": 1e-5,
            "clip_norm": 1.0,
            "accountant": "rdp",
        },
    }
    for key, value in overrides.items():
        section, _, field = key.partition("__")
        if field:
            cfg[section][field] = value
        else:
            cfg[section] = value
    path = tmp_path / "config.yaml"
    path.write_text(yaml.safe_dump(cfg), encoding="utf-8")
    return path
