"""Fixtures of the CLI tests."""

from __future__ import annotations

import os
from pathlib import Path

import pytest
from cli_helpers import TENSAFE_PREFIXES


@pytest.fixture
def isolated(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> Path:
    """Run in ``tmp_path`` with no TenSafe settings in the environment; returns ``tmp_path``."""
    for name in list(os.environ):
        if name.startswith(TENSAFE_PREFIXES):
            monkeypatch.delenv(name)
    monkeypatch.setenv("TS_DATA_DIR", str(tmp_path / "data"))
    monkeypatch.chdir(tmp_path)
    return tmp_path
