"""TenSafe-specific REST endpoints under ``/api/v1/tensafe/`` (not part of Tinker's protocol).

* ``GET /api/v1/tensafe/audit/records?limit=N``: the newest records of the caller's
  audit chain.
* ``GET /api/v1/tensafe/audit/verify``: the server verifies the caller's chain and its
  signed checkpoints.
* ``GET /api/v1/tensafe/artifacts?limit=&offset=``: the caller's encrypted artifacts
  and what references each one.
* ``GET /api/v1/tensafe/training_runs/{id}/privacy`` and ``.../certificate``: the privacy
  budget and DP certificate of a run.

Every endpoint is scoped to the caller's tenant: another tenant's run is a 404, the same
answer as a run that does not exist.
"""

# No "from __future__ import annotations": FastAPI evaluates the annotations.

import datetime as _dt
import json
from typing import Annotated, Any

from fastapi import APIRouter, Query
from pydantic import BaseModel, ConfigDict, Field
from sqlalchemy import select
from sqlalchemy.orm import Session

from tensafe.audit import AuditVerificationError, latest_records, verify_chain
from tensafe.audit.models import AuditChainHead
from tensafe.server.deps import Caller, Svc
from tensafe.server.errors import NotFoundError
from tensafe.server.jobs import Services
from tensafe.server.models import FutureRow, TrainingCheckpoint, TrainingModel
from tensafe.server.tenants import Principal

__all__ = [
    "ArtifactInfo",
    "ArtifactsResponse",
    "AuditRecordView",
    "AuditRecordsResponse",
    "AuditVerification",
    "PrivacyReport",
    "PrivacyUnavailableError",
    "router",
]


class _Response(BaseModel):
    model_config = ConfigDict(extra="ignore", protected_namespaces=())


class AuditRecordView(_Response):
    """One audit record (see ``docs/audit.md``)."""

    seq: int
    timestamp: str
    actor: str
    action: str
    resource: str
    details: dict[str, Any]
    prev_hash: str
    record_hash: str
    format: str


class AuditRecordsResponse(_Response):
    """The newest records of the tenant's chain, oldest first."""

    records: list[AuditRecordView]
    total_count: int


class AuditVerification(_Response):
    """The outcome of verifying the tenant's chain."""

    verified: bool
    length: int = 0
    head_hash: str | None = None
    checkpoints: int = 0
    signed_length: int = 0
    unsigned_tail: int = 0
    reason: str | None = None


class ArtifactInfo(_Response):
    """An artifact of the encrypted store and what references it."""

    artifact_id: str
    role: str
    request_id: str | None = None
    training_run_id: str | None = None
    tinker_path: str | None = None
    size_bytes: int | None = None
    created_at: _dt.datetime | None = None


class ArtifactsResponse(_Response):
    """A page of the tenant's artifacts."""

    artifacts: list[ArtifactInfo]
    total_count: int


class PrivacyReport(_Response):
    """The privacy budget of a run."""

    training_run_id: str
    dp_enabled: bool = True
    epsilon_spent: float | None = None
    target_epsilon: float | None = None
    delta: float | None = None
    accountant: str | None = None
    steps: int = 0
    noise_multiplier: float | None = None
    max_grad_norm: float | None = None
    sampling: str | None = None
    extra: dict[str, Any] | None = Field(default=None)


class PrivacyUnavailableError(NotFoundError):
    """The server does not record privacy state for this run (yet)."""

    error = "privacy_unavailable"


router = APIRouter(prefix="/api/v1/tensafe", tags=["tensafe"])


def _own_run(session: Session, who: Principal, run_id: str) -> TrainingModel:
    row = session.get(TrainingModel, run_id)
    if row is None or row.tenant_id != who.tenant:
        raise NotFoundError(f"unknown training run {run_id!r}")
    return row


@router.get("/audit/records")
def audit_records(
    who: Caller, services: Svc, limit: Annotated[int, Query(ge=1, le=1000)] = 100
) -> AuditRecordsResponse:
    """The newest ``limit`` records of the caller's audit chain, oldest first."""
    with services.sessions() as session:
        records = latest_records(session, tenant=who.tenant, limit=limit)
        total = session.execute(
            select(AuditChainHead.length).where(AuditChainHead.tenant_id == who.tenant)
        ).scalar_one_or_none()
    return AuditRecordsResponse(
        records=[
            AuditRecordView(
                seq=r.seq,
                timestamp=r.timestamp,
                actor=r.actor,
                action=r.action,
                resource=r.resource,
                details=dict(r.details),
                prev_hash=r.prev_hash,
                record_hash=r.record_hash,
                format=r.format,
            )
            for r in records
        ],
        total_count=int(total or 0),
    )


