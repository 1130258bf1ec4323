"""Every sweep of the server: expired checkpoints and download tokens, futures' results, orphans.

Run by the worker loop's periodic task :class:`Sweeper` (given to the
:class:`~tensafe.server.jobs.Worker` by :func:`tensafe.server.app.create_app`; at start,
then every :data:`SWEEP_INTERVAL_SECONDS`), in every process that runs a worker; every
sweep is safe to run in several processes at once. :func:`sweep_when_due` runs them all
once when due.

**Checkpoints.** A checkpoint whose ``expires_at`` has passed is invisible at once (404,
not listed, cannot be loaded or downloaded); :func:`sweep_expired_checkpoints` deletes its
row and its encrypted artifacts and audits the deletion (``system.checkpoint_expired``),
and deletes expired download tokens.

**Results.** The result of a future that finished (``complete`` or ``failed``) more than
``result_ttl_seconds`` ago (:class:`~tensafe.server.settings.ServerSettings`,
``TS_SERVER_RESULT_TTL_S``, default 7 days) is deleted by :func:`sweep_expired_results`:
``result_json``, ``result_blob`` and the error message are cleared, ``result_ref`` is
cleared and its store artifact (a large result) deleted after the commit, and
``result_content_type`` is set to :data:`RESULT_EXPIRED`. The row itself stays (state,
``request_sha256``, timestamps), so re-submitting the same ``(model_id, seq_id)`` still
returns the same future, and ``retrieve_future`` answers HTTP 410
``{"error": "result_expired", ...}`` (:class:`ResultExpiredError`). One audit record per
tenant and sweep, ``system.results_expired``, gives the count.

**Orphans.** A staged request payload (``payload-*``) or a large result (``*.result``) is
deleted by the worker right after the database commit that stops referencing it; a
process that dies in between leaves an encrypted artifact no row refers to.
:func:`sweep_orphan_artifacts` deletes such artifacts once they are older than
:data:`ORPHAN_MIN_AGE_SECONDS`: a payload is staged *before* the row that refers to it is
committed, so a young unreferenced artifact may be one about to be referenced, and is
never touched.
"""

from __future__ import annotations

import datetime as _dt
import logging
import time
from collections import defaultdict
from collections.abc import Callable, Iterable, Sequence
from typing import Any, cast

from sqlalchemy import CursorResult, delete, or_, select, update
from sqlalchemy.orm import Session, sessionmaker

from tensafe.db import Tenant, utcnow
from tensafe.protocol import CheckpointKind, TinkerPath
from tensafe.server.checkpoints import delete_checkpoint_artifacts
from tensafe.server.errors import ResultExpiredError
from tensafe.server.external_weights import discard_upload, upload_is_over
from tensafe.server.models import DownloadToken, FutureRow, TrainingCheckpoint
from tensafe.server.services import Services
from tensafe.server.stability import StabilityRecord
from tensafe.server.states import FutureState
from tensafe.storage import ArtifactNotFoundError, EncryptedArtifactStore, LocalFilesystemBackend

__all__ = [
    "ORPHAN_MIN_AGE_SECONDS",
    "RESULTS_ACTOR",
    "RESULT_EXPIRED",
    "SWEEPER_ACTOR",
    "SWEEP_INTERVAL_SECONDS",
    "ResultExpiredError",
    "Sweeper",
    "run_retention_sweeps",
    "sweep_abandoned_uploads",
    "sweep_expired_checkpoints",
    "sweep_expired_results",
    "sweep_expired_stability_records",
    "sweep_orphan_artifacts",
    "sweep_when_due",
]

_log = logging.getLogger("tensafe.server.retention")

#: ``futures.result_content_type`` of a future whose result the retention sweep deleted.
RESULT_EXPIRED = "tensafe/result-expired"
#: Audit actor of the retention sweeps.
RESULTS_ACTOR = "system:result-retention"
#: How often the worker loop runs the sweeps (seconds).
SWEEP_INTERVAL_SECONDS = 60.0
#: Audit actor of the checkpoint expiry sweep.
SWEEPER_ACTOR = "system:checkpoint-expiry"
#: Unreferenced request artifacts younger than this (seconds) are never deleted.
ORPHAN_MIN_AGE_SECONDS = 3600.0

#: Futures expired per sweep at most (the rest wait for the next sweep).
_RESULTS_PER_SWEEP = 5000
#: Ids per ``IN (...)`` list (well below SQLite's and PostgreSQL's parameter limits).
_CHUNK = 500
#: Suffix of an artifact's blob in a :class:`LocalFilesystemBackend` (``<tenant>/<id>.tsa``);
#: when the file is not found under this name the artifact's own (verified) header is read.
_LOCAL_BLOB_SUFFIX = ".tsa"


