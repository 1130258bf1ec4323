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
    "ShredIncompleteError",
    "TenantShreddedError",
    "UnboundKeyError",
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


class UnboundKeyError(KeyManagementError):
    """A stored wrapped key is in a legacy format that is not bound to its row.

    Such a blob could have been copied from another tenant's row or another DEK
    version's row by anyone with write access to the database, so it is refused until
    ``tensafe keys rebind`` (:meth:`tensafe.keys.KeyManager.rebind_all`) re-wraps it in
    the bound format.
    """


class ShredIncompleteError(KeyManagementError):
    """A tenant's keys were destroyed logically, but their bytes may remain in the database files.

    The shred committed (the tenant is deleted and every read is refused), but the
    database could not yet purge the erased wrapped keys from its files (a reader held
    an old snapshot). Run ``tensafe keys shred --finish``
    (:meth:`tensafe.keys.KeyManager.finish_shred`) once the readers have closed.
    """

    exit_code = 3

    def __init__(self, message: str, *, tenant: str | None = None, destroyed: int = 0) -> None:
        super().__init__(message)
        self.tenant = tenant
        self.destroyed = destroyed

    def __reduce__(self) -> tuple[object, ...]:
        return (_rebuild_shred_incomplete, (str(self), self.tenant, self.destroyed))


def _rebuild_shred_incomplete(message: str, tenant: str | None, destroyed: int) -> ShredIncompleteError:
    return ShredIncompleteError(message, tenant=tenant, destroyed=destroyed)