@router.get("/audit/verify")
def audit_verify(who: Caller, services: Svc) -> AuditVerification:
    """Verify the caller's chain: hashes, links and signed checkpoints.

    Records after the newest checkpoint are accepted (``unsigned_tail``): they are
    protected by the hash chain and get signed at the next checkpoint.
    """
    if services.signer is None:
        return AuditVerification(
            verified=False, reason="this server has no checkpoint signing key; signatures cannot be checked"
        )
    try:
        with services.sessions() as session:
            report = verify_chain(
                session,
                tenant=who.tenant,
                verifying_key=services.signer.verifying_key(),
                allow_unsigned_tail=True,
            )
    except AuditVerificationError as exc:
        return AuditVerification(verified=False, reason=str(exc))
    return AuditVerification(
        verified=True,
        length=report.length,
        head_hash=report.head_hash,
        checkpoints=report.checkpoints,
        signed_length=report.signed_length,
        unsigned_tail=report.unsigned_tail,
    )


@router.get("/artifacts")
def artifacts(
    who: Caller,
    services: Svc,
    limit: Annotated[int, Query(ge=1, le=1000)] = 100,
    offset: Annotated[int, Query(ge=0)] = 0,
) -> ArtifactsResponse:
    """The caller's encrypted artifacts, newest first, with what references each one."""
    found: dict[str, ArtifactInfo] = {}
    with services.sessions() as session:
        for ck in session.execute(
            select(TrainingCheckpoint).where(TrainingCheckpoint.tenant_id == who.tenant)
        ).scalars():
            if ck.artifact_id:
                found[ck.artifact_id] = ArtifactInfo(
                    artifact_id=ck.artifact_id,
                    role="checkpoint",
                    training_run_id=ck.model_id,
                    tinker_path=f"tinker://{ck.model_id}/{ck.kind}/{ck.name}",
                    size_bytes=ck.size_bytes,
                    created_at=ck.created_at,
                )
        for run_id, state_ref, updated in session.execute(
            select(TrainingModel.id, TrainingModel.state_ref, TrainingModel.last_request_time).where(
                TrainingModel.tenant_id == who.tenant, TrainingModel.state_ref.is_not(None)
            )
        ).all():
            if state_ref is None:
                continue
            found[state_ref] = ArtifactInfo(
                artifact_id=state_ref, role="training_state", training_run_id=run_id, created_at=updated
            )
        rows = session.execute(
            select(
                FutureRow.id,
                FutureRow.model_id,
                FutureRow.payload_ref,
                FutureRow.result_ref,
                FutureRow.created_at,
            ).where(
                FutureRow.tenant_id == who.tenant,
                (FutureRow.payload_ref.is_not(None)) | (FutureRow.result_ref.is_not(None)),
            )
        ).all()
        for future_id, model_id, payload_ref, result_ref, created_at in rows:
            for ref, role in ((payload_ref, "request_payload"), (result_ref, "result")):
                if ref and ref not in found:
                    found[ref] = ArtifactInfo(
                        artifact_id=ref,
                        role=role,
                        request_id=future_id,
                        training_run_id=model_id,
                        created_at=created_at,
                    )
    for artifact_id in services.store.list(who.tenant):
        found.setdefault(artifact_id, ArtifactInfo(artifact_id=artifact_id, role="other"))
    epoch = _dt.datetime.min.replace(tzinfo=_dt.UTC)
    ordered = sorted(found.values(), key=lambda a: (a.created_at or epoch, a.artifact_id), reverse=True)
    return ArtifactsResponse(artifacts=ordered[offset : offset + limit], total_count=len(ordered))


_State = tuple[dict[str, Any] | None, str, dict[str, Any], dict[str, Any] | None]


def _privacy_state(run: TrainingModel) -> _State | None:
    """The run's effective DP policy (None: non-private), its source, the privacy spent and
    the certificate the engine issued at the last completed step (if it recorded one).

    ``training_models.privacy_spent`` holds ``{"spent": {...}, "certificate": {...} | null}``
    (a bare ``{...}`` summary is read too). ``None`` when the run has no recorded policy
    (created before migration 0004).
    """
    if not run.dp_policy:
        return None
    data = json.loads(run.dp_policy)
    policy = data.get("policy")
    record = json.loads(run.privacy_spent) if run.privacy_spent else {}
    record = record if isinstance(record, dict) else {}
    spent = record.get("spent", record)
    cert = record.get("certificate")
    return (
        policy if isinstance(policy, dict) else None,
        str(data.get("source", "")),
        dict(spent) if isinstance(spent, dict) else {},
        cert if isinstance(cert, dict) else None,
    )


