"""The FastAPI application: wiring only.

:func:`create_app` builds, in this order, the settings' database engine, the shared
:class:`~tensafe.server.services.Services`, the compute operations and the
:class:`~tensafe.server.jobs.Worker` (with its periodic task, the
:class:`~tensafe.server.retention.Sweeper`), the request guard middleware, the error
handlers (:func:`~tensafe.server.errors.install_error_handlers`) and the routers of
:mod:`tensafe.server.routers`. The routes reach the shared objects through the
dependencies of :mod:`tensafe.server.deps` (``app.state.services``, ``settings``,
``worker``, ``waiters``; ``app.state.compute`` is the table of loaded sessions). The
OpenAI-compatible API is a separate application mounted at ``/oai/api/v1``
(:mod:`tensafe.server.routers.openai`; ``app.state.openai``).
"""

from __future__ import annotations

import asyncio
import contextlib
import functools
import importlib
from collections.abc import AsyncIterator
from typing import Any

from fastapi import FastAPI
from fastapi.concurrency import run_in_threadpool

from tensafe.db import create_engine_from_url, make_session_factory
from tensafe.server.deps import authenticate_key
from tensafe.server.errors import install_error_handlers
from tensafe.server.jobs import OperationRegistry, Worker
from tensafe.server.limits import RequestGuard
from tensafe.server.ops import ComputeOps
from tensafe.server.retention import Sweeper
from tensafe.server.routers import ROUTERS
from tensafe.server.routers.futures import Waiters
from tensafe.server.routers.openai import OPENAI_MOUNT, build_openai_mount
from tensafe.server.services import Services
from tensafe.server.settings import ServerSettings
from tensafe.storage import EncryptedArtifactStore, LocalFilesystemBackend

__all__ = ["create_app"]


def create_app(
    settings: ServerSettings,
    *,
    store: EncryptedArtifactStore | None = None,
    key_manager: Any = None,
    registry: OperationRegistry | None = None,
) -> FastAPI:
    """Build the TenSafe training API server.

    Args:
        settings: Database, data directory, model catalog and timing settings.
        store: The encrypted artifact store (default: a local store under
            ``settings.data_dir/artifacts`` with keys from ``key_manager``).
        key_manager: A :class:`tensafe.keys.KeyManager` (default: from the environment).
            Its deployment signing key signs the audit checkpoints.
        registry: Operations the worker executes (default: a fresh :class:`ops.ComputeOps`
            table; ``app.state.compute`` is that object).

    Returns:
        The application. Its worker thread (when ``settings.run_worker``) starts and
        stops with the application's lifespan.
    """
    engine = create_engine_from_url(settings.database_url)
    if key_manager is None:
        from tensafe.keys import KeyManager

        key_manager = KeyManager.from_environment(engine=engine)
    if store is None:
        store = EncryptedArtifactStore(LocalFilesystemBackend(settings.data_dir / "artifacts"), key_manager)
    services = Services(
        sessions=make_session_factory(engine),
        store=store,
        signer=key_manager.deployment_signing_key(),
        checkpoint_every=settings.audit_checkpoint_every,
        catalog=settings.catalog,
        result_ttl_seconds=settings.result_ttl_seconds,
    )
    waiters = Waiters()
    compute = ComputeOps(
        auto_checkpoint=settings.auto_checkpoint,
        max_loaded_models=settings.max_loaded_models,
        max_loaded_per_tenant=settings.max_loaded_per_tenant,
    )
    worker = Worker(
        services,
        registry or compute.registry(),
        lease_seconds=settings.lease_seconds,
        poll_interval=settings.poll_interval_seconds,
        notify=waiters.notify,
        periodic=[Sweeper(services)],
    )

    # The OpenAI-compatible API (engines start on first use; closed with the application).
    openai_mount = build_openai_mount(services, settings.catalog)

    @contextlib.asynccontextmanager
    async def lifespan(_app: FastAPI) -> AsyncIterator[None]:
        waiters.bind(asyncio.get_running_loop())
        if settings.run_worker:
            # Import the compute stack (torch, transformers, peft) before taking any lease:
            # a first import inside a job holds the GIL for seconds, which would starve the
            # lease renewal and let another process take the model over mid-job.
            await run_in_threadpool(importlib.import_module, "tensafe.training.runtime")
            worker.start()
        try:
            yield
        finally:
            try:
                await openai_mount.aclose()
            finally:
                if settings.run_worker:
                    await run_in_threadpool(worker.stop)
                engine.dispose()

    app = FastAPI(
        title="TenSafe training API",
        summary="Tinker-compatible training API with platform-enforced privacy, encryption and audit.",
        lifespan=lifespan,
    )
    app.state.services = services
    app.state.worker = worker
    app.state.compute = compute
    app.state.settings = settings
    app.state.waiters = waiters
    app.state.openai = openai_mount

    install_error_handlers(app)
    # Outside the routes: the API key is checked before the body is read, bodies are counted.
    app.add_middleware(RequestGuard, authenticate=functools.partial(authenticate_key, services))
    for router in ROUTERS:
        app.include_router(router)
    app.mount(OPENAI_MOUNT, openai_mount.app)
    return app