def _chunks(items: Sequence[str]) -> Iterable[Sequence[str]]:
    for start in range(0, len(items), _CHUNK):
        yield items[start : start + _CHUNK]


# --------------------------------------------------------------------------- checkpoints


def sweep_expired_checkpoints(
    services: Services, *, now: _dt.datetime | None = None, limit: int = 500
) -> int:
    """Delete expired checkpoints (rows and encrypted artifacts) and expired download tokens.

    Each deletion is audited (``system.checkpoint_expired``) in the transaction that
    removes the row; the artifacts are deleted after it commits. Safe to run in several
    processes at once: a row is deleted (and audited) by exactly one of them.

    Returns:
        The number of checkpoints deleted.
    """
    moment = now or utcnow()
    with services.sessions() as session:
        due = session.execute(
            select(
                TrainingCheckpoint.id,
                TrainingCheckpoint.tenant_id,
                TrainingCheckpoint.model_id,
                TrainingCheckpoint.kind,
                TrainingCheckpoint.name,
                TrainingCheckpoint.artifact_id,
                TrainingCheckpoint.expires_at,
            )
            .where(TrainingCheckpoint.expires_at.is_not(None), TrainingCheckpoint.expires_at <= moment)
            .limit(limit)
        ).all()
    removed = 0
    for ckpt_id, tenant, model_id, kind, name, ref, expires_at in due:
        path = str(TinkerPath(run_id=model_id, kind=cast("CheckpointKind", kind), name=name))
        with services.sessions.begin() as session:
            result = cast(
                "CursorResult[Any]",
                session.execute(
                    delete(TrainingCheckpoint).where(
                        TrainingCheckpoint.id == ckpt_id, TrainingCheckpoint.expires_at <= moment
                    )
                ),
            )
            if result.rowcount != 1:
                continue  # another process swept it, or its TTL was just extended
            services.audit(
                session,
                tenant=tenant,
                actor=SWEEPER_ACTOR,
                action="system.checkpoint_expired",
                resource=path,
                details={"artifact": ref or "", "expires_at": expires_at.isoformat() if expires_at else ""},
            )
        removed += 1
        try:
            delete_checkpoint_artifacts(services.store, tenant, ref)
        except Exception:
            _log.exception("could not delete the artifacts of the expired checkpoint %s", path)
    with services.sessions.begin() as session:
        session.execute(delete(DownloadToken).where(DownloadToken.expires_at <= moment))
    return removed


# --------------------------------------------------------------------------- results


def sweep_expired_results(
    services: Services,
    *,
    now: _dt.datetime | None = None,
    ttl_seconds: float | None = None,
    limit: int = _RESULTS_PER_SWEEP,
) -> dict[str, int]:
    """Delete the results of futures that finished more than ``ttl_seconds`` before ``now``.

    Per tenant, one transaction marks the rows (:data:`RESULT_EXPIRED`) and appends one
    ``system.results_expired`` audit record with the count; the store artifacts of large
    results are deleted after it commits (a failure there leaves an orphan for
    :func:`sweep_orphan_artifacts`). A row expired by another process meanwhile is
    neither counted nor audited twice.

    Args:
        services: Shared services.
        now: The current time (default: now; tests pass a later one).
        ttl_seconds: Retention (default: ``services.result_ttl_seconds``).
        limit: Most futures handled in this call.

    Returns:
        The number of expired results per tenant (tenants with none are absent).
    """
    moment = now or utcnow()
    ttl = services.result_ttl_seconds if ttl_seconds is None else ttl_seconds
    cutoff = moment - _dt.timedelta(seconds=ttl)
    with services.reads() as session:
        due = session.execute(
            select(FutureRow.id, FutureRow.tenant_id, FutureRow.result_ref, FutureRow.result_blob.is_(None))
            .where(
                FutureRow.state.in_((FutureState.COMPLETE, FutureState.FAILED)),
                FutureRow.finished_at <= cutoff,
                or_(FutureRow.result_content_type.is_(None), FutureRow.result_content_type != RESULT_EXPIRED),
            )
            .order_by(FutureRow.finished_at)
            .limit(limit)
        ).all()
    by_tenant: dict[str, list[str]] = defaultdict(list)
    files: dict[str, list[str]] = defaultdict(list)
    for future_id, tenant, result_ref, in_store in due:
        by_tenant[tenant].append(future_id)
        if result_ref is not None and in_store:  # a sealed result goes with the row: no file
            files[tenant].append(result_ref)
    counts: dict[str, int] = {}
    for tenant, ids in sorted(by_tenant.items()):
        expired = 0
        with services.sessions.begin() as session:
            for chunk in _chunks(ids):
                result = cast(
                    "CursorResult[Any]",
                    session.execute(
                        update(FutureRow)
                        .where(
                            FutureRow.id.in_(chunk),
                            FutureRow.tenant_id == tenant,
                            or_(
                                FutureRow.result_content_type.is_(None),
                                FutureRow.result_content_type != RESULT_EXPIRED,
                            ),
                        )
                        .values(
                            result_json=None,
                            result_blob=None,
                            result_ref=None,
                            result_content_type=RESULT_EXPIRED,
                            error=None,
                            updated_at=moment,
                        )
                        .execution_options(synchronize_session=False)
                    ),
                )
                expired += result.rowcount
            if expired:
                services.audit(
                    session,
                    tenant=tenant,
                    actor=RESULTS_ACTOR,
                    action="system.results_expired",
                    resource="futures",
                    details={
                        "count": expired,
                        "ttl_seconds": int(ttl),  # audit details hold no floats
                        "finished_before": cutoff.isoformat(),
                    },
                )
        if expired:
            counts[tenant] = expired
        for ref in files.get(tenant, ()):
            try:
                services.store.delete(tenant, ref)
            except Exception:
                _log.exception("could not delete the expired result %s of tenant %s", ref, tenant)
    return counts


