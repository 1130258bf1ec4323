"""Weights: ``save_weights`` (``save_state``), ``save_weights_for_sampler``, ``load_weights``,
``weights_info``. Checkpoints are stored encrypted under the tenant's DEK."""

# No "from __future__ import annotations": FastAPI evaluates the annotations.

import json

from fastapi import APIRouter
from sqlalchemy.orm import Session

from tensafe import protocol as p
from tensafe.server.deps import Caller, Cfg, Jobs, Svc, own_checkpoint
from tensafe.server.errors import BadRequestError
from tensafe.server.external_weights import check_loadable
from tensafe.server.ledger import lineage_ledger
from tensafe.server.models import TrainingModel
from tensafe.server.privacy import effective_policy, tenant_row
from tensafe.server.routers._common import NewModel, submit_creation, submit_model_body

__all__ = ["router"]

router = APIRouter(prefix="/api/v1")


@router.post("/save_weights", tags=["weights"])
def save_weights(body: p.SaveWeightsRequest, who: Caller, services: Svc, worker: Jobs) -> p.UntypedFuture:
    """``save_state``: the full training state, encrypted, as ``tinker://<model>/weights/<path>``."""
    return submit_model_body(services, worker, who, body, "save_weights")


@router.post("/save_weights_for_sampler", tags=["weights"])
def save_weights_for_sampler(
    body: p.SaveWeightsForSamplerRequest, who: Caller, services: Svc, worker: Jobs
) -> p.UntypedFuture:
    """Sampler (PEFT adapter) weights: a named checkpoint or an ephemeral sampling session."""
    if body.path is None and body.sampling_session_seq_id is None:
        raise BadRequestError("save_weights_for_sampler needs a path or a sampling_session_seq_id")
    return submit_model_body(services, worker, who, body, "save_weights_for_sampler")


@router.post("/load_weights", tags=["weights"])
def load_weights(
    body: p.LoadWeightsRequest, who: Caller, services: Svc, settings: Cfg, worker: Jobs
) -> p.UntypedFuture:
    """Create a training model from a ``weights`` checkpoint (or load into an existing one)."""
    if body.optimizer_config is not None and body.optimizer_config.type != "adamw":
        raise BadRequestError(f"optimizer {body.optimizer_config.type!r} is not supported; use AdamW")
    if body.session_id is None or body.model_seq_id is None:
        if body.model_id is None or body.seq_id is None:
            raise BadRequestError("load_weights needs session_id and model_seq_id (or model_id and seq_id)")
        with services.sessions() as session:
            own_checkpoint(session, who, body.path)
        return submit_model_body(
            services, worker, who, body, "load_weights", exclude=frozenset({"weights_access_token"})
        )

    def prepare(session: Session) -> NewModel:
        ckpt = own_checkpoint(session, who, body.path)
        check_loadable(session, ckpt, path=body.path, optimizer=body.optimizer)
        source = session.get(TrainingModel, ckpt.model_id)
        assert source is not None
        if body.base_model is not None and body.base_model != source.base_model:
            raise BadRequestError(
                f"{body.path!r} was trained on {source.base_model!r}, not {body.base_model!r}"
            )
        return NewModel(
            base_model=source.base_model,
            lora_rank=source.lora_rank,
            lora_config=source.lora_config,
            optimizer_config=source.optimizer_config,
            policy=effective_policy(settings.privacy, tenant_row(session, who.tenant)),
            # The loaded state spends from the ledger of the run that saved it:
            # reloading or branching never resets the privacy spent on the data.
            ledger=lambda: lineage_ledger(session, source),
            details={"source_checkpoint": ckpt.id, "optimizer": body.optimizer},
        )

    payload = body.model_dump(
        mode="json", exclude_none=True, exclude={"type", "model_id", "seq_id", "weights_access_token"}
    )
    return submit_creation(
        services, worker, who, body, request_type="load_weights", payload=payload, prepare=prepare
    )


@router.post("/weights_info", tags=["rest"])
def weights_info(body: p.WeightsInfoRequest, who: Caller, services: Svc) -> p.WeightsInfoResponse:
    """What a checkpoint holds: base model and LoRA configuration."""
    with services.sessions() as session:
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
