"""The FastAPI application: Tinker-compatible routes, authentication, errors, long-polling."""

# No "from __future__ import annotations": FastAPI resolves the closure-local dependency
# aliases (Caller) from the evaluated annotations.

import asyncio
import contextlib
import functools
import importlib
import json
import logging
import secrets
import time
from collections.abc import AsyncIterator
from typing import Annotated, Any, TypeVar

from fastapi import FastAPI, Query, Request
from fastapi.concurrency import run_in_threadpool
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse, Response
from pydantic import BaseModel
from sqlalchemy import func, select, text
from sqlalchemy.orm import Session
from starlette.exceptions import HTTPException as StarletteHTTPException

from tensafe import protocol as p
from tensafe.db import create_engine_from_url, current_revision, head_revision, make_session_factory, utcnow
from tensafe.protocol.wire import WireFormatError, decode_forward_backward_request, message_bytes
from tensafe.server.checkpoints import checkpoint_is_live, delete_checkpoint_artifacts
from tensafe.server.checkpoints import router as checkpoints_router
from tensafe.server.deps import Caller, authenticate_key
from tensafe.server.errors import BadRequestError, NotFoundError, ServerError
from tensafe.server.jobs import (
    OperationRegistry,
    Services,
    Worker,
    load_future,
    open_record,
    stage_payload,
    submit_future,
)
from tensafe.server.ledger import lineage_ledger, new_ledger
from tensafe.server.limits import RequestGuard
from tensafe.server.models import (
    FutureRow,
    SamplingSessionRow,
    ServerSession,
    TrainingCheckpoint,
    TrainingModel,
)
from tensafe.server.ops import _UNSUPPORTED_SAMPLE_KNOBS, MAX_DATASET_SIZE, ComputeOps, parse_tinker_path
from tensafe.server.privacy import client_request, effective_policy, tenant_row
from tensafe.server.retention import RESULT_EXPIRED, ResultExpiredError
from tensafe.server.routes_tensafe import router as tensafe_router
from tensafe.server.settings import ServerSettings
from tensafe.server.tenants import Principal
from tensafe.storage import EncryptedArtifactStore, LocalFilesystemBackend

__all__ = ["create_app"]

_log = logging.getLogger("tensafe.server")

#: What ``/client/config`` answers: plain httpx transport, no JWT, server-side features off.
CLIENT_CONFIG: dict[str, Any] = {
    "pjwt_auth_enabled": False,
    "use_pyqwest_transport": False,
    "parallel_fwdbwd_chunks": True,
    "proto_compress_fwdbwd": False,
    "sample_use_retrieve_futures": False,
    "custom_loss_server_side": False,
    "sample_join_sampling_session": False,
}

M = TypeVar("M", bound=BaseModel)


def _error_body(error: str, detail: str, *, errors: list[dict[str, Any]] | None = None) -> dict[str, Any]:
    body = p.ApiError(error=error, detail=detail, errors=errors).model_dump(exclude_none=True)
    return body


class _Waiters:
    """Wakes long-polling ``retrieve_future`` requests when the in-process worker finishes."""

    def __init__(self) -> None:
        self._loop: asyncio.AbstractEventLoop | None = None
        self._events: dict[str, set[asyncio.Event]] = {}

    def bind(self, loop: asyncio.AbstractEventLoop) -> None:
        self._loop = loop

    def notify(self, future_id: str) -> None:
        """Thread-safe: wake every waiter of ``future_id``."""
        loop = self._loop
        if loop is not None and not loop.is_closed():
            loop.call_soon_threadsafe(self._set, future_id)

    def _set(self, future_id: str) -> None:
        for event in self._events.get(future_id, ()):
            event.set()

    async def wait(self, future_id: str, timeout: float) -> None:
        event = asyncio.Event()
        self._events.setdefault(future_id, set()).add(event)
        try:
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(event.wait(), timeout)
        finally:
            waiting = self._events.get(future_id)
            if waiting is not None:
                waiting.discard(event)
                if not waiting:
                    del self._events[future_id]


def _dump(value: Any) -> str:
    return json.dumps(value if value is not None else {}, sort_keys=True)


def _new_model_row(
    model_id: str,
    tenant: str,
    body: Any,
    *,
    base_model: str,
    lora_rank: int | None,
    lora_config: str,
    optimizer_config: str,
    dp_policy: str,
    ledger_id: str | None,
) -> TrainingModel:
    """A training model row in state ``creating``, for create_model and create-via-load_weights.

    ``body`` is the request (it carries ``session_id``, ``model_seq_id`` and ``user_metadata``).
    ``ledger_id`` is the privacy ledger the run spends from (None without DP).
    """
    now = utcnow()
    return TrainingModel(
        id=model_id,
        tenant_id=tenant,
        session_id=body.session_id,
        model_seq_id=body.model_seq_id,
        base_model=base_model,
        lora_rank=lora_rank,
        lora_config=lora_config,
        optimizer_config=optimizer_config,
        user_metadata=_dump(body.user_metadata),
        state="creating",
        created_at=now,
        last_request_time=now,
        dp_policy=dp_policy,
        ledger_id=ledger_id,
        step=0,
    )


