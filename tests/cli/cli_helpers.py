"""Helpers for the CLI tests: the ``tensafe`` command line and a clean environment."""

from __future__ import annotations

import os
import sys
from pathlib import Path

__all__ = ["TENSAFE_PREFIXES", "clean_env", "tensafe_argv"]

#: Variables of the caller's environment that would change what a command does.
TENSAFE_PREFIXES = ("TS_", "TENSAFE_", "DATABASE_URL", "SSL_CERT_")


def tensafe_argv(*argv: str) -> list[str]:
    """The command line of ``tensafe ARGV...`` with this interpreter (the venv's)."""
    return [sys.executable, "-m", "tensafe.cli.main", *argv]


def clean_env(tmp_path: Path, **extra: str) -> dict[str, str]:
    """``os.environ`` without TenSafe's settings, a data dir under ``tmp_path``, plus ``extra``."""
    env = {k: v for k, v in os.environ.items() if not k.startswith(TENSAFE_PREFIXES)}
    env["TS_DATA_DIR"] = str(tmp_path / "data")
    env.update(extra)
    return env
