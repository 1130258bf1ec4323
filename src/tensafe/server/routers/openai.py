"""``/oai/api/v1``: the OpenAI-compatible inference API inside ``tensafe server`` (Tinker's mount point).

:func:`build_openai_mount` builds the application that :func:`tensafe.server.app.create_app`
mounts at :data:`OPENAI_MOUNT`: :func:`tensafe.serving.api.build_openai_app` (the routes and
OpenAI-shaped errors) on an :class:`~tensafe.serving.registry.AdapterRegistry` with one source,
:class:`CheckpointSource`. The ``openai`` SDK uses it unchanged with
``base_url=<server>/oai/api/v1`` and ``api_key=<TenSafe API key>``.

* **Authentication.** The :class:`~tensafe.server.limits.RequestGuard` authenticates every
  request under ``/oai/`` before its body is read, from ``X-API-Key`` or, there only,
  ``Authorization: Bearer <key>`` (what the ``openai`` SDK sends), and answers refusals in
  OpenAI's error shape. Mounted without the guard, the mount authenticates the same headers
  itself.
* **Models.** ``model`` is a base model of the server's catalog (``TS_SERVER_MODELS``) or the
  caller's own ``tinker://<run>/sampler_weights/<name>`` path (or an uploaded adapter's
  ``external_weights`` path, as ``create_sampling_session`` accepts). Another tenant's path, an
  unknown, deleted or expired one, or one of a deleted tenant: the same 404. The adapter files
  are read from the encrypted store and decrypted with the owner's DEK into memory only, as the
  sampling route does; the engine id includes the checkpoint's artifact id, so a checkpoint
  saved again under the same path is never answered with the old weights.
* **Engines.** One :class:`~tensafe.serving.engines.transformers.TransformersEngine` per base
  model, started on the first request that needs it (:class:`ServerEngines`) and closed with
  the application. Resident adapters are capped by ``TS_SERVE_MAX_RESIDENT_ADAPTERS``.
"""

from __future__ import annotations

import asyncio
from collections.abc import Sequence
from dataclasses import dataclass

import anyio.to_thread
from fastapi import FastAPI, Request
from sqlalchemy import select

from tensafe import config
from tensafe.audit import AuditLog
from tensafe.db import Tenant
from tensafe.protocol import InvalidTinkerPathError, TinkerPath
from tensafe.server.checkpoints import checkpoint_is_live, find_checkpoint, is_expired
from tensafe.server.errors import AuthenticationError, BadRequestError
from tensafe.server.limits import API_KEY_HEADER, principal_of
from tensafe.server.models import TrainingCheckpoint, TrainingModel
from tensafe.server.services import Services
from tensafe.server.settings import ModelCatalog
from tensafe.server.states import ModelState
from tensafe.server.tenants import Principal, authenticate
from tensafe.serving.api import build_openai_app
from tensafe.serving.engine import Engine, LoraAdapter
from tensafe.serving.errors import (
    AdapterRefusedError,
    EngineUnavailableError,
    InvalidGenerationRequestError,
    ModelNotFoundError,
    UnauthenticatedError,
)
from tensafe.serving.registry import AdapterRef, AdapterRegistry, ModelEntry, ServingCaller

__all__ = [
    "ADAPTER_FILES",
    "OPENAI_MOUNT",
    "CheckpointSource",
    "OpenAIMount",
    "ServerEngines",
    "build_openai_mount",
]

#: Where ``create_app`` mounts the OpenAI-compatible API (Tinker's mount point).
OPENAI_MOUNT = "/oai/api/v1"
#: The stored files of a sampler checkpoint, in artifact order (``<artifact>.0``, ``<artifact>.1``).
ADAPTER_FILES = ("adapter_config.json", "adapter_model.safetensors")
#: The most adapters ``GET /v1/models`` lists for one caller (newest first).
MAX_LISTED = 1000


def _coords(model: str) -> TinkerPath | None:
    """The checkpoint a ``model`` names, None when it is not a ``tinker://`` path.

    Raises:
        ModelNotFoundError: A malformed ``tinker://`` path (no checkpoint has it).
    """
    if not model.startswith("tinker://"):
        return None
    try:
        return TinkerPath.parse(model)
    except InvalidTinkerPathError:
        raise ModelNotFoundError("malformed tinker:// path") from None


