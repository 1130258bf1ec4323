"""FastAPI dependencies shared by the server's routers: the services and the calling tenant."""

from __future__ import annotations

from typing import Annotated

from fastapi import Depends, Header, Request

from tensafe.server.jobs import Services
from tensafe.server.tenants import Principal, authenticate

__all__ = ["Caller", "Svc", "caller", "services_of"]


def services_of(request: Request) -> Services:
    """The application's shared :class:`~tensafe.server.jobs.Services`."""
    services: Services = request.app.state.services
    return services


def caller(request: Request, x_api_key: Annotated[str | None, Header(alias="X-API-Key")] = None) -> Principal:
    """Authenticate the ``X-API-Key`` header (a read-only transaction)."""
    with services_of(request).reads() as session:
        return authenticate(session, x_api_key)


Caller = Annotated[Principal, Depends(caller)]
Svc = Annotated[Services, Depends(services_of)]
