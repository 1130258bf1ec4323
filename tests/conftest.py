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

pytest_plugins = sorted(
    f"fixtures.{p.stem}" for p in (_HERE / "fixtures").glob("*.py") if not p.name.startswith("_")
)
