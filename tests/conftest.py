"""Shared pytest configuration.

Fixtures for real services (PostgreSQL, OpenBao, SoftHSM2, ...) live one module per
service in ``tests/fixtures/`` and are loaded here as plugins.
"""

from __future__ import annotations

import os
import pathlib
import sys

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

_HERE = pathlib.Path(__file__).parent
sys.path.insert(0, str(_HERE))
# Test folders keep small helper modules (e.g. tests/audit/audit_helpers.py) imported by bare
# name; with --import-mode=importlib their folders must be on sys.path explicitly.
for _sub in sorted(p for p in _HERE.iterdir() if p.is_dir() and not p.name.startswith((".", "_"))):
    if _sub.name not in ("fixtures", "vectors"):
        sys.path.append(str(_sub))

pytest_plugins = sorted(
    f"fixtures.{p.stem}" for p in (_HERE / "fixtures").glob("*.py") if not p.name.startswith("_")
)
