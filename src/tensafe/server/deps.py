"""FastAPI dependencies shared by the server's routers: the services and the calling tenant."""

from __future__ import annotations

from typing import Annotated

from fastapi import Depends, Header, Request

from tensafe.server.jobs import Services
from tensafe.server.limits import principal_of
from tensafe.server.tenants import Principal, authenticate

__all__ = ["Caller", "Svc", "authenticate_key", "caller", "services_of"]


def services_of(request: Request) -> Services:
    """The application's shared :class:`~tensafe.server.jobs.Services`."""
    services: Services = request.app.state.services
    return services


def authenticate_key(services: Services, key: str | None) -> Principal:
    """Authenticate an API key in a read-only transaction (blocking: call it from a thread).

    Raises:
        AuthenticationError: The key is missing, malformed, unknown, revoked or expired.
    """
    with services.reads() as session:
        return authenticate(session, key)


def caller(request: Request, x_api_key: Annotated[str | None, Header(alias="X-API-Key")] = None) -> Principal:
    """The calling tenant.

    :class:`~tensafe.server.limits.RequestGuard` authenticated the ``X-API-Key`` header
    before the body was read; its result is reused. Without the guard (a router mounted
    on its own), the header is authenticated here.
    """
    principal = principal_of(request.scope)
    if principal is not None:
        return principal
    return authenticate_key(services_of(request), x_api_key)


Caller = Annotated[Principal, Depends(caller)]
Svc = Annotated[Services, Depends(services_of)]
