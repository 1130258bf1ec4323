"""Key custody (layer 3): a deployment KEK held by a provider, per-tenant DEKs under it.

* :class:`KekProvider` is the interface; :class:`LocalKekProvider` (development),
  :class:`VaultTransitKekProvider` (Vault/OpenBao Transit) and :class:`Pkcs11KekProvider`
  (an HSM through PKCS#11) implement it. Every wrapped key is bound to its row
  (:func:`dek_context`, :func:`deployment_key_context`): a blob copied to another row
  does not unwrap.
* :class:`KeyManager` creates, wraps, rotates and shreds tenant DEKs (stored wrapped in
  the ``tenant_deks`` table), keeps the sealed deployment signing key, and serves DEKs
  to :class:`tensafe.storage.EncryptedArtifactStore`. Every key change is recorded in
  the audit log in the same transaction (:data:`KEY_EVENTS`; deployment-wide events go
  to the reserved tenant :data:`DEPLOYMENT_TENANT`), covered by signed checkpoints.

Configuration, rotation, providers and the threat model: ``docs/security/keys.md``.
"""

from __future__ import annotations

from tensafe.keys._audit import DEPLOYMENT_TENANT, KEY_EVENTS, KeyEventSpec
from tensafe.keys._binding import BINDING_LABEL, dek_context, deployment_key_context
from tensafe.keys._config import KeySettings, check_passphrase, open_provider
from tensafe.keys._local import LocalKekProvider
from tensafe.keys._manager import DekInfo, KekRotation, KeyManager
from tensafe.keys._pkcs11 import Pkcs11KekProvider
from tensafe.keys._provider import KekProvider
from tensafe.keys._vault import VaultTransitKekProvider
from tensafe.keys.errors import (
    KeyConfigurationError,
    KeyManagementError,
    KeyNotFoundError,
    ProviderError,
    ShredIncompleteError,
    TenantShreddedError,
    UnboundKeyError,
)

__all__ = [
    "BINDING_LABEL",
    "DEPLOYMENT_TENANT",
    "KEY_EVENTS",
    "DekInfo",
    "KekProvider",
    "KekRotation",
    "KeyConfigurationError",
    "KeyEventSpec",
    "KeyManagementError",
    "KeyManager",
    "KeyNotFoundError",
    "KeySettings",
    "LocalKekProvider",
    "Pkcs11KekProvider",
    "ProviderError",
    "ShredIncompleteError",
    "TenantShreddedError",
    "UnboundKeyError",
    "VaultTransitKekProvider",
    "check_passphrase",
    "dek_context",
    "deployment_key_context",
    "open_provider",
]
