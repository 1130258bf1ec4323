"""Request guard: the API key is checked before the body is read, and bodies are limited as they stream.

:class:`RequestGuard` is a pure ASGI middleware in front of every route. For each HTTP
request it does three things, in this order:

1. **It checks the headers and reads nothing.** A malformed ``Content-Length`` gets a
   400 ``bad_request``. A ``Content-Length`` above :data:`MAX_BODY_BYTES` gets a 413
   ``payload_too_large``.
2. **It authenticates before the body is read.** Every route outside
   :data:`PUBLIC_ROUTES` requires an API key. Those public routes are the probes, the
   OpenAPI schema and UI, and ``GET /api/v1/downloads/{token}``, where the token itself
   is the capability. The guard checks the single ``X-API-Key`` header with
   :func:`tensafe.server.tenants.authenticate`, a read-only transaction that runs in a
   worker thread so the event loop never waits on the database. A failure gets a 401
   ``unauthenticated`` before the application sees the request, so not one byte of the
   body is read, and a client that sent ``Expect: 100-continue`` is never told to send
   it. On success the guard stores the caller in ``scope["state"]``, where
   :func:`principal_of` finds it; the ``Caller`` dependency reuses it, so each request is
   authenticated once. Under :data:`OPENAI_PREFIX` (the OpenAI-compatible API) the key may
   also come as ``Authorization: Bearer <key>``, as the ``openai`` SDK sends it, and every
   refusal has OpenAI's error shape instead of the training API's.
3. **It counts the body as it arrives.** Each ``http.request`` message the application
   receives is counted, whether the body is chunked or has a ``Content-Length``. The
   message that takes the total above the limit is not delivered: the application's
   read fails with :class:`PayloadTooLargeError`. Whatever the application then answers
   (FastAPI turns a failed body read into a 400) is replaced by the guard's 413. The
   application never receives more than :data:`MAX_BODY_BYTES`; the server has read at
   most that plus one message (one read from the socket).

Every refusal from the guard carries ``Connection: close``. The rest of the body is left
unread, and the HTTP server closes the connection instead of draining the remaining
bytes to reuse it.

Starlette has its own ``RequestBodyLimitMiddleware``, but it is not used here. It answers
in plain text rather than the API's JSON error body. It keeps the connection open, so
uvicorn drains and discards the rest of the body. And it sits outside any
authentication, which would leave the order "key first, body second" to a second
middleware.
"""

from __future__ import annotations

import logging
import re
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import anyio.to_thread
from starlette.responses import JSONResponse
from starlette.types import ASGIApp, Message, Receive, Scope, Send

from tensafe import protocol as p
from tensafe.protocol.openai import error_body as openai_error_body
from tensafe.server.errors import AuthenticationError, BadRequestError, ServerError
from tensafe.server.tenants import Principal

__all__ = [
    "API_KEY_HEADER",
    "MAX_BODY_BYTES",
    "OPENAI_PREFIX",
    "PUBLIC_ROUTES",
    "PayloadTooLargeError",
    "RequestGuard",
    "is_public",
    "principal_of",
]

_log = logging.getLogger("tensafe.server.limits")

#: The largest request body accepted, in bytes (64 MiB), whether chunked or with a
#: ``Content-Length``. A larger body gets a 413 ``payload_too_large``.
MAX_BODY_BYTES = 64 * 1024 * 1024

#: The header that carries the API key.
API_KEY_HEADER = "X-API-Key"

#: Requests under this path prefix (the OpenAI-compatible API, ``/oai/api/v1``) may send the key
#: as ``Authorization: Bearer <key>`` (what the ``openai`` SDK sends), and the guard's refusals
#: there have OpenAI's error shape (``{"error": {"message", "type", "param", "code"}}``).
OPENAI_PREFIX = "/oai/"

