"""Fixtures shared by the crypto tests."""

from __future__ import annotations

import pytest

from tensafe.crypto.kdf import Argon2idParams


@pytest.fixture(autouse=True)
def _no_pqc_env(monkeypatch: pytest.MonkeyPatch) -> None:
    """Start every test with TS_PQC_REQUIRED unset, whatever the CI environment says."""
    monkeypatch.delenv("TS_PQC_REQUIRED", raising=False)


@pytest.fixture
def fast_kdf() -> Argon2idParams:
    """The weakest accepted Argon2id parameters (19 MiB, t=2): keeps sealing tests quick."""
    return Argon2idParams.minimum()
