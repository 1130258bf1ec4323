"""Helpers for the artifact-store tests: an in-memory DEK resolver and a store factory."""

from __future__ import annotations

import os
from pathlib import Path

import pytest

from tensafe.storage import EncryptedArtifactStore, LocalFilesystemBackend


class MemoryResolver:
    """A DEK resolver holding random DEKs in a dict (stands in for tensafe.keys)."""

    def __init__(self) -> None:
        self.deks: dict[tuple[str, int], bytes] = {}
        self.current: dict[str, int] = {}

    def rotate(self, tenant: str) -> int:
        version = self.current.get(tenant, 0) + 1
        self.deks[(tenant, version)] = os.urandom(32)
        self.current[tenant] = version
        return version

    def encryption_key(self, tenant: str) -> tuple[int, bytes]:
        if tenant not in self.current:
            self.rotate(tenant)
        version = self.current[tenant]
        return version, self.deks[(tenant, version)]

    def decryption_key(self, tenant: str, dek_version: int) -> bytes:
        return self.deks[(tenant, dek_version)]


@pytest.fixture
def resolver() -> MemoryResolver:
    return MemoryResolver()


@pytest.fixture
def store(tmp_path: Path, resolver: MemoryResolver) -> EncryptedArtifactStore:
    """A store with small (1 KiB) chunks so multi-chunk cases stay small."""
    return EncryptedArtifactStore(LocalFilesystemBackend(tmp_path / "blobs"), resolver, chunk_size=1024)