#: The only routes that answer without an API key, and only for ``GET`` and ``HEAD``.
#: ``{token}`` stands for one path segment. All other requests are authenticated before
#: their body is read, including requests to unknown paths.
PUBLIC_ROUTES: tuple[str, ...] = (
    "/healthz",
    "/api/v1/healthz",
    "/readyz",
    "/openapi.json",
    "/docs",
    "/docs/oauth2-redirect",
    "/redoc",
    "/api/v1/downloads/{token}",
)

_PUBLIC_METHODS = frozenset({"GET", "HEAD"})
_PUBLIC_PATTERN = re.compile(
    "|".join(re.escape(route).replace(re.escape("{token}"), "[^/]+") for route in PUBLIC_ROUTES)
)
#: Where the guard stores the authenticated :class:`Principal` (in ``scope["state"]``).
_STATE_KEY = "tensafe.principal"
_DIGITS = re.compile(rb"[0-9]{1,19}")


class PayloadTooLargeError(ServerError):
    """The request body is larger than :data:`MAX_BODY_BYTES` (HTTP 413)."""

    status_code = 413
    error = "payload_too_large"


def _too_large(limit: int) -> PayloadTooLargeError:
    return PayloadTooLargeError(
        f"request bodies are limited to {limit} bytes ({limit / 2**20:g} MiB); send less per request"
    )


def _route_path(scope: Scope) -> str:
    """The path the router matches: ``scope["path"]`` without ``root_path`` (as Starlette does)."""
    path: str = scope["path"]
    root: str = scope.get("root_path", "")
    if root and path.startswith(root) and (len(path) == len(root) or path[len(root)] == "/"):
        return path[len(root) :]
    return path


def is_public(method: str, path: str) -> bool:
    """Return whether ``method path`` is served without an API key (see :data:`PUBLIC_ROUTES`)."""
    return method.upper() in _PUBLIC_METHODS and _PUBLIC_PATTERN.fullmatch(path) is not None


def principal_of(scope: Scope) -> Principal | None:
    """The caller that :class:`RequestGuard` authenticated for this request, if it did."""
    state = scope.get("state")
    principal = state.get(_STATE_KEY) if isinstance(state, dict) else None
    return principal if isinstance(principal, Principal) else None


def _header_values(scope: Scope, name: bytes) -> list[bytes]:
    return [value for key, value in scope.get("headers", ()) if key.lower() == name]


def _declared_length(scope: Scope) -> int | None:
    """Return the declared ``Content-Length``, or None when there is none (chunked).

    Raises:
        BadRequestError: The header is not one decimal number, or is repeated with
            different values.
    """
    values = {value.strip() for value in _header_values(scope, b"content-length")}
    if not values:
        return None
    if len(values) > 1 or not all(_DIGITS.fullmatch(v) for v in values):
        raise BadRequestError("malformed Content-Length header: send one decimal number of bytes")
    return int(values.pop())


def _api_key(scope: Scope) -> str | None:
    """Return the ``X-API-Key`` header, or None when it is missing.

    Under :data:`OPENAI_PREFIX` the key may come as ``Authorization: Bearer <key>`` instead.

    Raises:
        AuthenticationError: The header is repeated (or both carry different keys), or is
            not ASCII.
    """
    values = _header_values(scope, API_KEY_HEADER.lower().encode())
    if _route_path(scope).startswith(OPENAI_PREFIX):
        for value in _header_values(scope, b"authorization"):
            scheme, _, token = value.strip().partition(b" ")
            if scheme.lower() == b"bearer" and token.strip():
                values.append(token.strip())
        values = list(dict.fromkeys(v.strip() for v in values))
    if not values:
        return None
    if len(values) > 1:
        raise AuthenticationError(f"send exactly one {API_KEY_HEADER} header")
    try:
        return values[0].decode("ascii").strip()
    except UnicodeDecodeError:
        raise AuthenticationError("invalid API key") from None


@dataclass
class _Exchange:
    """What the guard knows about one request while the application handles it."""

    received: int = 0
    exceeded: bool = False
    app_started: bool = False
    refused: bool = False


