"""Retention of futures' results and clean-up of orphaned request artifacts.

Run by the worker loop's periodic sweeper (:func:`tensafe.server.checkpoints.sweep_when_due`,
every :data:`~tensafe.server.checkpoints.SWEEP_INTERVAL_SECONDS`), in every process that
runs a worker; both sweeps are safe to run in several processes at once.

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
from collections import defaultdict
from collections.abc import Iterable, Sequence
from typing import Any, cast

from sqlalchemy import CursorResult, or_, select, update

from tensafe.db import Tenant, utcnow
from tensafe.server.errors import ServerError
from tensafe.server.jobs import Services
from tensafe.server.models import FutureRow
from tensafe.storage import ArtifactNotFoundError, EncryptedArtifactStore, LocalFilesystemBackend

__all__ = [
    "ORPHAN_MIN_AGE_SECONDS",
    "RESULTS_ACTOR",
    "RESULT_EXPIRED",
    "ResultExpiredError",
    "run_retention_sweeps",
    "sweep_expired_results",
    "sweep_orphan_artifacts",
]

_log = logging.getLogger("tensafe.server.retention")

#: ``futures.result_content_type`` of a future whose result the retention sweep deleted.
RESULT_EXPIRED = "tensafe/result-expired"
#: Audit actor of the retention sweeps.
RESULTS_ACTOR = "system:result-retention"
#: Unreferenced request artifacts younger than this (seconds) are never deleted.
ORPHAN_MIN_AGE_SECONDS = 3600.0

#: Futures expired per sweep at most (the rest wait for the next sweep).
_RESULTS_PER_SWEEP = 5000
#: Ids per ``IN (...)`` list (well below SQLite's and PostgreSQL's parameter limits).
_CHUNK = 500
#: Suffix of an artifact's blob in a :class:`LocalFilesystemBackend` (``<tenant>/<id>.tsa``);
#: when the file is not found under this name the artifact's own (verified) header is read.
_LOCAL_BLOB_SUFFIX = ".tsa"


class ResultExpiredError(ServerError):
    """The future finished, but its result was deleted by the retention sweep (HTTP 410)."""

    status_code = 410
    error = "result_expired"


def _chunks(items: Sequence[str]) -> Iterable[Sequence[str]]:
    for start in range(0, len(items), _CHUNK):
        yield items[start : start + _CHUNK]


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
                FutureRow.state.in_(("complete", "failed")),
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


def run_retention_sweeps(services: Services) -> None:
    """Run :func:`sweep_expired_results` and :func:`sweep_orphan_artifacts`; never raises."""
    try:
        expired = sweep_expired_results(services)
        if expired:
            _log.info("deleted %d expired future result(s)", sum(expired.values()))
    except Exception:
        _log.exception("the result retention sweep failed; retrying later")
    try:
        sweep_orphan_artifacts(services)
    except Exception:
        _log.exception("the orphaned-artifact sweep failed; retrying later")
