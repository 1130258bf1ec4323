"""Exceptions of the TenSafe SDK: one tree, every class picklable.

::

    TensafeClientError (tensafe.errors.TenSafeError)
    ├── ClientConfigurationError        missing or malformed API key / base URL
    ├── RequestFailedError              a future failed on the server (message, category)
    └── APIError
        ├── APIConnectionError          network failure (after retries)
        │   └── APITimeoutError
        ├── APIResponseValidationError  the server's JSON has the wrong shape
        ├── CrossOriginRedirectError    a redirect (or URL) to another origin: the key is not sent
        └── APIStatusError              an HTTP error answer (status_code, body)
            ├── BadRequestError (400), AuthenticationError (401),
            ├── PermissionDeniedError (403), NotFoundError (404), ConflictError (409),
            ├── GoneError (410), RequestTooLargeError (413),
            ├── UnprocessableEntityError (422), RateLimitError (429)
            └── InternalServerError (>= 500)
"""

from __future__ import annotations

from typing import Any, Literal

from tensafe.errors import TenSafeError

__all__ = [
    "APIConnectionError",
    "APIError",
    "APIResponseValidationError",
    "APIStatusError",
    "APITimeoutError",
    "AuthenticationError",
    "BadRequestError",
    "ClientConfigurationError",
    "ConflictError",
    "CrossOriginRedirectError",
    "GoneError",
    "InternalServerError",
    "NotFoundError",
    "PermissionDeniedError",
    "RateLimitError",
    "RequestFailedError",
    "RequestTooLargeError",
    "TensafeClientError",
    "UnprocessableEntityError",
    "status_error",
]

Category = Literal["user", "server", "unknown"]


class TensafeClientError(TenSafeError):
    """Root of every error the TenSafe SDK raises."""

    def __reduce__(self) -> tuple[Any, ...]:
        return (type(self), self.args)


class ClientConfigurationError(TensafeClientError):
    """The client is misconfigured (no API key, a key without the ``tml-`` prefix, ...)."""


class RequestFailedError(TensafeClientError):
    """A future failed on the server.

    Attributes:
        message: The server's message.
        request_id: The future's id.
        category: ``user`` (fix the request), ``server`` (retry later) or ``unknown``.
    """

    def __init__(self, message: str, *, request_id: str = "", category: Category = "unknown") -> None:
        """Create the error from the server's failure report."""
        super().__init__(f"request {request_id} failed ({category} error): {message}")
        self.message = message
        self.request_id = request_id
        self.category: Category = category

    def __reduce__(self) -> tuple[Any, ...]:
        return (_rebuild_failed, (self.message, self.request_id, self.category))


def _rebuild_failed(message: str, request_id: str, category: Category) -> RequestFailedError:
    return RequestFailedError(message, request_id=request_id, category=category)


class APIError(TensafeClientError):
    """An HTTP exchange with the server went wrong."""


class APIConnectionError(APIError):
    """The server could not be reached (after the retries)."""


class APITimeoutError(APIConnectionError):
    """The server did not answer in time (after the retries)."""


class APIResponseValidationError(APIError):
    """The server answered with JSON that does not match the expected model."""


class CrossOriginRedirectError(APIError):
    """The SDK refused to send the API key to an origin other than ``base_url``'s.

    Raised when the server answers with a redirect to another scheme, host or port (a
    misconfigured proxy, or someone on the network path of plain HTTP), before anything
    is sent there. Redirects within the origin of ``base_url`` are followed. Never
    retried: fix ``base_url`` (e.g. the ``https://`` URL the server redirects to).

    Attributes:
        origin: ``scheme://host:port`` of ``base_url``.
        target: ``scheme://host:port`` the request would have gone to (no path or query).
    """

    def __init__(self, message: str, *, origin: str = "", target: str = "") -> None:
        """Create the error; ``origin`` and ``target`` are origins, never full URLs."""
        super().__init__(message)
        self.origin = origin
        self.target = target

    def __reduce__(self) -> tuple[Any, ...]:
        return (_rebuild_cross_origin, (str(self), self.origin, self.target))


def _rebuild_cross_origin(message: str, origin: str, target: str) -> CrossOriginRedirectError:
    return CrossOriginRedirectError(message, origin=origin, target=target)


class APIStatusError(APIError):
    """The server answered with an HTTP error status.

    Attributes:
        status_code: The HTTP status.
        body: The parsed JSON body (or the raw text).
        error: The server's error code (``not_found``, ``invalid_request``, ...).
        detail: The server's one-sentence explanation.
        category: ``user``, ``server`` or ``unknown``.
    """

    status_code: int = 0

    def __init__(self, message: str, *, status_code: int | None = None, body: Any = None) -> None:
        """Create the error from an HTTP answer."""
        super().__init__(message)
        if status_code is not None:
            self.status_code = status_code
        self.body = body
        fields = body if isinstance(body, dict) else {}
        self.error: str = str(fields.get("error", ""))
        self.detail: str = str(fields.get("detail", ""))
        self.category: str = str(fields.get("category", "unknown"))

    def __reduce__(self) -> tuple[Any, ...]:
        return (_rebuild_status, (type(self), str(self), self.status_code, self.body))


def _rebuild_status(cls: type[APIStatusError], message: str, status_code: int, body: Any) -> APIStatusError:
    return cls(message, status_code=status_code, body=body)


class BadRequestError(APIStatusError):
    """HTTP 400: the request is malformed or not allowed."""

    status_code = 400


class AuthenticationError(APIStatusError):
    """HTTP 401: the API key is missing, unknown, revoked or expired."""

    status_code = 401


class PermissionDeniedError(APIStatusError):
    """HTTP 403."""

    status_code = 403


class NotFoundError(APIStatusError):
    """HTTP 404: no such resource, or it belongs to another tenant."""

    status_code = 404


class ConflictError(APIStatusError):
    """HTTP 409."""

    status_code = 409


class GoneError(APIStatusError):
    """HTTP 410: the session has finished."""

    status_code = 410


class RequestTooLargeError(APIStatusError):
    """HTTP 413: the request body is larger than the server accepts."""

    status_code = 413


class UnprocessableEntityError(APIStatusError):
    """HTTP 422: a field is unknown, of the wrong type or out of range."""

    status_code = 422


class RateLimitError(APIStatusError):
    """HTTP 429."""

    status_code = 429


class InternalServerError(APIStatusError):
    """HTTP 5xx (after the retries)."""

    status_code = 500


_BY_STATUS: dict[int, type[APIStatusError]] = {
    cls.status_code: cls
    for cls in (
        BadRequestError,
        AuthenticationError,
        PermissionDeniedError,
        NotFoundError,
        ConflictError,
        GoneError,
        RequestTooLargeError,
        UnprocessableEntityError,
        RateLimitError,
    )
}


def status_error(status_code: int, body: Any) -> APIStatusError:
    """Return the exception for an HTTP error answer (the message names status and detail)."""
    cls = InternalServerError if status_code >= 500 else _BY_STATUS.get(status_code, APIStatusError)
    if isinstance(body, dict) and "detail" in body:
        text = f"{body.get('error', 'error')}: {body['detail']}"
    else:
        text = str(body)[:500]
    return cls(f"HTTP {status_code}: {text}", status_code=status_code, body=body)
