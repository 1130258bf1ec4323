"""TenSafe-specific REST endpoints under ``/api/v1/tensafe/`` (not part of Tinker's protocol).

Their wire models are :mod:`tensafe.protocol.tensafe`.

* ``GET /api/v1/tensafe/audit/records?limit=N``: the newest records of the caller's
  audit chain.
* ``GET /api/v1/tensafe/audit/head``: the newest signed checkpoint of the caller's chain
  (signed first if records follow it), for the client to keep as its *known head*.
* ``GET /api/v1/tensafe/audit/verify[?known_length=&known_head_hash=]``: the server
  verifies the caller's chain, its signed checkpoints and the checkpoint interval, and
  that the chain still contains the client's known head. Full verifications are bounded
  per tenant and per process (:mod:`tensafe.server.audit_verifications`).
* ``GET /api/v1/tensafe/artifacts?limit=&offset=``: the caller's encrypted artifacts
  and what references each one, paginated in SQL.
* ``GET /api/v1/tensafe/training_runs/{id}/privacy`` and ``.../certificate``: the privacy
  budget and DP certificate of a run.

Every endpoint is scoped to the caller's tenant: another tenant's run is a 404, the same
answer as a run that does not exist.
"""

# No "from __future__ import annotations": FastAPI evaluates the annotations.

import json
from typing import Annotated, Any

from fastapi import APIRouter, Query, Request
from sqlalchemy import BigInteger, String, cast, func, literal_column, null, select, union_all
from starlette.concurrency import run_in_threadpool

from tensafe.audit import (
    DEFAULT_CHECKPOINT_EVERY,
    AuditError,
    AuditVerificationError,
    VerificationReport,
    known_head_problem,
    latest_records,
    signed_head,
    verify_chain,
)
from tensafe.audit.bundle import checkpoint_json
from tensafe.audit.models import AuditChainHead
from tensafe.protocol import TinkerPath
from tensafe.protocol.tensafe import (
    ArtifactInfo,
    ArtifactsResponse,
    AuditHead,
    AuditRecordsResponse,
    AuditRecordView,
    AuditVerification,
    PrivacyReport,
)
from tensafe.server.audit_verifications import AuditVerifications
from tensafe.server.deps import Caller, Page100, Svc, own_model
from tensafe.server.errors import (
    BadRequestError,
    LedgerIntegrityError,
    NotFoundError,
    PrivacyUnavailableError,
)
from tensafe.server.ledger import audit_mismatch, ledger_events
from tensafe.server.models import FutureRow, TrainingCheckpoint, TrainingModel
from tensafe.server.services import Services
from tensafe.server.tenants import Principal

__all__ = ["router"]


router = APIRouter(prefix="/api/v1/tensafe", tags=["tensafe"])


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
        records=[AuditRecordView.model_validate(r.to_json()) for r in records],  # as in export bundles
        total_count=int(total or 0),
    )


def _interval(services: Services) -> int:
    return services.checkpoint_every or DEFAULT_CHECKPOINT_EVERY


def _verifications(request: Request, services: Services) -> AuditVerifications:
    """The application's :class:`AuditVerifications` (created on first use, per process)."""
    state = request.app.state
    found = getattr(state, "audit_verifications", None)
    if isinstance(found, AuditVerifications):
        return found
    settings = getattr(state, "settings", None)
    signer = services.signer
    assert signer is not None  # checked by the caller
    key = signer.verifying_key()

    def verify(tenant: str) -> VerificationReport:
        with services.reads() as session:
            return verify_chain(
                session,
                tenant=tenant,
                verifying_key=key,
                checkpoint_every=_interval(services),
                allow_unsigned_tail=True,
            )

    created = AuditVerifications(
        verify,
        interval_seconds=float(getattr(settings, "audit_verify_interval_seconds", 60.0)),
        concurrency=int(getattr(settings, "audit_verify_concurrency", 2)),
    )
    state.audit_verifications = created
    return created


@router.get("/audit/head")
def audit_head(who: Caller, services: Svc) -> AuditHead:
    """The newest signed checkpoint of the caller's chain, to keep as the known head.

    If records follow the newest checkpoint, one covering them is signed first (at most
    one per new record). Without a signing key the newest existing one is returned.
    """
    try:
        with services.sessions.begin() as session:
            head = signed_head(session, tenant=who.tenant, signer=services.signer).checkpoint
    except AuditError as exc:
        raise NotFoundError(str(exc)) from None
    return AuditHead.model_validate(checkpoint_json(head))  # exactly a head file


