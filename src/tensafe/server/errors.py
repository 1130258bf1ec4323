"""Errors of the training API server, each mapped to one HTTP status, and their JSON body.

Every error the server answers is a JSON body (:class:`tensafe.protocol.ApiError`), built
by :func:`error_body`; a user error is never a 5xx (the SDK would retry it for minutes) and
never a bare 400. Every server error class lives in this module; a subclass declares its
status and its machine-readable name in its class line::

    class PublishRefusedError(BadRequestError, error="publish_refused"): ...

:func:`install_error_handlers` installs the application's one set of exception handlers
(server errors, request validation, Starlette's 404/405, anything unexpected as a 500 that
names only the exception's type).
"""

from __future__ import annotations

import logging
from typing import Any, Literal

from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse
from starlette.exceptions import HTTPException as StarletteHTTPException

from tensafe.errors import ConfigurationError, TenSafeError
from tensafe.protocol import ApiError

__all__ = [
    "AuthenticationError",
    "BadRequestError",
    "Category",
    "IllegalTransitionError",
    "JobFailedError",
    "LedgerIntegrityError",
    "NotFoundError",
    "PayloadTooLargeError",
    "PrivacyUnavailableError",
    "PublishRefusedError",
    "ResultExpiredError",
    "ServerConfigurationError",
    "ServerError",
    "TenantAdminError",
    "UnregisteredEventError",
    "error_body",
    "install_error_handlers",
]

_log = logging.getLogger("tensafe.server")

#: Who is at fault when a request fails: bad input, the server, or not known.
Category = Literal["user", "server", "unknown"]


class ServerError(TenSafeError):
    """Root of the server's errors.

    A subclass names its HTTP status and body ``error`` in its class line
    (``class E(ServerError, status=400, error="bad_request")``); either may be left out
    to inherit the parent's.
    """

    #: HTTP status answered for this error.
    status_code: int = 500
    #: Short machine-readable name in the JSON body.
    error: str = "server_error"

    def __init_subclass__(cls, *, status: int | None = None, error: str | None = None, **kwargs: Any) -> None:
        """Set the subclass's ``status_code`` and ``error`` from its class keywords."""
        super().__init_subclass__(**kwargs)
        if status is not None:
            cls.status_code = status
        if error is not None:
            cls.error = error


class BadRequestError(ServerError, status=400, error="bad_request"):
    """The request is well-formed JSON but not acceptable (HTTP 400)."""


class AuthenticationError(ServerError, status=401, error="unauthenticated"):
    """The API key is missing, unknown, revoked or expired (HTTP 401)."""


class NotFoundError(ServerError, status=404, error="not_found"):
    """The resource does not exist *for this tenant* (HTTP 404; existence never leaks)."""


class TenantAdminError(ServerError, status=400, error="admin_error"):
    """An administrative operation on tenants or keys failed (unknown tenant, duplicate name)."""


class ServerConfigurationError(ServerError, ConfigurationError):
    """The server's configuration is missing or invalid."""

    exit_code = 2


class PayloadTooLargeError(ServerError, status=413, error="payload_too_large"):
    """The request body is larger than :data:`tensafe.server.limits.MAX_BODY_BYTES` (HTTP 413)."""


class ResultExpiredError(ServerError, status=410, error="result_expired"):
    """The future finished, but its result was deleted by the retention sweep (HTTP 410)."""


class PublishRefusedError(BadRequestError, error="publish_refused"):
    """Publishing is refused by TenSafe's privacy rule (HTTP 400, never retried)."""


class LedgerIntegrityError(ServerError, status=500, error="ledger_integrity_error"):
    """The privacy ledger disagrees with the audit log (modified in the database): nothing is certified."""


class PrivacyUnavailableError(NotFoundError, error="privacy_unavailable"):
    """The server does not record privacy state for this run (yet)."""


class IllegalTransitionError(ServerError, status=500, error="illegal_transition"):
    """A future or a training model was asked to move to a state its table forbids (a server bug)."""


class UnregisteredEventError(ServerError, status=500, error="unregistered_event"):
    """An audit action that is not in :data:`tensafe.server.events.SERVER_EVENTS` (a server bug)."""


class JobFailedError(ServerError):
    """Raised by a job handler: the future fails with ``message`` and ``category``."""

    def __init__(self, message: str, *, category: Category = "user") -> None:
        """Create the error (``category`` is ``user`` for bad input, ``server`` for our faults)."""
        super().__init__(message)
        self.category: Category = category


def error_body(
    error: str, detail: str, *, category: Category = "user", errors: list[dict[str, Any]] | None = None
) -> dict[str, Any]:
    """The JSON body of an error answer (:class:`tensafe.protocol.ApiError`)."""
    return ApiError(error=error, detail=detail, category=category, errors=errors).model_dump(
        exclude_none=True
    )


async def _validation_error(_request: Request, exc: Exception) -> JSONResponse:
    assert isinstance(exc, RequestValidationError)
    errors = [
        {
            "loc": [str(x) for x in e.get("loc", ())],
            "msg": str(e.get("msg", "")),
            "type": str(e.get("type", "")),
        }
        for e in exc.errors()
    ][:50]
    if any(e["type"] == "json_invalid" for e in errors):
        return JSONResponse(
            error_body("invalid_json", "the request body is not valid JSON", errors=errors), 400
        )
    return JSONResponse(
        error_body("invalid_request", "the request does not match the API schema", errors=errors), 422
    )


async def _server_error(_request: Request, exc: Exception) -> JSONResponse:
    assert isinstance(exc, ServerError)
    return JSONResponse(error_body(exc.error, str(exc)), exc.status_code)


async def _http_error(_request: Request, exc: Exception) -> JSONResponse:
    assert isinstance(exc, StarletteHTTPException)
    name = {404: "not_found", 405: "method_not_allowed"}.get(exc.status_code, "http_error")
    detail = "no such endpoint on this server" if exc.status_code == 404 else str(exc.detail)
    return JSONResponse(error_body(name, detail), exc.status_code, headers=getattr(exc, "headers", None))


async def _internal_error(_request: Request, exc: Exception) -> JSONResponse:
    _log.exception("unhandled error", exc_info=exc)
    return JSONResponse(
        error_body("internal_error", f"internal server error ({type(exc).__name__})", category="server"), 500
    )


def install_error_handlers(app: FastAPI) -> None:
    """Answer every error of ``app`` with an :class:`~tensafe.protocol.ApiError` JSON body."""
    app.add_exception_handler(ServerError, _server_error)
    app.add_exception_handler(RequestValidationError, _validation_error)
    app.add_exception_handler(StarletteHTTPException, _http_error)
    app.add_exception_handler(Exception, _internal_error)
