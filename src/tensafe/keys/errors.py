"""Exception tree of :mod:`tensafe.keys`.

Messages never contain key material, passphrases, PINs or tokens.
"""

from __future__ import annotations

from tensafe.errors import ConfigurationError, TenSafeError

__all__ = [
    "KeyConfigurationError",
    "KeyManagementError",
    "KeyNotFoundError",
    "ProviderError",
    "TenantShreddedError",
]


class KeyManagementError(TenSafeError):
    """Root of every error raised by key management."""


class KeyConfigurationError(KeyManagementError, ConfigurationError):
    """Key management is missing configuration or configured too weakly for the environment."""

    exit_code = 2


class KeyNotFoundError(KeyManagementError, KeyError):
    """A requested key (KEK version, tenant DEK version, deployment key) does not exist."""

    def __str__(self) -> str:
        return str(self.args[0]) if self.args else "key not found"


class TenantShreddedError(KeyManagementError):
    """The tenant's keys were destroyed (crypto-shredding); its data can no longer be decrypted."""


class ProviderError(KeyManagementError):
    """The KEK provider (local file, Vault/OpenBao, HSM) failed or refused an operation."""