def _str_metadata(raw: str) -> dict[str, str] | None:
    data = json.loads(raw) if raw else None
    if not isinstance(data, dict):
        return None
    return {str(k): v if isinstance(v, str) else json.dumps(v) for k, v in data.items()}


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
    sessions = make_session_factory(engine)
    if key_manager is None:
        from tensafe.keys import KeyManager

        key_manager = KeyManager.from_environment(engine=engine)
    if store is None:
        store = EncryptedArtifactStore(LocalFilesystemBackend(settings.data_dir / "artifacts"), key_manager)
    signer = key_manager.deployment_signing_key()
    services = Services(
        sessions=sessions,
        store=store,
        signer=signer,
        checkpoint_every=settings.audit_checkpoint_every,
        catalog=settings.catalog,
        result_ttl_seconds=settings.result_ttl_seconds,
    )
    waiters = _Waiters()
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
    )

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

    _install_error_handlers(app)
    # Outside the routes: the API key is checked before the body is read, bodies are counted.
    app.add_middleware(RequestGuard, authenticate=functools.partial(authenticate_key, services))
    # First: its .../publish and .../ttl routes must precede DELETE .../checkpoints/{path}.
    app.include_router(checkpoints_router)

    # -- dependencies ---------------------------------------------------------------------

    def audit(session: Session, who: Principal, action: str, resource: str, **details: Any) -> None:
        services.audit(
            session, tenant=who.tenant, actor=who.actor, action=action, resource=resource, details=details
        )

    def own_session(session: Session, who: Principal, session_id: str) -> ServerSession:
        row = session.get(ServerSession, session_id)
        if row is None or row.tenant_id != who.tenant:
            raise NotFoundError(f"unknown session {session_id!r}")
        return row

    def own_model(session: Session, who: Principal, model_id: str) -> TrainingModel:
        row = session.get(TrainingModel, model_id)
        if row is None or row.tenant_id != who.tenant:
            raise NotFoundError(f"unknown model {model_id!r}")
        return row

    # -- health ---------------------------------------------------------------------------

    @app.get("/healthz", tags=["health"])
    @app.get("/api/v1/healthz", tags=["health"], include_in_schema=False)
    def healthz() -> dict[str, str]:
        """Liveness: the process answers."""
        return {"status": "ok"}

    @app.get("/readyz", tags=["health"])
    def readyz() -> JSONResponse:
        """Readiness: the database answers and its schema is at the newest migration."""
        try:
            with engine.connect() as conn:
                conn.execute(text("SELECT 1"))
            current, head = current_revision(settings.database_url), head_revision()
        except Exception as exc:
            return JSONResponse(
                {"status": "unavailable", "detail": f"database unreachable ({type(exc).__name__})"}, 503
            )
        if current != head:
            return JSONResponse(
                {
                    "status": "unavailable",
                    "detail": f"schema at {current}, expected {head}: run 'tensafe db upgrade'",
                },
                503,
            )
        return JSONResponse({"status": "ready", "schema": head})

    # -- bootstrap and sessions -----------------------------------------------------------

    @app.post("/api/v1/client/config", tags=["session"])
    def client_config(body: p.ClientConfigRequest, who: Caller) -> dict[str, Any]:
        """Feature flags for the SDK."""
        return dict(CLIENT_CONFIG)

    @app.post("/api/v1/client/dynamic_config", tags=["session"])
    def dynamic_config(body: p.ClientConfigRequest, who: Caller) -> dict[str, Any]:
        """Runtime knobs for the SDK."""
        return {"refresh_interval_sec": 300, "sample_cancel_enabled": False}

    @app.post("/api/v1/create_session", tags=["session"])
    def create_session(body: p.CreateSessionRequest, who: Caller) -> p.CreateSessionResponse:
        """Open a session (one ``ServiceClient``)."""
        now = utcnow()
        row = ServerSession(
            id="sess-" + secrets.token_hex(10),
            tenant_id=who.tenant,
            created_at=now,
            last_heartbeat_at=now,
            user_metadata=_dump(body.user_metadata),
            tags=_dump(body.tags),
            project_id=body.project_id,
            display_name=body.display_name,
            sdk_version=body.sdk_version,
        )
        with sessions.begin() as session:
            session.add(row)
            session.flush()
            audit(session, who, "api.create_session", row.id, sdk_version=body.sdk_version or "")
        return p.CreateSessionResponse(session_id=row.id)

    @app.post("/api/v1/session_heartbeat", tags=["session"])
    def heartbeat(body: p.SessionHeartbeatRequest, who: Caller) -> JSONResponse:
        """Keep a session alive; 410 once it has finished or expired."""
        with sessions.begin() as session:
            row = own_session(session, who, body.session_id)
            now = utcnow()
            expired = (now - row.last_heartbeat_at).total_seconds() > settings.session_expiry_seconds
            if row.finished_at is not None or expired:
                return JSONResponse(_error_body("session_finished", "this session has finished"), 410)
            row.last_heartbeat_at = now
        return JSONResponse({"type": "session_heartbeat"})

    @app.post("/api/v1/sessions/{session_id}/finish", tags=["session"])
    def finish_session(session_id: str, body: p.FinishSessionRequest, who: Caller) -> dict[str, str]:
        """Close a session."""
        with sessions.begin() as session:
            row = own_session(session, who, session_id)
            if row.finished_at is None:
                row.finished_at, row.finish_reason = utcnow(), body.reason.type
                audit(session, who, "api.finish_session", row.id, reason=body.reason.type)
        return {"status": "finished"}

    @app.post("/api/v1/telemetry", tags=["session"])
    def telemetry(body: p.TelemetryRequest, who: Caller) -> dict[str, str]:
        """Accept SDK telemetry; events are counted in the log, not stored."""
        _log.debug("telemetry: %d events from tenant %s", len(body.events), who.tenant)
        return {"status": "accepted"}

    # -- training models -------------------------------------------------------------------

    @app.post("/api/v1/create_model", tags=["training"])
    def create_model(body: p.CreateModelRequest, who: Caller) -> p.UntypedFuture:
        """Create a LoRA training model ``{session_id}:train:{model_seq_id}`` (a future)."""
        services.catalog.get(body.base_model)  # unknown models: 400 with a body, now
        if body.optimizer_config.type != "adamw":
            raise BadRequestError(f"optimizer {body.optimizer_config.type!r} is not supported; use AdamW")
        model_id = p.model_id_for(body.session_id, body.model_seq_id)
        payload = body.model_dump(mode="json", exclude_none=True, exclude={"type"})
        request = client_request(body.user_metadata)
        services.store.ensure_key(who.tenant)  # the request digest needs the tenant's key
        with sessions.begin() as session:
            own_session(session, who, body.session_id)
            policy = effective_policy(settings.privacy, tenant_row(session, who.tenant), request)
            existing = session.get(TrainingModel, model_id)
            if existing is not None and existing.tenant_id != who.tenant:
                raise NotFoundError(f"unknown session {body.session_id!r}")
            future, created = submit_future(
                services,
                session,
                tenant=who.tenant,
                actor=who.actor,
                request_type="create_model",
                model_id=model_id,
                seq_id=0,
                payload=payload,
            )
            if created:
                lora = body.lora_config
                session.add(
                    _new_model_row(
                        model_id,
                        who.tenant,
                        body,
                        base_model=body.base_model,
                        lora_rank=None if lora is None else lora.rank,
                        lora_config=_dump(None if lora is None else lora.model_dump(mode="json")),
                        optimizer_config=_dump(
                            body.optimizer_config.model_dump(mode="json", exclude_none=True)
                        ),
                        dp_policy=policy.to_json(),
                        ledger_id=None if policy.policy is None else new_ledger(session, who.tenant),
                    )
                )
                session.flush()
                audit(
                    session,
                    who,
                    "api.create_model",
                    model_id,
                    request_id=future.id,
                    request_digest=future.request_sha256,
                    base_model=body.base_model,
                    dp_policy=policy.to_json(),
                )
        worker.wake()
        return p.UntypedFuture(request_id=future.id, model_id=model_id)

    @app.post("/api/v1/get_info", tags=["training"])
    def get_info(body: p.GetInfoRequest, who: Caller) -> p.GetInfoResponse:
        """Describe a training model (``model_data.tokenizer_id`` feeds ``get_tokenizer``)."""
        with sessions() as session:
            row = own_model(session, who, body.model_id)
        if row.state == "failed":
            raise BadRequestError(f"model {row.id!r} could not be created: {row.error}")
        entry = services.catalog.get(row.base_model)
        return p.GetInfoResponse(
            model_id=row.id,
            # Never the model's directory: the tokenizer id reveals nothing about the server's disk.
            model_data=p.ModelData(
                arch=entry.arch(), model_name=row.base_model, tokenizer_id=entry.client_tokenizer_id
            ),
            is_lora=True,
            lora_rank=row.lora_rank,
            model_name=row.base_model,
            optimizer_config=json.loads(row.optimizer_config),
        )

    def submit_model_request(
        who: Principal,
        *,
        model_id: str,
        seq_id: int,
        request_type: str,
        payload: dict[str, Any],
        data: bytes | None = None,
        **details: Any,
    ) -> p.UntypedFuture:
        """Queue a request of a training model, in order, de-duplicated by ``(model_id, seq_id)``."""
        if seq_id < 1:
            raise BadRequestError("seq_id must be at least 1 (0 is the model's creation)")
        with services.reads() as session:
            row = own_model(session, who, model_id)
            if row.state == "failed":
                raise BadRequestError(f"model {model_id!r} could not be created: {row.error}")
        # Stage training data in the encrypted store before taking the database write lock.
        services.store.ensure_key(who.tenant)
        staged = None if data is None else stage_payload(services, who.tenant, data)
        with sessions.begin() as session:
            future, created = submit_future(
                services,
                session,
                tenant=who.tenant,
                actor=who.actor,
                request_type=request_type,
                model_id=model_id,
                seq_id=seq_id,
                payload=payload,
                payload_bytes=data,
                staged=staged,
            )
            if created:
                model = session.get(TrainingModel, model_id)
                if model is not None:
                    model.last_request_time = utcnow()
                audit(
                    session,
                    who,
                    f"api.{request_type}",
                    model_id,
                    request_id=future.id,
                    request_digest=future.request_sha256,
                    seq_id=seq_id,
                    **details,
                )
        worker.wake()
        return p.UntypedFuture(request_id=future.id, model_id=model_id)

    @app.post(
        "/api/v1/forward_backward",
        tags=["training"],
        openapi_extra={
            "requestBody": {
                "required": True,
                "content": {"application/x-protobuf": {"schema": {"type": "string", "format": "binary"}}},
            }
        },
    )
    async def forward_backward(request: Request, who: Caller) -> p.UntypedFuture:
        """Queue a forward/backward (or forward-only) pass: a protobuf body, a future."""
        if "application/x-protobuf" not in request.headers.get("content-type", ""):
            raise BadRequestError("/forward_backward takes an application/x-protobuf body")
        body = await request.body()

        def submit() -> p.UntypedFuture:
            try:
                plain = message_bytes(body, request.headers.get("content-encoding"))
                req = decode_forward_backward_request(plain)
            except WireFormatError as exc:
                raise BadRequestError(str(exc)) from None
            tokens = sum(int(d.tokens.size) for d in req.data)
            return submit_model_request(
                who,
                model_id=req.model_id,
                seq_id=req.seq_id,
                request_type="forward" if req.forward_only else "forward_backward",
                payload={"loss_fn": req.loss_fn, "num_datums": len(req.data)},
                data=plain,
                loss_fn=req.loss_fn,
                num_datums=len(req.data),
                num_tokens=tokens,
            )

        return await run_in_threadpool(submit)

    # -- TenSafe: server-side Poisson sampling ----------------------------------------------

    def require_server_sampling(who: Principal, model_id: str) -> None:
        from tensafe.server.privacy import EffectivePolicy

        with sessions() as session:
            row = own_model(session, who, model_id)
            raw = row.dp_policy
        policy = EffectivePolicy.from_json(raw).policy if raw else None
        if policy is None or policy.sampling != "server_poisson":
            raise BadRequestError(
                f"model {model_id!r} does not use server-side sampling; create it with "
                "user_metadata tensafe.dp.sampling=server_poisson"
            )

    @app.post(
        "/api/v1/tensafe/register_dataset",
        tags=["tensafe"],
        openapi_extra={
            "requestBody": {
                "required": True,
                "content": {"application/x-protobuf": {"schema": {"type": "string", "format": "binary"}}},
            }
        },
    )
    async def register_dataset(request: Request, who: Caller) -> p.UntypedFuture:
        """Register the training set of a ``server_poisson`` run (a future; once per run).

        The body is a ``ForwardBackwardRequest`` protobuf (the ``forward_backward``
        encoding; ``loss_fn`` and ``forward_only`` are ignored) whose ``data`` is the whole
        data set. It is kept only encrypted under the tenant's key, never in the database.
        """
        if "application/x-protobuf" not in request.headers.get("content-type", ""):
            raise BadRequestError("/tensafe/register_dataset takes an application/x-protobuf body")
        body = await request.body()

        def submit() -> p.UntypedFuture:
            try:
                plain = message_bytes(body, request.headers.get("content-encoding"))
                req = decode_forward_backward_request(plain, max_datums=MAX_DATASET_SIZE)
            except WireFormatError as exc:
                raise BadRequestError(str(exc)) from None
            if not req.data:
                raise BadRequestError("register_dataset needs at least one example")
            require_server_sampling(who, req.model_id)
            return submit_model_request(
                who,
                model_id=req.model_id,
                seq_id=req.seq_id,
                request_type="register_dataset",
                payload={"num_datums": len(req.data)},
                data=plain,
                num_datums=len(req.data),
            )

        return await run_in_threadpool(submit)

    @app.post("/api/v1/tensafe/train_step", tags=["tensafe"])
    def train_step(body: p.TrainStepRequest, who: Caller) -> p.UntypedFuture:
        """Queue one server-sampled DP step: Poisson batch, forward_backward, optim_step (a future)."""
        require_server_sampling(who, body.model_id)
        payload = body.model_dump(mode="json", exclude_none=True, exclude={"type", "model_id", "seq_id"})
        return submit_model_request(
            who,
            model_id=body.model_id,
            seq_id=body.seq_id,
            request_type="train_step",
            payload=payload,
            loss_fn=body.loss_fn,
        )

    @app.post("/api/v1/optim_step", tags=["training"])
    def optim_step(body: p.OptimStepRequest, who: Caller) -> p.UntypedFuture:
        """Queue an optimizer step (a future)."""
        payload = body.model_dump(mode="json", exclude_none=True, exclude={"type", "model_id", "seq_id"})
        return submit_model_request(
            who, model_id=body.model_id, seq_id=body.seq_id, request_type="optim_step", payload=payload
        )

    # -- weights ---------------------------------------------------------------------------

    @app.post("/api/v1/save_weights", tags=["weights"])
    def save_weights(body: p.SaveWeightsRequest, who: Caller) -> p.UntypedFuture:
        """``save_state``: the full training state, encrypted, as ``tinker://<model>/weights/<path>``."""
        payload = body.model_dump(mode="json", exclude_none=True, exclude={"type", "model_id", "seq_id"})
        return submit_model_request(
            who, model_id=body.model_id, seq_id=body.seq_id, request_type="save_weights", payload=payload
        )

    @app.post("/api/v1/save_weights_for_sampler", tags=["weights"])
    def save_weights_for_sampler(body: p.SaveWeightsForSamplerRequest, who: Caller) -> p.UntypedFuture:
        """Sampler (PEFT adapter) weights: a named checkpoint or an ephemeral sampling session."""
        if body.path is None and body.sampling_session_seq_id is None:
            raise BadRequestError("save_weights_for_sampler needs a path or a sampling_session_seq_id")
        payload = body.model_dump(mode="json", exclude_none=True, exclude={"type", "model_id", "seq_id"})
        return submit_model_request(
            who,
            model_id=body.model_id,
            seq_id=body.seq_id,
            request_type="save_weights_for_sampler",
            payload=payload,
        )

    def own_checkpoint(session: Session, who: Principal, path: str) -> TrainingCheckpoint:
        run, kind, name = parse_tinker_path(path)
        row = session.execute(
            select(TrainingCheckpoint).where(
                TrainingCheckpoint.model_id == run,
                TrainingCheckpoint.kind == kind,
                TrainingCheckpoint.name == name,
                checkpoint_is_live(),
            )
        ).scalar_one_or_none()
        if row is None or row.tenant_id != who.tenant:
            raise NotFoundError(f"unknown checkpoint {path!r}")
        return row

    @app.post("/api/v1/load_weights", tags=["weights"])
    def load_weights(body: p.LoadWeightsRequest, who: Caller) -> p.UntypedFuture:
        """Create a training model from a ``weights`` checkpoint (or load into an existing one)."""
        if body.optimizer_config is not None and body.optimizer_config.type != "adamw":
            raise BadRequestError(f"optimizer {body.optimizer_config.type!r} is not supported; use AdamW")
        payload = body.model_dump(
            mode="json", exclude_none=True, exclude={"type", "model_id", "seq_id", "weights_access_token"}
        )
        if body.session_id is None or body.model_seq_id is None:
            if body.model_id is None or body.seq_id is None:
                raise BadRequestError(
                    "load_weights needs session_id and model_seq_id (or model_id and seq_id)"
                )
            with sessions() as session:
                own_checkpoint(session, who, body.path)
            return submit_model_request(
                who, model_id=body.model_id, seq_id=body.seq_id, request_type="load_weights", payload=payload
            )
        model_id = p.model_id_for(body.session_id, body.model_seq_id)
        services.store.ensure_key(who.tenant)  # the request digest needs the tenant's key
        with sessions.begin() as session:
            own_session(session, who, body.session_id)
            ckpt = own_checkpoint(session, who, body.path)
            if ckpt.kind != "weights":
                raise BadRequestError(f"{body.path!r} is not a training-state (weights) checkpoint")
            source = session.get(TrainingModel, ckpt.model_id)
            assert source is not None
            if body.base_model is not None and body.base_model != source.base_model:
                raise BadRequestError(
                    f"{body.path!r} was trained on {source.base_model!r}, not {body.base_model!r}"
                )
            existing = session.get(TrainingModel, model_id)
            if existing is not None and existing.tenant_id != who.tenant:
                raise NotFoundError(f"unknown session {body.session_id!r}")
            policy = effective_policy(settings.privacy, tenant_row(session, who.tenant))
            future, created = submit_future(
                services,
                session,
                tenant=who.tenant,
                actor=who.actor,
                request_type="load_weights",
                model_id=model_id,
                seq_id=0,
                payload=payload,
            )
            if created:
                session.add(
                    _new_model_row(
                        model_id,
                        who.tenant,
                        body,
                        base_model=source.base_model,
                        lora_rank=source.lora_rank,
                        lora_config=source.lora_config,
                        optimizer_config=source.optimizer_config,
                        dp_policy=policy.to_json(),
                        # The loaded state spends from the ledger of the run that saved it:
                        # reloading or branching never resets the privacy spent on the data.
                        ledger_id=None if policy.policy is None else lineage_ledger(session, source),
                    )
                )
                session.flush()
                audit(
                    session,
                    who,
                    "api.load_weights",
                    model_id,
                    request_id=future.id,
                    request_digest=future.request_sha256,
                    source_checkpoint=ckpt.id,
                    optimizer=body.optimizer,
                )
        worker.wake()
        return p.UntypedFuture(request_id=future.id, model_id=model_id)

    @app.post("/api/v1/weights_info", tags=["rest"])
    def weights_info(body: p.WeightsInfoRequest, who: Caller) -> p.WeightsInfoResponse:
        """What a checkpoint holds: base model and LoRA configuration."""
        with sessions() as session:
            ckpt = own_checkpoint(session, who, body.tinker_path)
            model = session.get(TrainingModel, ckpt.model_id)
            assert model is not None
            lora = json.loads(model.lora_config) or {}
            return p.WeightsInfoResponse(
                base_model=model.base_model,
                is_lora=True,
                lora_rank=model.lora_rank,
                train_unembed=lora.get("train_unembed"),
                train_mlp=lora.get("train_mlp"),
                train_attn=lora.get("train_attn"),
                optimizer_config=json.loads(model.optimizer_config) or None,
            )

    @app.delete("/api/v1/training_runs/{run_id}/checkpoints/{checkpoint_id:path}", tags=["rest"])
    def delete_checkpoint(run_id: str, checkpoint_id: str, who: Caller) -> dict[str, str]:
        """Delete a checkpoint and its encrypted files."""
        path = f"tinker://{run_id}/{checkpoint_id}"
        with sessions.begin() as session:
            row = own_checkpoint(session, who, path)
            ref = row.artifact_id
            session.delete(row)
            audit(session, who, "api.delete_checkpoint", path, artifact=ref or "")
        delete_checkpoint_artifacts(services.store, who.tenant, ref)
        return {"status": "deleted"}

    # -- sampling --------------------------------------------------------------------------

    def own_sampler(session: Session, who: Principal, sampler_id: str) -> SamplingSessionRow:
        row = session.get(SamplingSessionRow, sampler_id)
        if row is None or row.tenant_id != who.tenant:
            raise NotFoundError(f"unknown sampling session {sampler_id!r}")
        return row

    @app.post("/api/v1/create_sampling_session", tags=["sampling"])
    def create_sampling_session(
        body: p.CreateSamplingSessionRequest, who: Caller
    ) -> p.CreateSamplingSessionResponse:
        """A sampling session on a base model or on ``sampler_weights`` (direct, not a future)."""
        sampler_id = f"{body.session_id}:sample:{body.sampling_session_seq_id}"
        with sessions.begin() as session:
            own_session(session, who, body.session_id)
            existing = session.get(SamplingSessionRow, sampler_id)
            if existing is not None:
                if existing.tenant_id != who.tenant:
                    raise NotFoundError(f"unknown session {body.session_id!r}")
                if existing.model_path == body.model_path and (
                    body.base_model is None or body.base_model == existing.base_model
                ):
                    return p.CreateSamplingSessionResponse(sampling_session_id=sampler_id)
                raise BadRequestError(f"sampling session {sampler_id!r} already exists with other weights")
            ref = None
            if body.model_path is not None:
                ckpt = own_checkpoint(session, who, body.model_path)
                if ckpt.kind != "sampler_weights":
                    raise BadRequestError(
                        f"{body.model_path!r} is not a sampler_weights checkpoint; save one with "
                        "save_weights_for_sampler"
                    )
                model = session.get(TrainingModel, ckpt.model_id)
                assert model is not None
                base_model, ref = model.base_model, ckpt.artifact_id
            elif body.base_model is not None:
                services.catalog.get(body.base_model)
                base_model = body.base_model
            else:
                raise BadRequestError("create_sampling_session needs model_path or base_model")
            session.add(
                SamplingSessionRow(
                    id=sampler_id,
                    tenant_id=who.tenant,
                    session_id=body.session_id,
                    seq_id=body.sampling_session_seq_id,
                    base_model=base_model,
                    model_path=body.model_path,
                    weights_ref=ref,
                    created_at=utcnow(),
                )
            )
            session.flush()
            audit(session, who, "api.create_sampling_session", sampler_id, model_path=body.model_path or "")
        return p.CreateSamplingSessionResponse(sampling_session_id=sampler_id)

    @app.get("/api/v1/samplers/{sampler_id}", tags=["sampling"])
    def get_sampler(sampler_id: str, who: Caller) -> p.SamplerInfo:
        """The base model (and weights path) of a sampling session."""
        with sessions() as session:
            row = own_sampler(session, who, sampler_id)
            return p.SamplerInfo(sampler_id=row.id, base_model=row.base_model, model_path=row.model_path)

    @app.post("/api/v1/asample", tags=["sampling"])
    def asample(body: p.SampleRequest, who: Caller) -> p.UntypedFuture:
        """Queue a sampling request (a future; its result is a protobuf ``SampleResponse``)."""
        if body.sampling_session_id is None or body.seq_id is None:
            raise BadRequestError("asample needs sampling_session_id and seq_id (create a sampling session)")
        for knob in _UNSUPPORTED_SAMPLE_KNOBS:
            value = getattr(body, knob)
            if value not in (None, 0, False):
                raise BadRequestError(f"{knob} is not supported by this server")
        tokens: list[int] = []
        for chunk in body.prompt.chunks:
            if chunk.type != "encoded_text":
                raise BadRequestError(
                    f"prompt chunks of type {chunk.type!r} are not supported (text models only)"
                )
            tokens.extend(chunk.tokens)
        if not tokens:
            raise BadRequestError("the prompt is empty")
        with sessions() as session:
            own_sampler(session, who, body.sampling_session_id)
        payload = {
            "sampling_session_id": body.sampling_session_id,
            "seq_id": body.seq_id,
            "num_samples": body.num_samples,
            "sampling_params": body.sampling_params.model_dump(mode="json", exclude_none=True),
            "prompt_logprobs": bool(body.prompt_logprobs),
            "topk_prompt_logprobs": body.topk_prompt_logprobs,
            **({"record_stability_info": True} if body.record_stability_info else {}),
        }
        data = json.dumps(tokens).encode()
        staged = stage_payload(services, who.tenant, data)  # also creates the tenant's key if needed
        with sessions.begin() as session:
            future, _ = submit_future(
                services,
                session,
                tenant=who.tenant,
                actor=who.actor,
                request_type="sample",
                model_id=None,
                seq_id=None,
                payload=payload,
                payload_bytes=data,
                staged=staged,
            )
            audit(
                session,
                who,
                "api.sample",
                body.sampling_session_id,
                request_id=future.id,
                request_digest=future.request_sha256,
                num_samples=body.num_samples,
            )
        worker.wake()
        ids = [f"{body.sampling_session_id}:{body.seq_id}:{i}" for i in range(body.num_samples)]
        return p.UntypedFuture(request_id=future.id, sample_sequence_ids=ids)

    # -- futures ---------------------------------------------------------------------------

    @app.post(
        "/api/v1/retrieve_future",
        tags=["futures"],
        responses={408: {"description": "not finished yet: poll again", "model": p.TryAgain}},
    )
    async def retrieve_future(body: p.RetrieveFutureRequest, who: Caller) -> Response:
        """Long-poll a future: its result, its failure, or 408 ``try_again`` after ~25 s."""

        def load() -> FutureRow:
            with services.reads() as session:
                return load_future(session, who.tenant, body.request_id)

        deadline = time.monotonic() + settings.long_poll_seconds
        while True:
            row = await run_in_threadpool(load)
            if row.state in ("complete", "failed"):
                return await run_in_threadpool(_result_response, services, row)
            remaining = deadline - time.monotonic()
            if remaining <= 0:
                return JSONResponse(p.TryAgain(request_id=row.id).model_dump(exclude_none=True), 408)
            await waiters.wait(row.id, min(remaining, settings.poll_interval_seconds))

    # -- REST ------------------------------------------------------------------------------

    @app.get("/api/v1/get_server_capabilities", tags=["rest"])
    def capabilities(who: Caller) -> p.ServerCapabilities:
        """Base models this server serves."""
        return p.ServerCapabilities(
            supported_models=[
                p.SupportedModel(model_name=name, trainable=True, sampleable=True)
                for name in sorted(services.catalog.entries)
            ]
        )

    def run_view(session: Session, row: TrainingModel) -> p.TrainingRun:
        last: dict[str, p.Checkpoint | None] = {"weights": None, "sampler_weights": None}
        for kind in last:
            ck = session.execute(
                select(TrainingCheckpoint)
                .where(
                    TrainingCheckpoint.model_id == row.id,
                    TrainingCheckpoint.kind == kind,
                    checkpoint_is_live(),
                )
                .order_by(TrainingCheckpoint.created_at.desc())
                .limit(1)
            ).scalar_one_or_none()
            last[kind] = None if ck is None else checkpoint_view(ck)
        return p.TrainingRun(
            training_run_id=row.id,
            base_model=row.base_model,
            model_owner=row.tenant_id,
            is_lora=True,
            last_request_time=row.last_request_time,
            corrupted=row.state == "failed",
            lora_rank=row.lora_rank,
            last_checkpoint=last["weights"],
            last_sampler_checkpoint=last["sampler_weights"],
            user_metadata=_str_metadata(row.user_metadata),
        )

    @app.get("/api/v1/training_runs", tags=["rest"])
    def training_runs(
        who: Caller,
        limit: Annotated[int, Query(ge=1, le=1000)] = 20,
        offset: Annotated[int, Query(ge=0, le=2**31 - 1)] = 0,
        access_scope: str = "owned",
        project_id: str | None = None,
    ) -> p.TrainingRunsResponse:
        """The tenant's training runs, newest first."""
        with sessions() as session:
            query = select(TrainingModel).where(TrainingModel.tenant_id == who.tenant)
            if project_id is not None:
                query = query.join(ServerSession, ServerSession.id == TrainingModel.session_id).where(
                    ServerSession.project_id == project_id
                )
            total = session.execute(select(func.count()).select_from(query.subquery())).scalar_one()
            rows = session.execute(
                query.order_by(TrainingModel.created_at.desc(), TrainingModel.id).limit(limit).offset(offset)
            ).scalars()
            runs = [run_view(session, row) for row in rows]
        return p.TrainingRunsResponse(
            training_runs=runs, cursor=p.Cursor(offset=offset, limit=limit, total_count=int(total))
        )

    @app.get("/api/v1/training_runs/{run_id}", tags=["rest"])
    def training_run(run_id: str, who: Caller, access_scope: str = "owned") -> p.TrainingRun:
        """One training run of the tenant."""
        with sessions() as session:
            return run_view(session, own_model(session, who, run_id))

    def checkpoint_view(row: TrainingCheckpoint) -> p.Checkpoint:
        types = {"weights": "training", "sampler_weights": "sampler", "external_weights": "external"}
        return p.Checkpoint(
            checkpoint_id=f"{row.kind}/{row.name}",
            checkpoint_type=types[row.kind],  # type: ignore[arg-type]
            time=row.created_at,
            tinker_path=f"tinker://{row.model_id}/{row.kind}/{row.name}",
            size_bytes=row.size_bytes,
            public=row.public,
            user_metadata=_str_metadata(row.user_metadata),
            expires_at=row.expires_at,
        )

    @app.get("/api/v1/training_runs/{run_id}/checkpoints", tags=["rest"])
    def run_checkpoints(run_id: str, who: Caller) -> p.CheckpointsListResponse:
        """Checkpoints of one training run."""
        with sessions() as session:
            own_model(session, who, run_id)
            rows = session.execute(
                select(TrainingCheckpoint)
                .where(TrainingCheckpoint.model_id == run_id, TrainingCheckpoint.tenant_id == who.tenant)
                .where(checkpoint_is_live())
                .order_by(TrainingCheckpoint.created_at)
            ).scalars()
            return p.CheckpointsListResponse(checkpoints=[checkpoint_view(r) for r in rows])

    @app.get("/api/v1/checkpoints", tags=["rest"])
    def all_checkpoints(
        who: Caller,
        limit: Annotated[int, Query(ge=1, le=1000)] = 100,
        offset: Annotated[int, Query(ge=0, le=2**31 - 1)] = 0,
    ) -> p.CheckpointsListResponse:
        """Checkpoints across the tenant's runs, newest first."""
        with sessions() as session:
            query = select(TrainingCheckpoint).where(
                TrainingCheckpoint.tenant_id == who.tenant, checkpoint_is_live()
            )
            total = session.execute(select(func.count()).select_from(query.subquery())).scalar_one()
            rows = session.execute(
                query.order_by(TrainingCheckpoint.created_at.desc()).limit(limit).offset(offset)
            ).scalars()
            return p.CheckpointsListResponse(
                checkpoints=[checkpoint_view(r) for r in rows],
                cursor=p.Cursor(offset=offset, limit=limit, total_count=int(total)),
            )

    @app.get("/api/v1/sessions", tags=["rest"])
    def list_sessions(
        who: Caller,
        limit: Annotated[int, Query(ge=1, le=1000)] = 20,
        offset: Annotated[int, Query(ge=0, le=2**31 - 1)] = 0,
        access_scope: str = "owned",
    ) -> p.ListSessionsResponse:
        """The tenant's session ids, newest first."""
        with sessions() as session:
            rows = session.execute(
                select(ServerSession.id)
                .where(ServerSession.tenant_id == who.tenant)
                .order_by(ServerSession.created_at.desc(), ServerSession.id)
                .limit(limit)
                .offset(offset)
            ).scalars()
            return p.ListSessionsResponse(sessions=list(rows))

    @app.get("/api/v1/sessions/{session_id}", tags=["rest"])
    def get_session(session_id: str, who: Caller, access_scope: str = "owned") -> p.GetSessionResponse:
        """One session: its training runs."""
        with sessions() as session:
            row = own_session(session, who, session_id)
            runs = session.execute(
                select(TrainingModel.id)
                .where(TrainingModel.session_id == row.id)
                .order_by(TrainingModel.model_seq_id)
            ).scalars()
            samplers = session.execute(
                select(SamplingSessionRow.id)
                .where(SamplingSessionRow.session_id == row.id)
                .order_by(SamplingSessionRow.seq_id)
            ).scalars()
            return p.GetSessionResponse(
                training_run_ids=list(runs),
                sampler_ids=list(samplers),
                user_metadata=json.loads(row.user_metadata) or None,
                display_name=row.display_name,
            )

    app.include_router(tensafe_router)
    return app