def _load_state(services: Services, who: Principal, run_id: str) -> tuple[TrainingModel, _State]:
    with services.sessions() as session:
        run = _own_run(session, who, run_id)
    state = _privacy_state(run)
    if state is None:
        raise PrivacyUnavailableError(f"run {run_id!r} has no recorded privacy policy (created before 0004)")
    return run, state


@router.get("/training_runs/{run_id}/privacy")
def privacy(run_id: str, who: Caller, services: Svc) -> PrivacyReport:
    """ε spent, target ε, δ, accountant and steps of one run."""
    run, (policy, source, spent, _cert) = _load_state(services, who, run_id)
    steps = int(run.step or spent.get("steps") or 0)
    extra = {
        "policy_source": source,
        "sample_rate": spent.get("sample_rate"),
        "dataset_size": spent.get("dataset_size"),
        "expected_batch_size": (policy or {}).get("expected_batch_size"),
        "max_steps": (policy or {}).get("max_steps"),
    }
    if policy is None:
        return PrivacyReport(training_run_id=run_id, dp_enabled=False, steps=steps, extra=extra)
    return PrivacyReport(
        training_run_id=run_id,
        dp_enabled=True,
        epsilon_spent=float(spent.get("epsilon") or 0.0),
        target_epsilon=policy.get("target_epsilon"),
        delta=policy.get("delta"),
        accountant=policy.get("accountant"),
        steps=steps,
        noise_multiplier=spent.get("noise_multiplier", policy.get("noise_multiplier")),
        max_grad_norm=policy.get("clip_norm"),
        sampling=policy.get("sampling"),
        extra=extra,
    )


@router.get("/training_runs/{run_id}/certificate")
def certificate(run_id: str, who: Caller, services: Svc) -> dict[str, Any]:
    """The DP certificate of one run.

    This is the certificate the engine issued at the run's last completed step, as the
    server persisted it. Without one (an older record), a certificate is issued now from
    the persisted accounting state: the accountant recomputes ε
    (``tensafe.privacy.DpCertificate.issue``) from the noise multiplier, sampling rate,
    steps and δ recorded at the last ``optim_step``.
    """
    from tensafe.privacy import CertificateError, DpCertificate, SamplingMethod

    run, (policy, _source, spent, recorded) = _load_state(services, who, run_id)
    if recorded is not None:
        return recorded
    steps = int(spent.get("steps") or run.step or 0)
    notes = (
        "The privacy unit is one Datum of forward_backward.",
        f"Issued by the API server from the run's persisted accounting state after {steps} steps.",
    )
    try:
        if policy is None:
            cert = DpCertificate.non_private(
                steps=steps,
                dataset_size=1,
                expected_batch_size=None,
                sample_rate=None,
                sampling_method=SamplingMethod.CLIENT_CHOSEN_BATCHES,
                sampling_performed_by_engine=False,
                notes=(*notes, "The server does not record the data set size of non-private runs."),
            )
        else:
            if spent.get("noise_multiplier") is None or spent.get("sample_rate") is None:
                raise PrivacyUnavailableError(
                    f"run {run_id!r} has no accounting state yet: its first forward_backward/optim_step "
                    "fixes the noise and sampling rate"
                )
            poisson = policy.get("sampling") == "server_poisson"
            cert = DpCertificate.issue(
                accountant=str(policy["accountant"]),
                noise_multiplier=float(spent["noise_multiplier"]),
                clip_norm=float(policy["clip_norm"]),
                sample_rate=float(spent["sample_rate"]),
                steps=steps,
                delta=float(policy["delta"]),
                dataset_size=int(spent["dataset_size"]),
                expected_batch_size=policy.get("expected_batch_size"),
                sampling_method=SamplingMethod.POISSON if poisson else SamplingMethod.CLIENT_CHOSEN_BATCHES,
                sampling_performed_by_engine=poisson,
                notes=notes,
            )
    except CertificateError as exc:
        raise PrivacyUnavailableError(f"cannot issue a certificate for run {run_id!r}: {exc}") from None
    result: dict[str, Any] = cert.to_dict()
    return result
