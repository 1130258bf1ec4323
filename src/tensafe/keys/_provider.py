"""The interface every KEK provider implements."""

from __future__ import annotations

import abc
from typing import ClassVar

__all__ = ["KekProvider"]


class KekProvider(abc.ABC):
    """Holds the deployment's key-encryption key (KEK) and wraps DEKs under it.

    A provider is versioned: :meth:`rotate` creates a new KEK version that becomes
    current for :meth:`wrap`, while every older version stays available to
    :meth:`unwrap` so that existing wrapped DEKs keep working until they are re-wrapped.
    Wrapped blobs are opaque to callers; they are stored next to the KEK version that
    produced them.

    Implementations never expose the KEK itself and never put secrets in
    :meth:`describe`, ``repr`` or error messages.
    """

    #: Short provider name stored with every wrapped key (``local``, ``vault``, ``pkcs11``).
    name: ClassVar[str]

    @property
    @abc.abstractmethod
    def current_version(self) -> int:
        """The KEK version :meth:`wrap` uses (1 or more)."""

    @abc.abstractmethod
    def wrap(self, dek: bytes) -> tuple[int, bytes]:
        """Wrap ``dek`` under the current KEK; returns ``(kek_version, blob)``."""

    @abc.abstractmethod
    def unwrap(self, kek_version: int, blob: bytes) -> bytes:
        """Unwrap a blob made by :meth:`wrap` under KEK ``kek_version``.

        Raises:
            KeyNotFoundError: The provider has no such KEK version.
            ProviderError: The blob does not unwrap (wrong key, modified) or the
                provider failed.
        """

    @abc.abstractmethod
    def rotate(self) -> int:
        """Create a new KEK version, make it current and return its number."""

    def rewrap(self, kek_version: int, blob: bytes) -> tuple[int, bytes]:
        """Re-wrap a blob under the current KEK version; returns ``(kek_version, blob)``.

        The default unwraps and wraps again; providers that can re-wrap without
        releasing the key (Vault Transit ``rewrap``) override it.
        """
        return self.wrap(self.unwrap(kek_version, blob))

    @abc.abstractmethod
    def describe(self) -> dict[str, object]:
        """Non-secret facts for status output and logs (provider, location, versions)."""

    def close(self) -> None:  # noqa: B027 - optional hook
        """Release connections or sessions held by the provider."""

    def __repr__(self) -> str:
        return f"{type(self).__name__}({self.describe()!r})"