def _result_response(services: Services, row: FutureRow) -> Response:
    if row.result_content_type == RESULT_EXPIRED:
        raise ResultExpiredError(
            f"the result of request {row.id!r} was deleted: results are kept for "
            f"{services.result_ttl_seconds:g} s after the request finished"
        )
    if row.state == "failed":
        body = p.FutureFailed(error=row.error or "request failed", category=row.error_category or "unknown")  # type: ignore[arg-type]
        return JSONResponse(body.model_dump())
    if row.result_ref is not None:
        data = open_record(services, row.tenant_id, row.result_ref, row.result_blob)
        return Response(data, media_type=row.result_content_type or "application/octet-stream")
    return JSONResponse(json.loads(row.result_json or "{}"))


def _install_error_handlers(app: FastAPI) -> None:
    @app.exception_handler(ServerError)
    async def server_error(_request: Request, exc: ServerError) -> JSONResponse:
        return JSONResponse(_error_body(exc.error, str(exc)), exc.status_code)

    @app.exception_handler(RequestValidationError)
    async def validation_error(_request: Request, exc: RequestValidationError) -> JSONResponse:
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
                _error_body("invalid_json", "the request body is not valid JSON", errors=errors), 400
            )
        return JSONResponse(
            _error_body("invalid_request", "the request does not match the API schema", errors=errors), 422
        )

    @app.exception_handler(StarletteHTTPException)
    async def http_error(_request: Request, exc: StarletteHTTPException) -> JSONResponse:
        name = {404: "not_found", 405: "method_not_allowed"}.get(exc.status_code, "http_error")
        detail = "no such endpoint on this server" if exc.status_code == 404 else str(exc.detail)
        return JSONResponse(_error_body(name, detail), exc.status_code, headers=getattr(exc, "headers", None))

    @app.exception_handler(Exception)
    async def internal_error(_request: Request, exc: Exception) -> JSONResponse:
        _log.exception("unhandled error")
        return JSONResponse(
            _error_body("internal_error", f"internal server error ({type(exc).__name__})")
            | {"category": "server"},
            500,
        )