@router.get("/audit/verify")
async def audit_verify(
    request: Request,
    who: Caller,
    services: Svc,
    known_length: Annotated[int | None, Query(ge=0, le=2**53 - 1)] = None,
    known_head_hash: Annotated[str | None, Query(pattern="^[0-9a-f]{64}$")] = None,
) -> AuditVerification:
    """Verify the caller's chain: hashes, links, signed checkpoints, the checkpoint interval.

    Fewer than the interval of records after the newest checkpoint are accepted
    (``unsigned_tail``); more mean checkpoints were deleted. With ``known_length`` and
    ``known_head_hash`` (a head the client kept), the chain must also contain that head:
    shorter is a rollback, a different hash a rewrite. The full verification runs at most
    once per tenant per ``TS_AUDIT_VERIFY_INTERVAL_S``; the known head is compared on
    every call.
    """
    if (known_length is None) != (known_head_hash is None):
        raise BadRequestError("known_length and known_head_hash go together (both from the head you kept)")
    if services.signer is None:
        return AuditVerification(
            verified=False, reason="this server has no checkpoint signing key; signatures cannot be checked"
        )
    outcome, cached = await _verifications(request, services).outcome(who.tenant)
    reasons = [] if outcome.reason is None else [outcome.reason]
    if known_length is not None and known_head_hash is not None:
        problem = await run_in_threadpool(
            _known_head_problem, services, who.tenant, known_length, known_head_hash
        )
        if problem is not None:
            reasons.append(str(AuditVerificationError(problem, tenant=who.tenant)))
    report = outcome.report
    common: dict[str, Any] = {
        "checkpoint_every": _interval(services),
        "known_length": known_length,
        "cached": cached,
        "verified_at": outcome.verified_at,
    }
    if reasons or report is None:
        return AuditVerification(verified=False, reason="; ".join(reasons), **common)
    return AuditVerification(
        verified=True,
        length=report.length,
        head_hash=report.head_hash,
        checkpoints=report.checkpoints,
        signed_length=report.signed_length,
        unsigned_tail=report.unsigned_tail,
        **common,
    )


def _known_head_problem(services: Services, tenant: str, length: int, head_hash: str) -> str | None:
    with services.reads() as session:
        return known_head_problem(session, tenant=tenant, length=length, head_hash=head_hash)


def _artifact_rows(tenant: str) -> Any:
    """Every artifact reference of ``tenant`` as one ``UNION ALL`` subquery (not executed here).

    Columns: ``artifact_id, role, request_id, training_run_id, kind, name, size_bytes,
    created_at``. An artifact that is both a checkpoint and a run's training state is
    listed once, as ``training_state``.
    """
    text, size = String(200), BigInteger()
    states = select(TrainingModel.state_ref).where(
        TrainingModel.tenant_id == tenant, TrainingModel.state_ref.is_not(None)
    )
    checkpoints = select(
        TrainingCheckpoint.artifact_id.label("artifact_id"),
        literal_column("'checkpoint'", text).label("role"),
        cast(null(), text).label("request_id"),
        TrainingCheckpoint.model_id.label("training_run_id"),
        TrainingCheckpoint.kind.label("kind"),
        TrainingCheckpoint.name.label("name"),
        TrainingCheckpoint.size_bytes.label("size_bytes"),
        TrainingCheckpoint.created_at.label("created_at"),
    ).where(
        TrainingCheckpoint.tenant_id == tenant,
        TrainingCheckpoint.artifact_id.is_not(None),
        TrainingCheckpoint.artifact_id.not_in(states),
    )
    training_states = select(
        TrainingModel.state_ref,
        literal_column("'training_state'", text),
        cast(null(), text),
        TrainingModel.id,
        cast(null(), text),
        cast(null(), text),
        cast(null(), size),
        TrainingModel.last_request_time,
    ).where(TrainingModel.tenant_id == tenant, TrainingModel.state_ref.is_not(None))
    futures = [
        select(
            ref,
            literal_column(f"'{role}'", text),
            FutureRow.id,
            FutureRow.model_id,
            cast(null(), text),
            cast(null(), text),
            cast(null(), size),
            FutureRow.created_at,
        ).where(FutureRow.tenant_id == tenant, ref.is_not(None))
        for ref, role in ((FutureRow.payload_ref, "request_payload"), (FutureRow.result_ref, "result"))
    ]
    return union_all(checkpoints, training_states, *futures).subquery("artifacts")


@router.get("/artifacts")
def artifacts(who: Caller, services: Svc, page: Page100) -> ArtifactsResponse:
    """The caller's encrypted artifacts, newest first, with what references each one.

    Paginated in the database: each call runs two queries (the page, ordered by
    ``created_at`` then ``artifact_id``, and the count) and builds at most ``limit``
    entries, however many artifacts the tenant has. The store's directory is not listed:
    only artifacts the database refers to appear (blobs of an exported checkpoint,
    ``<artifact>.<n>``, belong to its ``checkpoint`` entry).
    """
    rows = _artifact_rows(who.tenant)
    with services.reads() as session:
        found = session.execute(
            page.of(select(rows).order_by(rows.c.created_at.desc(), rows.c.artifact_id.desc()))
        ).all()
        total = session.execute(select(func.count()).select_from(rows)).scalar_one()
    return ArtifactsResponse(
        artifacts=[
            ArtifactInfo(
                artifact_id=row.artifact_id,
                role=row.role,
                request_id=row.request_id,
                training_run_id=row.training_run_id,
                tinker_path=(
                    str(TinkerPath(run_id=row.training_run_id, kind=row.kind, name=row.name))
                    if row.role == "checkpoint"
                    else None
                ),
                size_bytes=row.size_bytes,
                created_at=row.created_at,
            )
            for row in found
        ],
        total_count=int(total),
    )


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