class RequestGuard:
    """ASGI middleware: header checks, authentication before the body, a streaming body limit.

    Args:
        app: The application to guard.
        authenticate: Returns the caller behind an API key (or None when the header is
            missing), or raises :class:`~tensafe.server.errors.AuthenticationError`. It
            is called in a worker thread; it may block (a database read).
        max_body_bytes: The largest body accepted (default :data:`MAX_BODY_BYTES`).
    """

    def __init__(
        self,
        app: ASGIApp,
        *,
        authenticate: Callable[[str | None], Principal],
        max_body_bytes: int = MAX_BODY_BYTES,
    ) -> None:
        """Wrap ``app``."""
        if max_body_bytes < 0:
            raise ValueError("max_body_bytes must not be negative")
        self.app = app
        self._authenticate = authenticate
        self.max_body_bytes = max_body_bytes

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        """Handle one ASGI connection scope."""
        if scope["type"] == "websocket":
            # The API has no WebSocket routes; refuse the handshake (HTTP 403).
            await send({"type": "websocket.close", "code": 1008})
            return
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        limit = self.max_body_bytes
        try:
            declared = _declared_length(scope)
            if declared is not None and declared > limit:
                raise _too_large(limit)
            if not is_public(scope["method"], _route_path(scope)):
                key = _api_key(scope)
                principal = await anyio.to_thread.run_sync(self._authenticate, key)
                scope.setdefault("state", {})[_STATE_KEY] = principal
        except ServerError as exc:
            await _refuse(exc, scope, receive, send)
            return
        except Exception as exc:
            _log.exception("authentication failed")
            await _refuse_internal(exc, scope, receive, send)
            return

        exchange = _Exchange()

        async def receive_limited() -> Message:
            if exchange.exceeded:
                raise _too_large(limit)
            message = await receive()
            if message["type"] == "http.request":
                exchange.received += len(message.get("body", b""))
                if exchange.received > limit:
                    exchange.exceeded = True
                    raise _too_large(limit)
            return message

        async def send_guarded(message: Message) -> None:
            if exchange.exceeded and not exchange.app_started:
                # The application answers a body it could not read: answer 413 instead.
                if not exchange.refused:
                    exchange.refused = True
                    await _refuse(_too_large(limit), scope, receive, send)
                return
            if message["type"] == "http.response.start":
                exchange.app_started = True
            await send(message)

        try:
            await self.app(scope, receive_limited, send_guarded)
        except Exception:
            if not exchange.exceeded:
                raise
            _log.debug("request body over the limit; the handler stopped with an error", exc_info=True)
        if exchange.exceeded and not exchange.app_started and not exchange.refused:
            exchange.refused = True
            await _refuse(_too_large(limit), scope, receive, send)


def _json_refusal(body: dict[str, Any], status: int) -> JSONResponse:
    return JSONResponse(body, status, headers={"Connection": "close"})


async def _refuse(exc: ServerError, scope: Scope, receive: Receive, send: Send) -> None:
    body = p.ApiError(error=exc.error, detail=str(exc)).model_dump(exclude_none=True)
    if _route_path(scope).startswith(OPENAI_PREFIX):
        body = openai_error_body(
            str(exc),
            type="invalid_request_error" if exc.status_code < 500 else "server_error",
            code="invalid_api_key" if exc.status_code == 401 else exc.error,
        )
    await _json_refusal(body, exc.status_code)(scope, receive, send)


async def _refuse_internal(exc: Exception, scope: Scope, receive: Receive, send: Send) -> None:
    body = p.ApiError(
        error="internal_error", detail=f"internal server error ({type(exc).__name__})", category="server"
    ).model_dump(exclude_none=True)
    if _route_path(scope).startswith(OPENAI_PREFIX):
        body = openai_error_body(str(body["detail"]), type="server_error")
    await _json_refusal(body, 500)(scope, receive, send)
