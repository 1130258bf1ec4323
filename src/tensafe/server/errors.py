"""Errors of the training API server, each mapped to one HTTP status.

Every error the server answers is a JSON body (:class:`tensafe.protocol.ApiError`); a
user error is never a 5xx (the SDK would retry it for minutes) and never a bare 400.
"""

from __future__ import annotations

from tensafe.errors import ConfigurationError, TenSafeError

__all__ = [
    "AuthenticationError",
    "BadRequestError",
    "NotFoundError",
    "ServerConfigurationError",
    "ServerError",
    "TenantAdminError",
]


class ServerError(TenSafeError):
    """Root of the server's errors."""

    #: HTTP status answered for this error.
    status_code: int = 500
    #: Short machine-readable name in the JSON body.
    error: str = "server_error"


class BadRequestError(ServerError):
    """The request is well-formed JSON but not acceptable (HTTP 400)."""

    status_code = 400
    error = "bad_request"


class AuthenticationError(ServerError):
    """The API key is missing, unknown, revoked or expired (HTTP 401)."""

    status_code = 401
    error = "unauthenticated"


class NotFoundError(ServerError):
    """The resource does not exist *for this tenant* (HTTP 404; existence never leaks)."""

    status_code = 404
    error = "not_found"


class TenantAdminError(ServerError):
    """An administrative operation on tenants or keys failed (unknown tenant, duplicate name)."""

    status_code = 400
    error = "admin_error"


class ServerConfigurationError(ServerError, ConfigurationError):
    """The server's configuration is missing or invalid."""

    exit_code = 2