# --------------------------------------------------------------------------- orphans


def _is_request_artifact(artifact_id: str) -> bool:
    return artifact_id.startswith("payload-") or artifact_id.endswith(".result")


def _created_at(store: EncryptedArtifactStore, tenant: str, artifact_id: str) -> _dt.datetime:
    """When the artifact was written: its blob file's mtime on a local backend (no
    decryption), else the creation time in its verified header.

    Raises:
        ArtifactNotFoundError: The artifact is gone.
        StoreError: It cannot be verified (the caller leaves it alone).
    """
    backend = store.backend
    if isinstance(backend, LocalFilesystemBackend):
        path = backend.root / tenant / f"{artifact_id}{_LOCAL_BLOB_SUFFIX}"
        try:
            return _dt.datetime.fromtimestamp(path.stat().st_mtime, _dt.UTC)
        except FileNotFoundError:
            pass  # another layout, or deleted meanwhile: ask the store
    return store.info(tenant, artifact_id).created_at


def sweep_orphan_artifacts(
    services: Services,
    *,
    now: _dt.datetime | None = None,
    min_age_seconds: float = ORPHAN_MIN_AGE_SECONDS,
) -> dict[str, int]:
    """Delete request artifacts (``payload-*``, ``*.result``) that no future refers to.

    For each tenant the store is listed *before* the references are read, so an
    artifact whose row was committed in between counts as referenced; an unreferenced
    artifact is deleted only when it was written more than ``min_age_seconds`` before
    ``now`` (one still being submitted is younger). Deletions are logged, not audited:
    these artifacts are copies the tenant can no longer reach.

    Returns:
        The number of artifacts deleted per tenant (tenants with none are absent).
    """
    moment = now or utcnow()
    threshold = moment - _dt.timedelta(seconds=min_age_seconds)
    store = services.store
    with services.reads() as session:
        tenants = list(session.execute(select(Tenant.id).order_by(Tenant.id)).scalars())
    counts: dict[str, int] = {}
    for tenant in tenants:
        try:
            candidates = [a for a in store.list(tenant) if _is_request_artifact(a)]
        except Exception:
            _log.exception("could not list the artifacts of tenant %s", tenant)
            continue
        if not candidates:
            continue
        referenced: set[str] = set()
        with services.reads() as session:
            for chunk in _chunks(candidates):
                for payload_ref, result_ref in session.execute(
                    select(FutureRow.payload_ref, FutureRow.result_ref).where(
                        FutureRow.tenant_id == tenant,
                        or_(FutureRow.payload_ref.in_(chunk), FutureRow.result_ref.in_(chunk)),
                    )
                ).all():
                    referenced.update(ref for ref in (payload_ref, result_ref) if ref is not None)
        removed = 0
        for artifact_id in candidates:
            if artifact_id in referenced:
                continue
            try:
                if _created_at(store, tenant, artifact_id) > threshold:
                    continue
                if store.delete(tenant, artifact_id):
                    removed += 1
            except ArtifactNotFoundError:
                continue  # deleted meanwhile (by the worker, or another sweeper)
            except Exception:
                _log.warning(
                    "left the unreferenced artifact %s of tenant %s alone (unreadable)", artifact_id, tenant
                )
        if removed:
            counts[tenant] = removed
            _log.info("deleted %d orphaned request artifact(s) of tenant %s", removed, tenant)
    return counts


