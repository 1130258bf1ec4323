"""Training models: ``create_model``, ``get_info``, ``forward``/``forward_backward``, ``optim_step``,
and TenSafe's server-side Poisson sampling (``tensafe/register_dataset``, ``tensafe/train_step``).

Every request of a model is a durable future, queued in ``seq_id`` order
(:func:`tensafe.server.routers._common.submit_model_request`; a model's creation is its
``seq_id`` 0, :func:`~tensafe.server.routers._common.submit_creation`) and executed by the worker's
operation of the same name (:mod:`tensafe.server.ops`).
"""

# No "from __future__ import annotations": FastAPI evaluates the annotations.

import json

from fastapi import APIRouter, Request
from sqlalchemy.orm import Session

from tensafe import protocol as p
from tensafe.protocol.wire import decode_forward_backward_request
from tensafe.server.deps import Caller, Cfg, Jobs, Svc, own_model, require_usable
from tensafe.server.errors import BadRequestError
from tensafe.server.ledger import new_ledger
from tensafe.server.ops import MAX_DATASET_SIZE
from tensafe.server.privacy import EffectivePolicy, client_request, effective_policy, tenant_row
from tensafe.server.routers._common import (
    PROTOBUF_BODY,
    NewModel,
    dump,
    protobuf_request,
    submit_creation,
    submit_model_body,
    submit_model_message,
)
from tensafe.server.services import Services
from tensafe.server.tenants import Principal

__all__ = ["router"]

router = APIRouter(prefix="/api/v1")


@router.post("/create_model", tags=["training"])
def create_model(
    body: p.CreateModelRequest, who: Caller, services: Svc, settings: Cfg, worker: Jobs
) -> p.UntypedFuture:
    """Create a LoRA training model ``{session_id}:train:{model_seq_id}`` (a future)."""
    services.catalog.get(body.base_model)  # unknown models: 400 with a body, now
    if body.optimizer_config.type != "adamw":
        raise BadRequestError(f"optimizer {body.optimizer_config.type!r} is not supported; use AdamW")
    request = client_request(body.user_metadata)
    lora = body.lora_config

    def prepare(session: Session) -> NewModel:
        policy = effective_policy(settings.privacy, tenant_row(session, who.tenant), request)
        return NewModel(
            base_model=body.base_model,
            lora_rank=None if lora is None else lora.rank,
            lora_config=dump(None if lora is None else lora.model_dump(mode="json")),
            optimizer_config=dump(body.optimizer_config.model_dump(mode="json", exclude_none=True)),
            policy=policy,
            ledger=lambda: new_ledger(session, who.tenant),
            details={"base_model": body.base_model, "dp_policy": policy.to_json()},
        )

    payload = body.model_dump(mode="json", exclude_none=True, exclude={"type"})
    return submit_creation(
        services, worker, who, body, request_type="create_model", payload=payload, prepare=prepare
    )


@router.post("/get_info", tags=["training"])
def get_info(body: p.GetInfoRequest, who: Caller, services: Svc) -> p.GetInfoResponse:
    """Describe a training model (``model_data.tokenizer_id`` feeds ``get_tokenizer``)."""
    with services.sessions() as session:
        row = require_usable(own_model(session, who, body.model_id))
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


@router.post("/forward_backward", tags=["training"], openapi_extra=PROTOBUF_BODY)
async def forward_backward(request: Request, who: Caller, services: Svc, worker: Jobs) -> p.UntypedFuture:
    """Queue a forward/backward (or forward-only) pass: a protobuf body, a future."""

    def submit(plain: bytes) -> p.UntypedFuture:
        req = decode_forward_backward_request(plain)
        tokens = sum(int(d.tokens.size) for d in req.data)
        return submit_model_message(
            services,
            worker,
            who,
            req,
            plain,
            "forward" if req.forward_only else "forward_backward",
            {"loss_fn": req.loss_fn, "num_datums": len(req.data)},
            loss_fn=req.loss_fn,
            num_datums=len(req.data),
            num_tokens=tokens,
        )

    return await protobuf_request(request, "/forward_backward", submit)


@router.post("/optim_step", tags=["training"])
def optim_step(body: p.OptimStepRequest, who: Caller, services: Svc, worker: Jobs) -> p.UntypedFuture:
    """Queue an optimizer step (a future)."""
    return submit_model_body(services, worker, who, body, "optim_step")


# -- TenSafe: server-side Poisson sampling ----------------------------------------------------


def _require_server_sampling(services: Services, who: Principal, model_id: str) -> None:
    with services.sessions() as session:
        raw = own_model(session, who, model_id).dp_policy
    policy = EffectivePolicy.from_json(raw).policy if raw else None
    if policy is None or policy.sampling != "server_poisson":
        raise BadRequestError(
            f"model {model_id!r} does not use server-side sampling; create it with "
            "user_metadata tensafe.dp.sampling=server_poisson"
        )


@router.post("/tensafe/register_dataset", tags=["tensafe"], openapi_extra=PROTOBUF_BODY)
async def register_dataset(request: Request, who: Caller, services: Svc, worker: Jobs) -> p.UntypedFuture:
    """Register the training set of a ``server_poisson`` run (a future; once per run).

    The body is a ``ForwardBackwardRequest`` protobuf (the ``forward_backward``
    encoding; ``loss_fn`` and ``forward_only`` are ignored) whose ``data`` is the whole
    data set. It is kept only encrypted under the tenant's key, never in the database.
    """

    def submit(plain: bytes) -> p.UntypedFuture:
        req = decode_forward_backward_request(plain, max_datums=MAX_DATASET_SIZE)
        if not req.data:
            raise BadRequestError("register_dataset needs at least one example")
        _require_server_sampling(services, who, req.model_id)
        count = {"num_datums": len(req.data)}
        return submit_model_message(services, worker, who, req, plain, "register_dataset", count, **count)

    return await protobuf_request(request, "/tensafe/register_dataset", submit)


@router.post("/tensafe/train_step", tags=["tensafe"])
def train_step(body: p.TrainStepRequest, who: Caller, services: Svc, worker: Jobs) -> p.UntypedFuture:
    """Queue one server-sampled DP step: Poisson batch, forward_backward, optim_step (a future)."""
    _require_server_sampling(services, who, body.model_id)
    return submit_model_body(services, worker, who, body, "train_step", loss_fn=body.loss_fn)