def _load_state(
    services: Services, who: Principal, run_id: str
) -> tuple[TrainingModel, _State, list[Any] | None]:
    """The run, its recorded privacy state and its ledger's spend (None without a ledger)."""
    with services.reads() as session:
        run = own_model(session, who, run_id, noun="training run")
        events = None
        if run.ledger_id is not None:
            problem = audit_mismatch(session, tenant=who.tenant, ledger_id=run.ledger_id)
            if problem is not None:
                raise LedgerIntegrityError(f"{problem}; no certificate is issued until this is investigated")
            events = ledger_events(session, run.ledger_id)
    state = _privacy_state(run)
    if state is None:
        raise PrivacyUnavailableError(f"run {run_id!r} has no recorded privacy policy (created before 0004)")
    return run, state, events


def _current_certificate(
    run: TrainingModel, recorded: dict[str, Any] | None, events: list[Any] | None
) -> Any:
    """The run's certificate as of now: the engine's record of its last step, with the spend of
    its ledger (every run on the same data, including branches that trained since).

    Raises:
        PrivacyUnavailableError: Nothing is recorded yet.
    """
    from tensafe.privacy import CertificateError, DpCertificate

    if recorded is None:
        raise PrivacyUnavailableError(
            f"run {run.id!r} has no certificate yet (a server-sampled run gets one once its data set is "
            "registered)"
        )
    try:
        cert = DpCertificate.from_dict(recorded)
        if not cert.dp_enabled or events is None:
            return cert
        return DpCertificate.issue(
            accountant=str(cert.accountant),
            noise_multiplier=float(cert.noise_multiplier or 0.0),
            clip_norm=float(cert.clip_norm or 0.0),
            sample_rate=float(cert.sample_rate or 0.0),
            steps=sum(e.steps for e in events),
            events=events,
            delta=float(cert.delta or 0.0),
            dataset_size=cert.dataset_size,
            dataset_size_source=cert.dataset_size_source,
            expected_batch_size=cert.expected_batch_size,
            sampling_method=cert.sampling_method,
            sampled_by=cert.sampled_by,
            noise_rng=str(cert.noise_rng),
            privacy_unit=cert.privacy_unit,
            ledger_id=run.ledger_id,
            notes=cert.notes,
        )
    except CertificateError as exc:
        raise PrivacyUnavailableError(f"cannot issue a certificate for run {run.id!r}: {exc}") from None


@router.get("/training_runs/{run_id}/privacy")
def privacy(run_id: str, who: Caller, services: Svc) -> PrivacyReport:
    """ε spent (on the run's ledger), target ε, δ, accountant and steps of one run."""
    run, (policy, source, spent, recorded), events = _load_state(services, who, run_id)
    steps = int(run.step or spent.get("steps") or 0)
    extra: dict[str, Any] = {
        "policy_source": source,
        "sample_rate": spent.get("sample_rate"),
        "dataset_size": spent.get("dataset_size"),
        "expected_batch_size": (policy or {}).get("expected_batch_size"),
        "max_steps": (policy or {}).get("max_steps"),
        "ledger_id": run.ledger_id,
    }
    if policy is None:
        return PrivacyReport(training_run_id=run_id, dp_enabled=False, steps=steps, extra=extra)
    epsilon = float(spent.get("epsilon") or 0.0)
    if recorded is not None:
        cert = _current_certificate(run, recorded, events)
        extra.update(ledger_steps=cert.steps, private=cert.private)
        epsilon = cert.epsilon if cert.epsilon is not None else epsilon
    return PrivacyReport(
        training_run_id=run_id,
        dp_enabled=True,
        epsilon_spent=epsilon,
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
    """The DP certificate of one run, signed by the deployment's key.

    It is the certificate the engine issued at the run's last completed step, with ε over
    everything the run's privacy ledger holds (the steps of every run trained on the same
    data, branches included), issued and signed now. Verify it with the deployment's public
    key: ``tensafe privacy certificate FILE --verify --public-key deployment.pub``.
    """
    run, (_policy, _source, _spent, recorded), events = _load_state(services, who, run_id)
    cert = _current_certificate(run, recorded, events)
    if services.signer is None:
        raise PrivacyUnavailableError(
            "this server has no deployment signing key: certificates cannot be signed"
        )
    result: dict[str, Any] = cert.sign(services.signer).to_dict()
    return result
