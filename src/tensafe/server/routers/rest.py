"""The REST listings: capabilities, training runs, checkpoints, sessions; deleting a checkpoint."""

# No "from __future__ import annotations": FastAPI evaluates the annotations.

import json

from fastapi import APIRouter
from sqlalchemy import func, select
from sqlalchemy.orm import Session

from tensafe import protocol as p
from tensafe.protocol import InvalidTinkerPathError, TinkerPath
from tensafe.server.checkpoints import (
    checkpoint_is_live,
    checkpoint_view,
    delete_checkpoint_artifacts,
    str_metadata,
)
from tensafe.server.deps import (
    Caller,
    Page20,
    Page100,
    Svc,
    audit,
    own_live_checkpoint,
    own_model,
    own_session,
)
from tensafe.server.errors import BadRequestError
from tensafe.server.models import SamplingSessionRow, ServerSession, TrainingCheckpoint, TrainingModel
from tensafe.server.states import ModelState

__all__ = ["router"]

router = APIRouter(prefix="/api/v1", tags=["rest"])


@router.get("/get_server_capabilities")
def capabilities(who: Caller, services: Svc) -> p.ServerCapabilities:
    """Base models this server serves."""
    return p.ServerCapabilities(
        supported_models=[
            p.SupportedModel(model_name=name, trainable=True, sampleable=True)
            for name in sorted(services.catalog.entries)
        ]
    )


def _run_view(session: Session, row: TrainingModel) -> p.TrainingRun:
    last: dict[str, p.Checkpoint | None] = {"weights": None, "sampler_weights": None}
    for kind in last:
        ck = session.execute(
            select(TrainingCheckpoint)
            .where(
                TrainingCheckpoint.model_id == row.id, TrainingCheckpoint.kind == kind, checkpoint_is_live()
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
        corrupted=row.state == ModelState.FAILED,
        lora_rank=row.lora_rank,
        last_checkpoint=last["weights"],
        last_sampler_checkpoint=last["sampler_weights"],
        user_metadata=str_metadata(row.user_metadata),
    )


@router.get("/training_runs")
def training_runs(
    who: Caller, services: Svc, page: Page20, access_scope: str = "owned", project_id: str | None = None
) -> p.TrainingRunsResponse:
    """The tenant's training runs, newest first."""
    with services.sessions() as session:
        query = select(TrainingModel).where(TrainingModel.tenant_id == who.tenant)
        if project_id is not None:
            query = query.join(ServerSession, ServerSession.id == TrainingModel.session_id).where(
                ServerSession.project_id == project_id
            )
        total = session.execute(select(func.count()).select_from(query.subquery())).scalar_one()
        rows = session.execute(page.of(query.order_by(TrainingModel.created_at.desc(), TrainingModel.id)))
        runs = [_run_view(session, row) for row in rows.scalars()]
    return p.TrainingRunsResponse(training_runs=runs, cursor=page.cursor(total))


@router.get("/training_runs/{run_id}")
def training_run(run_id: str, who: Caller, services: Svc, access_scope: str = "owned") -> p.TrainingRun:
    """One training run of the tenant."""
    with services.sessions() as session:
        return _run_view(session, own_model(session, who, run_id))


@router.get("/training_runs/{run_id}/checkpoints")
def run_checkpoints(run_id: str, who: Caller, services: Svc) -> p.CheckpointsListResponse:
    """Checkpoints of one training run."""
    with services.sessions() as session:
        own_model(session, who, run_id)
        rows = session.execute(
            select(TrainingCheckpoint)
            .where(TrainingCheckpoint.model_id == run_id, TrainingCheckpoint.tenant_id == who.tenant)
            .where(checkpoint_is_live())
            .order_by(TrainingCheckpoint.created_at)
        ).scalars()
        return p.CheckpointsListResponse(checkpoints=[checkpoint_view(r) for r in rows])


@router.get("/checkpoints")
def all_checkpoints(who: Caller, services: Svc, page: Page100) -> p.CheckpointsListResponse:
    """Checkpoints across the tenant's runs, newest first."""
    with services.sessions() as session:
        query = select(TrainingCheckpoint).where(
            TrainingCheckpoint.tenant_id == who.tenant, checkpoint_is_live()
        )
        total = session.execute(select(func.count()).select_from(query.subquery())).scalar_one()
        rows = session.execute(page.of(query.order_by(TrainingCheckpoint.created_at.desc()))).scalars()
        return p.CheckpointsListResponse(
            checkpoints=[checkpoint_view(r) for r in rows], cursor=page.cursor(total)
        )


@router.delete("/training_runs/{run_id}/checkpoints/{checkpoint_id:path}")
def delete_checkpoint(run_id: str, checkpoint_id: str, who: Caller, services: Svc) -> dict[str, str]:
    """Delete a checkpoint and its encrypted files."""
    try:
        path = TinkerPath.from_checkpoint_id(run_id, checkpoint_id)
    except InvalidTinkerPathError as exc:
        raise BadRequestError(str(exc)) from None
    with services.sessions.begin() as session:
        row = own_live_checkpoint(session, who, path)
        ref = row.artifact_id
        session.delete(row)
        audit(services, session, who, "api.delete_checkpoint", str(path), artifact=ref or "")
    delete_checkpoint_artifacts(services.store, who.tenant, ref)
    return {"status": "deleted"}


@router.get("/sessions")
def list_sessions(
    who: Caller, services: Svc, page: Page20, access_scope: str = "owned"
) -> p.ListSessionsResponse:
    """The tenant's session ids, newest first."""
    with services.sessions() as session:
        rows = session.execute(
            page.of(
                select(ServerSession.id)
                .where(ServerSession.tenant_id == who.tenant)
                .order_by(ServerSession.created_at.desc(), ServerSession.id)
            )
        ).scalars()
        return p.ListSessionsResponse(sessions=list(rows))


@router.get("/sessions/{session_id}")
def get_session(
    session_id: str, who: Caller, services: Svc, access_scope: str = "owned"
) -> p.GetSessionResponse:
    """One session: its training runs."""
    with services.sessions() as session:
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
