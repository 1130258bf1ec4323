"""Helpers shared by the routers: queueing a model's request, new model rows, protobuf bodies."""

# No "from __future__ import annotations": FastAPI evaluates the annotations.

import json
from collections.abc import Callable
from typing import Any, TypeVar

from fastapi import Request
from fastapi.concurrency import run_in_threadpool
from pydantic import BaseModel
from sqlalchemy.orm import Session

from tensafe import protocol as p
from tensafe.db import utcnow
from tensafe.protocol.wire import WireFormatError, message_bytes
from tensafe.server.deps import audit, own_model, require_usable
from tensafe.server.errors import BadRequestError
from tensafe.server.jobs import Worker, stage_payload, submit_future
from tensafe.server.models import FutureRow, TrainingModel
from tensafe.server.services import Services
from tensafe.server.states import ModelState
from tensafe.server.tenants import Principal

__all__ = [
    "PROTOBUF_BODY",
    "dump",
    "new_model_row",
    "protobuf_request",
    "submit_creation",
    "submit_model_body",
    "submit_model_request",
]

T = TypeVar("T")

#: OpenAPI description of a route whose body is an ``application/x-protobuf`` message.
PROTOBUF_BODY: dict[str, Any] = {
    "requestBody": {
        "required": True,
        "content": {"application/x-protobuf": {"schema": {"type": "string", "format": "binary"}}},
    }
}


def dump(value: Any) -> str:
    """The canonical JSON text of ``value`` (``{}`` for None), as the tables store it."""
    return json.dumps(value if value is not None else {}, sort_keys=True)


def new_model_row(
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
        user_metadata=dump(body.user_metadata),
        state=ModelState.CREATING,
        created_at=now,
        last_request_time=now,
        dp_policy=dp_policy,
        ledger_id=ledger_id,
        step=0,
    )


def submit_model_request(
    services: Services,
    worker: Worker,
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
        require_usable(own_model(session, who, model_id))
    # Stage training data in the encrypted store before taking the database write lock.
    services.store.ensure_key(who.tenant)
    staged = None if data is None else stage_payload(services, who.tenant, data)
    with services.sessions.begin() as session:
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
                services,
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


def submit_model_body(
    services: Services, worker: Worker, who: Principal, body: Any, request_type: str, **details: Any
) -> p.UntypedFuture:
    """:func:`submit_model_request` for a JSON body with ``model_id`` and ``seq_id``; the rest of
    the body (without ``type``) is the job's payload."""
    assert isinstance(body, BaseModel)
    payload = body.model_dump(mode="json", exclude_none=True, exclude={"type", "model_id", "seq_id"})
    return submit_model_request(
        services,
        worker,
        who,
        model_id=body.model_id,  # type: ignore[attr-defined]
        seq_id=body.seq_id,  # type: ignore[attr-defined]
        request_type=request_type,
        payload=payload,
        **details,
    )


def submit_creation(
    services: Services,
    session: Session,
    who: Principal,
    *,
    request_type: str,
    model_id: str,
    payload: dict[str, Any],
    row: Callable[[], TrainingModel],
    **details: Any,
) -> FutureRow:
    """Queue the creation of training model ``model_id`` (its ``seq_id`` 0) in ``session``.

    A new request also adds the model's row (``row()``, state ``creating``) and the audit
    record ``api.<request_type>``; a re-submission returns the existing future.
    """
    future, created = submit_future(
        services,
        session,
        tenant=who.tenant,
        actor=who.actor,
        request_type=request_type,
        model_id=model_id,
        seq_id=0,
        payload=payload,
    )
    if created:
        session.add(row())
        session.flush()
        audit(
            services,
            session,
            who,
            f"api.{request_type}",
            model_id,
            request_id=future.id,
            request_digest=future.request_sha256,
            **details,
        )
    return future


async def protobuf_request(request: Request, route: str, submit: Callable[[bytes], T]) -> T:
    """Read an ``application/x-protobuf`` body and run ``submit`` on its plain bytes in a thread.

    ``submit`` decodes the message; a :class:`~tensafe.protocol.wire.WireFormatError` it
    raises (or a bad ``Content-Encoding``) is a 400 that names the problem.
    """
    if "application/x-protobuf" not in request.headers.get("content-type", ""):
        raise BadRequestError(f"{route} takes an application/x-protobuf body")
    body = await request.body()

    def run() -> T:
        try:
            plain = message_bytes(body, request.headers.get("content-encoding"))
            return submit(plain)
        except WireFormatError as exc:
            raise BadRequestError(str(exc)) from None

    return await run_in_threadpool(run)
