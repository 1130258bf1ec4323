"""Helpers shared by the routers: queueing a request (audited, de-duplicated), creating a model,
protobuf bodies."""

# No "from __future__ import annotations": FastAPI evaluates the annotations.

import json
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from typing import Any, TypeVar

from fastapi import Request
from fastapi.concurrency import run_in_threadpool
from pydantic import BaseModel
from sqlalchemy.orm import Session

from tensafe import protocol as p
from tensafe.db import utcnow
from tensafe.protocol.wire import WireFormatError, message_bytes
from tensafe.server.deps import audit, own_model, own_session_row, require_trainable
from tensafe.server.errors import BadRequestError
from tensafe.server.jobs import StagedPayload, Worker, stage_payload, submit_future
from tensafe.server.models import FutureRow, TrainingModel
from tensafe.server.privacy import EffectivePolicy
from tensafe.server.services import Services
from tensafe.server.states import ModelState
from tensafe.server.tenants import Principal

__all__ = [
    "PROTOBUF_BODY",
    "NewModel",
    "Submission",
    "dump",
    "protobuf_request",
    "queue_request",
    "submit_creation",
    "submit_model_body",
    "submit_model_message",
    "submit_model_request",
    "submit_request",
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


@dataclass(frozen=True)
class Submission:
    """A request to queue as a durable future.

    Attributes:
        request_type: The operation that executes it (:mod:`tensafe.server.ops`); its audit
            record is ``api.<request_type>``.
        resource: What the audit record names (the model, the sampling session).
        model_id, seq_id: The order and de-duplication key (both None: an unordered request).
        payload: The job's non-sensitive JSON parameters.
        details: More details of the audit record.
        data: The request's sensitive bytes (training data, a prompt), stored only encrypted.
    """

    request_type: str
    resource: str
    model_id: str | None
    seq_id: int | None
    payload: dict[str, Any]
    details: Mapping[str, Any] = field(default_factory=dict)
    data: bytes | None = None


def queue_request(
    services: Services,
    session: Session,
    who: Principal,
    request: Submission,
    *,
    staged: StagedPayload | None = None,
    on_new: Callable[[], object] | None = None,
) -> FutureRow:
    """Record ``request`` as a queued future in ``session``'s transaction
    (:func:`~tensafe.server.jobs.submit_future`, de-duplicated by ``(model_id, seq_id)``).

    A new request first runs ``on_new()`` (its other changes, in the same transaction), then
    appends its audit record with the future's id and the request digest. A re-submission
    returns the existing future and changes nothing. ``staged`` is ``request.data`` as
    :func:`~tensafe.server.jobs.stage_payload` encrypted it.
    """
    future, created = submit_future(
        services,
        session,
        tenant=who.tenant,
        actor=who.actor,
        request_type=request.request_type,
        model_id=request.model_id,
        seq_id=request.seq_id,
        payload=request.payload,
        payload_bytes=request.data,
        staged=staged,
    )
    if created:
        if on_new is not None:
            on_new()
        audit(
            services,
            session,
            who,
            f"api.{request.request_type}",
            request.resource,
            request_id=future.id,
            request_digest=future.request_sha256,
            **request.details,
        )
    return future


def submit_request(
    services: Services,
    worker: Worker,
    who: Principal,
    request: Submission,
    *,
    on_new: Callable[[Session], object] | None = None,
) -> FutureRow:
    """:func:`queue_request` in a transaction of its own, then wake the worker.

    ``request.data`` is staged in the encrypted store first, before the transaction takes
    the database write lock.
    """
    services.store.ensure_key(who.tenant)  # the request digest needs the tenant's key
    staged = None if request.data is None else stage_payload(services, who.tenant, request.data)
    with services.sessions.begin() as session:
        hook = None if on_new is None else lambda: on_new(session)
        future = queue_request(services, session, who, request, staged=staged, on_new=hook)
    worker.wake()
    return future


def _touch(session: Session, model_id: str) -> None:
    model = session.get(TrainingModel, model_id)
    if model is not None:
        model.last_request_time = utcnow()


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
    """Queue a request of a training model, in order, de-duplicated by ``(model_id, seq_id)``.

    The model must be the caller's and usable; a new request updates its
    ``last_request_time`` and is audited with its ``seq_id`` and ``details``.
    """
    if seq_id < 1:
        raise BadRequestError("seq_id must be at least 1 (0 is the model's creation)")
    with services.reads() as session:
        require_trainable(own_model(session, who, model_id))
    audited = {"seq_id": seq_id, **details}
    # The audited resource is the model.
    request = Submission(request_type, model_id, model_id, seq_id, payload, audited, data)
    future = submit_request(services, worker, who, request, on_new=lambda session: _touch(session, model_id))
    return p.UntypedFuture(request_id=future.id, model_id=model_id)


def submit_model_body(
    services: Services,
    worker: Worker,
    who: Principal,
    body: Any,
    request_type: str,
    *,
    exclude: frozenset[str] = frozenset(),
    **details: Any,
) -> p.UntypedFuture:
    """:func:`submit_model_request` for a JSON body with ``model_id`` and ``seq_id``; the rest of
    the body (without ``type`` and the fields in ``exclude``) is the job's payload."""
    assert isinstance(body, BaseModel)
    payload = body.model_dump(
        mode="json", exclude_none=True, exclude={"type", "model_id", "seq_id", *exclude}
    )
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


def submit_model_message(
    services: Services,
    worker: Worker,
    who: Principal,
    message: Any,
    plain: bytes,
    request_type: str,
    payload: dict[str, Any],
    **details: Any,
) -> p.UntypedFuture:
    """:func:`submit_model_request` for a decoded protobuf ``message`` (its ``model_id`` and
    ``seq_id``) whose ``plain`` bytes are the job's sensitive payload."""
    return submit_model_request(
        services,
        worker,
        who,
        model_id=message.model_id,
        seq_id=message.seq_id,
        request_type=request_type,
        payload=payload,
        data=plain,
        **details,
    )


@dataclass(frozen=True)
class NewModel:
    """What a creating route decided, in the creating transaction, about the model it creates.

    Attributes:
        base_model, lora_rank, lora_config, optimizer_config: The model row's columns (the
            configurations as canonical JSON text).
        policy: The run's effective DP policy.
        ledger: Returns the privacy ledger the run spends from; called only for a new model
            under a DP policy.
        details: The details of the audit record ``api.<request_type>``.
    """

    base_model: str
    lora_rank: int | None
    lora_config: str
    optimizer_config: str
    policy: EffectivePolicy
    ledger: Callable[[], str]
    details: dict[str, Any]


def submit_creation(
    services: Services,
    worker: Worker,
    who: Principal,
    body: Any,
    *,
    request_type: str,
    payload: dict[str, Any],
    prepare: Callable[[Session], NewModel],
) -> p.UntypedFuture:
    """Queue the creation of training model ``{body.session_id}:train:{body.model_seq_id}``
    (its ``seq_id`` 0), for ``create_model`` and create-via-``load_weights``.

    In one transaction: the client session must be the caller's, ``prepare(session)`` runs
    the route's own checks and says what to create, and a new request adds the model's row
    (state ``creating``) and the audit record ``api.<request_type>``; a re-submission returns
    the existing future. ``body`` also carries ``user_metadata``.
    """
    model_id = p.model_id_for(body.session_id, body.model_seq_id)
    services.store.ensure_key(who.tenant)  # the request digest needs the tenant's key
    with services.sessions.begin() as session:
        own_session_row(session, who, TrainingModel, body.session_id, model_id)
        new = prepare(session)

        def add_row() -> None:
            now = utcnow()
            row = TrainingModel(
                id=model_id,
                tenant_id=who.tenant,
                session_id=body.session_id,
                model_seq_id=body.model_seq_id,
                user_metadata=dump(body.user_metadata),
                state=ModelState.CREATING,
                created_at=now,
                last_request_time=now,
                step=0,
                # What the route decided: the model, then its privacy.
                base_model=new.base_model,
                lora_rank=new.lora_rank,
                lora_config=new.lora_config,
                optimizer_config=new.optimizer_config,
                dp_policy=new.policy.to_json(),
                ledger_id=None if new.policy.policy is None else new.ledger(),
            )
            session.add(row)
            session.flush()

        # The audited resource is the model; its creation is its seq_id 0.
        request = Submission(request_type, model_id, model_id, 0, payload, new.details)
        future = queue_request(services, session, who, request, on_new=add_row)
    worker.wake()
    return p.UntypedFuture(request_id=future.id, model_id=model_id)


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
