"""The serving domain's exception tree.

Every error a serving component raises derives from :class:`ServingError`; the OpenAI-compatible
API maps each class to one HTTP status and one OpenAI error ``type`` (see ``docs/serving.md``).
"""

from __future__ import annotations

from tensafe.errors import TenSafeError

__all__ = [
    "AdapterRefusedError",
    "AdapterUnavailableError",
    "EngineUnavailableError",
    "InvalidGenerationRequestError",
    "ModelNotFoundError",
    "ServingError",
    "ServingOverloadedError",
    "UnauthenticatedError",
]


class ServingError(TenSafeError):
    """Base class of the serving domain's errors."""


class InvalidGenerationRequestError(ServingError):
    """The request is malformed or asks for something the engine cannot do (HTTP 400).

    ``param`` names the offending request field, when there is one; ``code`` is OpenAI's error
    code when it has one (``context_length_exceeded``, ``invalid_json``).
    """

    def __init__(self, message: str, *, param: str | None = None, code: str | None = None) -> None:
        """Record ``message``, the offending ``param`` and the error ``code``."""
        super().__init__(message)
        self.param = param
        self.code = code


class ModelNotFoundError(ServingError):
    """No model or adapter of that name is visible to the caller (HTTP 404).

    Another tenant's adapter is reported exactly as an unknown one.
    """


class AdapterUnavailableError(ModelNotFoundError):
    """The caller's own adapter may no longer be served: its package expired or was revoked (HTTP 404).

    A source raises it only to the adapter's owner, so its message (which says why, and what
    to do) is shown as is, unlike the one answer of :class:`ModelNotFoundError`.
    """


class AdapterRefusedError(ServingError):
    """An adapter source (package, checkpoint) failed verification, policy or decryption."""


class UnauthenticatedError(ServingError):
    """The API key is missing, unknown, revoked or expired (HTTP 401)."""


class ServingOverloadedError(ServingError):
    """Too many requests are queued or running; retry later (HTTP 429)."""


class EngineUnavailableError(ServingError):
    """The inference engine is not installed, failed to start or died (HTTP 503 / CLI exit 1)."""