class CheckpointSource:
    """The caller's own sampler checkpoints, decrypted with the owner's DEK (an ``AdapterSource``)."""

    name = "checkpoint"

    def __init__(self, services: Services) -> None:
        """Read checkpoints through ``services`` (database and encrypted store)."""
        self._services = services

    def __repr__(self) -> str:
        return "CheckpointSource()"

    def _live(self, tenant: str, path: TinkerPath) -> tuple[TrainingCheckpoint, TrainingModel]:
        """The live, servable checkpoint of ``tenant`` at ``path`` with its run, else 404."""
        with self._services.reads() as session:
            ckpt = find_checkpoint(session, path.run_id, path.kind, path.name)
            if ckpt is None or ckpt.tenant_id != tenant or is_expired(ckpt) or ckpt.artifact_id is None:
                raise ModelNotFoundError("no such checkpoint for this tenant")
            owner = session.get(Tenant, tenant)
            run = session.get(TrainingModel, ckpt.model_id)
            if owner is None or owner.deleted_at is not None or run is None:
                raise ModelNotFoundError("no such checkpoint for this tenant")
            servable = ckpt.kind == "sampler_weights" or (
                ckpt.kind == "external_weights" and run.state == ModelState.UPLOADED
            )
            session.expunge_all()
        if not servable:
            raise InvalidGenerationRequestError(
                f"{str(path)!r} is a {ckpt.kind} checkpoint; serve a sampler_weights checkpoint "
                "(save one with save_weights_for_sampler) or an uploaded adapter",
                param="model",
            )
        return ckpt, run

    def resolve(self, caller: ServingCaller, model: str) -> AdapterRef | None:
        """The caller's checkpoint at the ``tinker://`` path ``model`` (None for other names)."""
        path = _coords(model)
        if path is None:
            return None
        ckpt, run = self._live(caller.tenant, path)
        return AdapterRef(
            source=self.name,
            name=str(path),
            tenant=caller.tenant,
            base_model=run.base_model,
            version=str(ckpt.artifact_id),
            locator=str(ckpt.artifact_id),
        )

    def fetch(self, ref: AdapterRef) -> LoraAdapter:
        """The checkpoint's PEFT files, decrypted with the owner's DEK, in memory."""
        try:
            files = {
                name: self._services.store.get_bytes(ref.tenant, f"{ref.locator}.{i}")
                for i, name in enumerate(ADAPTER_FILES)
            }
        except Exception as exc:  # missing, tampered or undecryptable artifact: never served
            raise AdapterRefusedError(
                f"the stored files of {ref.name!r} could not be read and decrypted ({type(exc).__name__}); "
                "save the checkpoint again"
            ) from None
        return LoraAdapter(adapter_id=ref.adapter_id, base_model_id=ref.base_model, files=files)

    def check(self, ref: AdapterRef) -> None:
        """404 unless the checkpoint is still live, the owner's, and holds the same artifact."""
        path = _coords(ref.name)
        assert path is not None
        try:
            ckpt, _ = self._live(ref.tenant, path)
        except InvalidGenerationRequestError:
            raise ModelNotFoundError("no longer servable") from None
        if ckpt.artifact_id != ref.version:
            raise ModelNotFoundError("the checkpoint was saved again since")

    def list_models(self, caller: ServingCaller) -> Sequence[ModelEntry]:
        """The caller's live ``sampler_weights`` checkpoints, newest first (at most :data:`MAX_LISTED`)."""
        stmt = (
            select(TrainingCheckpoint, TrainingModel.base_model)
            .join(TrainingModel, TrainingModel.id == TrainingCheckpoint.model_id)
            .where(
                TrainingCheckpoint.tenant_id == caller.tenant,
                TrainingCheckpoint.kind == "sampler_weights",
                checkpoint_is_live(),
            )
            .order_by(TrainingCheckpoint.created_at.desc(), TrainingCheckpoint.id)
            .limit(MAX_LISTED)
        )
        with self._services.reads() as session:
            rows = session.execute(stmt).all()
            return [
                ModelEntry(
                    id=f"tinker://{ckpt.model_id}/{ckpt.kind}/{ckpt.name}",
                    owned_by=caller.tenant,
                    root=base_model,
                    created=int(ckpt.created_at.timestamp()),
                )
                for ckpt, base_model in rows
            ]


