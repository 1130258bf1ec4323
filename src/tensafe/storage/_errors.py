"""Exception tree of :mod:`tensafe.storage`."""

from __future__ import annotations

from tensafe.errors import TenSafeError

__all__ = ["ArtifactIntegrityError", "ArtifactNotFoundError", "StoreError"]


class StoreError(TenSafeError):
    """Root of every error raised by the artifact store and its blob backends."""


class ArtifactNotFoundError(StoreError, KeyError):
    """No artifact (or blob) exists under the requested name."""

    def __str__(self) -> str:
        # KeyError.__str__ would quote the message; keep it a plain sentence.
        return str(self.args[0]) if self.args else "artifact not found"


class ArtifactIntegrityError(StoreError):
    """The stored artifact failed authentication or is malformed.

    The message is deliberately opaque: it never says which check failed (header, chunk,
    trailer, key), so that a probing attacker learns nothing from it.
    """

    def __init__(self, message: str = "artifact failed integrity verification") -> None:
        super().__init__(message)