def _count(found: int | dict[str, int]) -> int:
    return found if isinstance(found, int) else sum(found.values())


def run_retention_sweeps(services: Services) -> None:
    """Run :func:`sweep_expired_results`, :func:`sweep_orphan_artifacts`,
    :func:`sweep_abandoned_uploads` and :func:`sweep_expired_stability_records`; never raises
    (a failed sweep is logged and tried again at the next round)."""
    sweeps: tuple[tuple[str, Callable[[], int | dict[str, int]]], ...] = (
        ("expired future result(s)", lambda: sweep_expired_results(services)),
        ("orphaned request artifact(s)", lambda: sweep_orphan_artifacts(services)),
        ("abandoned upload(s)", lambda: sweep_abandoned_uploads(services)),
        ("expired stability record(s)", lambda: sweep_expired_stability_records(services.sessions)),
    )
    for what, sweep in sweeps:
        try:
            found = _count(sweep())
        except Exception:
            _log.exception("the sweep of %s failed; retrying later", what)
            continue
        if found:
            _log.info("deleted %d %s", found, what)


def sweep_expired_stability_records(
    sessions: sessionmaker[Session], *, now: _dt.datetime | None = None, limit: int = 5000
) -> int:
    """Delete up to ``limit`` expired stability records (:mod:`tensafe.server.stability`); return how many.

    Safe in several processes at once (the delete re-checks the expiry).
    """
    now = now or utcnow()
    with sessions.begin() as db:
        ids = list(
            db.execute(
                select(StabilityRecord.id).where(StabilityRecord.expires_at <= now).limit(limit)
            ).scalars()
        )
        if not ids:
            return 0
        result: Any = db.execute(
            delete(StabilityRecord).where(StabilityRecord.id.in_(ids), StabilityRecord.expires_at <= now)
        )
        return int(result.rowcount or 0)


def sweep_abandoned_uploads(services: Services, *, now: _dt.datetime | None = None) -> dict[str, int]:
    """Delete the pending external-weights uploads whose URLs have expired, of every tenant.

    An upload (:mod:`tensafe.server.external_weights`) that was never finished leaves its
    encrypted record ``xw-*.meta``, the files received so far and its URL grants; once its
    URLs have expired nobody can finish it. Returns the uploads deleted per tenant.
    """
    moment = now or utcnow()
    store = services.store
    with services.reads() as session:
        tenants = list(session.execute(select(Tenant.id).order_by(Tenant.id)).scalars())
    counts: dict[str, int] = {}
    for tenant in tenants:
        names = [n for n in store.list(tenant) if n.startswith("xw-")]
        over = [
            n[: -len(".meta")]
            for n in names
            if n.endswith(".meta") and upload_is_over(services, tenant, n[: -len(".meta")], moment)
        ]
        for upload_id in over:
            discard_upload(services, tenant, upload_id, names=names)
        if over:
            counts[tenant] = len(over)
    return counts


# --------------------------------------------------------------------------- the worker's task


def sweep_when_due(services: Services, due: float) -> float:
    """Run every sweep (:func:`sweep_expired_checkpoints`, then :func:`run_retention_sweeps`)
    if the monotonic time ``due`` has come.

    Never raises. Returns when the next sweep is due.
    """
    now = time.monotonic()
    if now < due:
        return due
    try:
        removed = sweep_expired_checkpoints(services)
        if removed:
            _log.info("deleted %d expired checkpoint(s)", removed)
    except Exception:
        _log.exception("the expired-checkpoint sweep failed; retrying later")
    run_retention_sweeps(services)
    return now + SWEEP_INTERVAL_SECONDS


class Sweeper:
    """The worker loop's periodic task: every sweep, at the first call, then every
    :data:`SWEEP_INTERVAL_SECONDS` (read when each sweep runs)."""

    def __init__(self, services: Services) -> None:
        """Sweep for ``services`` (first at the next call)."""
        self._services = services
        self._due = 0.0

    def __repr__(self) -> str:
        return "Sweeper()"

    def __call__(self) -> None:
        """Run the sweeps if they are due; never raises."""
        self._due = sweep_when_due(self._services, self._due)
