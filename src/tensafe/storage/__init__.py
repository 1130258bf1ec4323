"""Encrypted artifact storage (layer 2).

Blob backends hold only ciphertext; :class:`EncryptedArtifactStore` encrypts each
artifact under a key derived from its tenant's DEK, which a :class:`DekResolver` (the
key manager in :mod:`tensafe.keys`) supplies. This package never imports
:mod:`tensafe.keys`.

Example:
    >>> import io, os, tempfile
    >>> class Keys:
    ...     dek = os.urandom(32)
    ...     def encryption_key(self, tenant): return 1, self.dek
    ...     def decryption_key(self, tenant, dek_version): return self.dek
    >>> store = EncryptedArtifactStore(LocalFilesystemBackend(tempfile.mkdtemp()), Keys())
    >>> info = store.put("acme", "adapter-1", io.BytesIO(b"weights"), kind="adapter")
    >>> store.get_bytes("acme", "adapter-1")
    b'weights'
"""

from __future__ import annotations

from tensafe.storage._backend import BlobBackend, LocalFilesystemBackend
from tensafe.storage._errors import ArtifactIntegrityError, ArtifactNotFoundError, StoreError
from tensafe.storage._format import FORMAT_VERSION
from tensafe.storage._store import ArtifactInfo, DekResolver, EncryptedArtifactStore

__all__ = [
    "FORMAT_VERSION",
    "ArtifactInfo",
    "ArtifactIntegrityError",
    "ArtifactNotFoundError",
    "BlobBackend",
    "DekResolver",
    "EncryptedArtifactStore",
    "LocalFilesystemBackend",
    "StoreError",
]
