"""The interface every KEK provider implements."""

from __future__ import annotations

import abc
from typing import ClassVar, Final

from tensafe.keys.errors import KeyManagementError, ProviderError, UnboundKeyError

__all__ = ["WRAPPED_KEY_BYTES", "KekProvider", "check_context", "unbound_key_error"]

#: Every key a provider wraps (tenant DEKs, sealing keys of deployment keys) is 256 bits.
WRAPPED_KEY_BYTES: Final = 32
_MAX_CONTEXT: Final = 4096


def check_context(context: bytes) -> bytes:
    """Return ``context`` as bytes if it is a usable binding context (1 to 4096 bytes).

    Raises:
        KeyManagementError: No context, or one of the wrong type or size (a programming error).
    """
    if not isinstance(context, bytes | bytearray | memoryview) or not 1 <= len(context) <= _MAX_CONTEXT:
        raise KeyManagementError(
            f"a wrapping context of 1 to {_MAX_CONTEXT} bytes is required (tensafe.keys binding)"
        )
    return bytes(context)


def unbound_key_error(provider: str) -> UnboundKeyError:
    """The error for a stored blob in the provider's legacy, unbound format."""
    return UnboundKeyError(
        f"a stored key is wrapped in the legacy {provider!r} format, which is not bound to its tenant "
        "and version (a database writer could have copied it from another row); run "
        "'tensafe keys rebind' (KeyManager.rebind_all()) once to re-wrap every legacy key in the "
        "bound format"
    )


class KekProvider(abc.ABC):
    """Holds the deployment's key-encryption key (KEK) and wraps keys under it.

    A provider is versioned: :meth:`rotate` creates a new KEK version that becomes
    current for :meth:`wrap`, while every older version stays available to
    :meth:`unwrap` so that existing wrapped keys keep working until they are re-wrapped.
    Wrapped blobs are opaque to callers; they are stored next to the KEK version that
    produced them.

    Every wrap is **bound** to a ``context`` (:mod:`tensafe.keys._binding`: purpose,
    tenant id and DEK version, or the deployment key's name and key id): :meth:`unwrap`
    with any other context fails, so a blob copied into another row of the database is
    useless. Blobs written before binding existed (the *legacy* formats) are refused by
    :meth:`unwrap` with :class:`~tensafe.keys.errors.UnboundKeyError`; only
    :meth:`rebind` reads them, and it returns a bound blob, never the key.

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
    def wrap(self, dek: bytes, *, context: bytes) -> tuple[int, bytes]:
        """Wrap ``dek`` under the current KEK, bound to ``context``; returns ``(kek_version, blob)``."""

    @abc.abstractmethod
    def unwrap(self, kek_version: int, blob: bytes, *, context: bytes) -> bytes:
        """Unwrap a blob made by :meth:`wrap` under KEK ``kek_version`` with the same ``context``.

        Raises:
            KeyNotFoundError: The provider has no such KEK version.
            UnboundKeyError: The blob is in the provider's legacy, unbound format.
            ProviderError: The blob does not unwrap (wrong key, another context,
                modified) or the provider failed.
        """

    @abc.abstractmethod
    def rotate(self) -> int:
        """Create a new KEK version, make it current and return its number."""

    def rewrap(self, kek_version: int, blob: bytes, *, context: bytes) -> tuple[int, bytes]:
        """Re-wrap a bound blob under the current KEK version, keeping its ``context``.

        The default unwraps and wraps again (the key exists in this process's memory
        only in between).

        Raises:
            UnboundKeyError: The blob is legacy; use :meth:`rebind`.
        """
        return self.wrap(self.unwrap(kek_version, blob, context=context), context=context)

    @abc.abstractmethod
    def is_legacy(self, blob: bytes) -> bool:
        """Whether ``blob`` is in this provider's legacy, unbound format (needs :meth:`rebind`)."""

    @abc.abstractmethod
    def _unwrap_legacy(self, kek_version: int, blob: bytes) -> bytes:
        """Unwrap a legacy blob (only :meth:`rebind` calls this)."""

    def rebind(self, kek_version: int, blob: bytes, *, context: bytes) -> tuple[int, bytes]:
        """Re-wrap a legacy, unbound blob under the current KEK version, bound to ``context``.

        This trusts that the legacy blob belongs to the row it was read from (nothing in
        the legacy formats can say otherwise): run it once after upgrading
        (``tensafe keys rebind``). Returns ``(kek_version, bound_blob)``, never the key.

        Raises:
            ProviderError: ``blob`` is not in the legacy format, or does not unwrap to a
                256-bit key.
        """
        if not self.is_legacy(blob):
            raise ProviderError("refusing to rebind a wrapped key that is not in the legacy format")
        key = self._unwrap_legacy(kek_version, blob)
        if len(key) != WRAPPED_KEY_BYTES:
            raise ProviderError("a legacy wrapped key does not unwrap to a 256-bit key (modified?)")
        return self.wrap(key, context=context)

    @abc.abstractmethod
    def describe(self) -> dict[str, object]:
        """Non-secret facts for status output and logs (provider, location, versions)."""

    def close(self) -> None:  # noqa: B027 - optional hook
        """Release connections or sessions held by the provider."""

    def __repr__(self) -> str:
        return f"{type(self).__name__}({self.describe()!r})"
