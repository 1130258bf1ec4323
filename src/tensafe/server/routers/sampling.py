"""Sampling: ``create_sampling_session``, ``samplers/{id}``, ``asample`` (``sample`` and
``compute_logprobs``: a future whose result is a protobuf ``SampleResponse``)."""

# No "from __future__ import annotations": FastAPI evaluates the annotations.

import json

from fastapi import APIRouter

from tensafe import protocol as p
from tensafe.db import utcnow
from tensafe.server.deps import Caller, Jobs, Svc, audit, own_checkpoint, own_sampler, own_session_row
from tensafe.server.errors import BadRequestError
from tensafe.server.external_weights import check_sampleable
from tensafe.server.models import SamplingSessionRow, TrainingModel
from tensafe.server.ops import _UNSUPPORTED_SAMPLE_KNOBS
from tensafe.server.routers._common import Submission, submit_request

__all__ = ["router"]

router = APIRouter(prefix="/api/v1", tags=["sampling"])


@router.post("/create_sampling_session")
def create_sampling_session(
    body: p.CreateSamplingSessionRequest, who: Caller, services: Svc
) -> p.CreateSamplingSessionResponse:
    """A sampling session on a base model or on ``sampler_weights`` (direct, not a future)."""
    sampler_id = f"{body.session_id}:sample:{body.sampling_session_seq_id}"
    with services.sessions.begin() as session:
        existing = own_session_row(session, who, SamplingSessionRow, body.session_id, sampler_id)
        if existing is not None:
            if existing.model_path == body.model_path and (
                body.base_model is None or body.base_model == existing.base_model
            ):
                return p.CreateSamplingSessionResponse(sampling_session_id=sampler_id)
            raise BadRequestError(f"sampling session {sampler_id!r} already exists with other weights")
        ref = None
        if body.model_path is not None:
            ckpt = own_checkpoint(session, who, body.model_path)
            check_sampleable(session, ckpt, path=body.model_path)
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
        audit(
            services,
            session,
            who,
            "api.create_sampling_session",
            sampler_id,
            model_path=body.model_path or "",
        )
    return p.CreateSamplingSessionResponse(sampling_session_id=sampler_id)


@router.get("/samplers/{sampler_id}")
def get_sampler(sampler_id: str, who: Caller, services: Svc) -> p.SamplerInfo:
    """The base model (and weights path) of a sampling session."""
    with services.sessions() as session:
        row = own_sampler(session, who, sampler_id)
        return p.SamplerInfo(sampler_id=row.id, base_model=row.base_model, model_path=row.model_path)


@router.post("/asample")
def asample(body: p.SampleRequest, who: Caller, services: Svc, worker: Jobs) -> p.UntypedFuture:
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
    with services.sessions() as session:
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
    request = Submission(
        "sample",
        body.sampling_session_id,
        model_id=None,  # an unordered request
        seq_id=None,
        payload=payload,
        details={"num_samples": body.num_samples},
        data=json.dumps(tokens).encode(),
    )
    future = submit_request(services, worker, who, request)
    ids = [f"{body.sampling_session_id}:{body.seq_id}:{i}" for i in range(body.num_samples)]
    return p.UntypedFuture(request_id=future.id, sample_sequence_ids=ids)