class ServerEngines:
    """One started engine per base model of the catalog, started on first use.

    Args:
        catalog: The server's base models.
        max_loras: Adapters one batch may mix (LoRA slots of each engine).
        max_lora_rank: The largest adapter rank served (a larger one is refused with a 403).
        max_num_seqs: Requests decoded together per engine.
    """

    def __init__(
        self, catalog: ModelCatalog, *, max_loras: int, max_lora_rank: int = 64, max_num_seqs: int = 16
    ) -> None:
        """Start nothing yet."""
        self._catalog = catalog
        self._options = {"max_loras": max_loras, "max_lora_rank": max_lora_rank, "max_num_seqs": max_num_seqs}
        self._engines: dict[str, Engine] = {}
        self._starting: dict[str, asyncio.Lock] = {}

    def names(self) -> tuple[str, ...]:
        """The base model names served (the catalog's)."""
        return tuple(self._catalog.entries)

    async def get(self, name: str) -> Engine:
        """The started engine of ``name`` (started now if needed).

        Raises:
            ModelNotFoundError: ``name`` is not in the catalog.
            EngineUnavailableError: The model cannot be prepared or loaded.
        """
        engine = self._engines.get(name)
        if engine is not None:
            return engine
        entry = self._catalog.entries.get(name)
        if entry is None:
            raise ModelNotFoundError(
                f"The model `{name[:200]}` does not exist or you do not have access to it."
            )
        lock = self._starting.setdefault(name, asyncio.Lock())
        async with lock:
            engine = self._engines.get(name)
            if engine is not None:
                return engine
            try:
                directory = await anyio.to_thread.run_sync(entry.directory)
            except BadRequestError as exc:
                raise EngineUnavailableError(str(exc)) from None
            from tensafe.serving.engines.transformers import TransformersEngine

            engine = await TransformersEngine.start(
                str(directory),
                model_name=name,
                aliases=tuple({entry.source, str(directory)} - {name}),
                **self._options,
            )
            self._engines[name] = engine
            return engine

    async def close(self) -> None:
        """Close every started engine."""
        engines, self._engines = list(self._engines.values()), {}
        for engine in engines:
            await engine.close()


@dataclass(frozen=True)
class OpenAIMount:
    """The mounted application, its registry and its engines (closed with the server)."""

    app: FastAPI
    registry: AdapterRegistry
    engines: ServerEngines

    async def aclose(self) -> None:
        """Unload every adapter (recorded), then close the engines."""
        try:
            await self.registry.close()
        finally:
            await self.engines.close()


def _bearer(request: Request) -> str | None:
    header = request.headers.get("authorization", "")
    scheme, _, token = header.partition(" ")
    return token.strip() if scheme.lower() == "bearer" and token.strip() else None


def build_openai_mount(
    services: Services,
    catalog: ModelCatalog,
    *,
    max_resident: int | None = None,
    engines: ServerEngines | None = None,
) -> OpenAIMount:
    """The OpenAI-compatible application for :data:`OPENAI_MOUNT`.

    Args:
        services: The server's shared services (database, encrypted store, audit signer).
        catalog: The base models served.
        max_resident: Adapters loaded at once (default ``TS_SERVE_MAX_RESIDENT_ADAPTERS``).
        engines: The engines (default: a :class:`ServerEngines` on ``catalog``).

    Raises:
        EnvironmentVariableError: ``TS_SERVE_MAX_RESIDENT_ADAPTERS`` is malformed.
    """
    cap = config.serve_max_resident_adapters() if max_resident is None else max_resident
    engines = engines if engines is not None else ServerEngines(catalog, max_loras=min(cap, 16))
    audit = AuditLog(services.sessions, signer=services.signer, checkpoint_every=services.checkpoint_every)
    registry = AdapterRegistry(
        sources=[CheckpointSource(services)],
        engine_for=engines.get,
        base_models=engines.names,
        max_resident=cap,
        audit=audit,
    )

    async def authenticate_request(request: Request) -> ServingCaller:
        principal = principal_of(request.scope)
        if principal is None:  # mounted without the RequestGuard: authenticate here
            key = request.headers.get(API_KEY_HEADER) or _bearer(request)

            def check() -> Principal:
                with services.reads() as session:
                    return authenticate(session, key)

            try:
                principal = await anyio.to_thread.run_sync(check)
            except AuthenticationError as exc:
                raise UnauthenticatedError(str(exc)) from None
        return ServingCaller(tenant=principal.tenant, actor=principal.actor)

    app = build_openai_app(registry=registry, authenticate=authenticate_request, prefix="")
    return OpenAIMount(app=app, registry=registry, engines=engines)
