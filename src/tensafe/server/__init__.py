"""TenSafe's training API server (layer 5): Tinker-compatible on the wire.

Public surface::

    from tensafe.server import ServerSettings, create_app

    app = create_app(ServerSettings.from_environment())   # serve with uvicorn

Tenants and API keys are managed with :mod:`tensafe.server.tenants` (``tensafe admin``).
See ``docs/server.md`` for the endpoints, the job model and what is implemented.
"""

from __future__ import annotations

from tensafe.server.app import create_app
from tensafe.server.errors import (
    AuthenticationError,
    BadRequestError,
    NotFoundError,
    ServerConfigurationError,
    ServerError,
    TenantAdminError,
)
from tensafe.server.jobs import JobContext, JobFailedError, JobResult, Operation, OperationRegistry, Worker
from tensafe.server.settings import CatalogEntry, ModelCatalog, ServerSettings

__all__ = [
    "AuthenticationError",
    "BadRequestError",
    "CatalogEntry",
    "JobContext",
    "JobFailedError",
    "JobResult",
    "ModelCatalog",
    "NotFoundError",
    "Operation",
    "OperationRegistry",
    "ServerConfigurationError",
    "ServerError",
    "ServerSettings",
    "TenantAdminError",
    "Worker",
    "create_app",
]
