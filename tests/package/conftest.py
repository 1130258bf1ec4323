"""Fixtures for the TSSP tests."""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest

from package.tssp_helpers import Keys, certificate, make_adapter
from tensafe.crypto.kem import HybridKemPrivateKey
from tensafe.crypto.signing import HybridSigningKey


@pytest.fixture(scope="session")
def keys() -> Keys:
    return Keys(
        signers=tuple(HybridSigningKey.generate() for _ in range(3)),
        recipients=tuple(HybridKemPrivateKey.generate() for _ in range(3)),
    )


@pytest.fixture()
def adapter(tmp_path: Path) -> Path:
    return make_adapter(tmp_path / "adapter", certificate=certificate())


@pytest.fixture()
def packer(tmp_path: Path, keys: Keys) -> Callable[..., Path]:
    """Pack ``adapter`` (default: a fresh one) with sensible defaults; returns the package path."""
    counter = iter(range(1_000_000))

    def _pack(adapter_dir: Path | None = None, **kwargs: Any) -> Path:
        from tensafe.package import pack

        n = next(counter)
        if adapter_dir is None:
            adapter_dir = make_adapter(tmp_path / f"adapter{n}", certificate=certificate())
        out = tmp_path / f"pkg{n}.tssp"
        kwargs.setdefault("name", "demo")
        kwargs.setdefault("version", "1.0.0")
        kwargs.setdefault("signing_keys", [keys.signers[0]])
        kwargs.setdefault("recipients", [keys.recipients[0].public_key()])
        pack(adapter_dir, out, **kwargs)
        return out

    return _pack
