"""Checkpoint lifecycle: external-weights export, download URLs, publishing and expiry.

Routes (Tinker wire protocol 0.38, sections 2.2 and 2.5):

* ``POST /api/v1/save_weights_external`` -> a future (operation ``save_weights_external``,
  executed by :func:`export_external_weights`): the model's current LoRA adapter in PEFT
  format (``adapter_model.safetensors``, ``adapter_config.json``) plus, for a run trained
  with DP, its ``dp_certificate.json``, stored encrypted under the tenant's DEK as the
  checkpoint ``tinker://<model>/external_weights/<name>``. With
  ``age_encryption_recipients`` every file is additionally age-encrypted (``pyrage``) to
  those recipients and named ``<file>.age``.
* ``GET .../checkpoints/external_weights/<name>/external_weights_urls``: one short-lived
  (:data:`DOWNLOAD_URL_SECONDS`) bearer URL per file, ``GET /api/v1/downloads/<token>``,
  on the host the client called. The token (256 bits from :mod:`secrets`) is the whole
  capability: the download needs no API key (the ``tinker`` CLI fetches with a plain
  GET); only its SHA-256 is stored (table ``download_tokens``). Every download is audited.
* ``POST`` / ``DELETE .../checkpoints/<kind>/<name>/publish``: set / clear ``public``.
  **Privacy rule:** only a checkpoint of a run trained under a DP policy may be
  published; anything else is refused with a 400. ``public`` is recorded, audited and
  listed, but this server offers **no cross-tenant access** to published checkpoints:
  another tenant still gets a 404 for every route.
* ``PUT .../checkpoints/<kind>/<name>/ttl`` ``{"ttl_seconds": int | null}``: expire
  ``ttl_seconds`` (3600 s to 10 years) from now, or never.

**Expiry.** A checkpoint whose ``expires_at`` has passed is invisible at once (404, not
listed, cannot be loaded or downloaded); :func:`sweep_expired_checkpoints`, run by the
worker loop at start and every :data:`SWEEP_INTERVAL_SECONDS`, deletes its row and its
encrypted artifacts and audits the deletion (``system.checkpoint_expired``).

Every route is scoped to the caller's tenant: another tenant's checkpoint is a 404.
"""

# No "from __future__ import annotations": FastAPI evaluates the annotations.

import dataclasses
import datetime as _dt
import hashlib
import json
import logging
import re
import secrets
import time
from collections.abc import Iterator, Sequence
from typing import Annotated, Any, Literal, cast

from fastapi import APIRouter, Request
from fastapi.responses import StreamingResponse
from pydantic import BaseModel, ConfigDict, Field, StringConstraints
from sqlalchemy import ColumnElement, CursorResult, delete, or_, select
from sqlalchemy.orm import Session

from tensafe import protocol as p
from tensafe.db import utcnow
from tensafe.server.deps import Caller, Svc
from tensafe.server.errors import BadRequestError, NotFoundError
from tensafe.server.jobs import JobContext, JobFailedError, JobResult, Services, Worker, submit_future
from tensafe.server.models import DownloadToken, TrainingCheckpoint, TrainingModel
from tensafe.server.retention import run_retention_sweeps
from tensafe.server.tenants import Principal
from tensafe.storage import EncryptedArtifactStore

__all__ = [
    "DOWNLOAD_URL_SECONDS",
    "MAX_AGE_RECIPIENTS",
    "MAX_TTL_SECONDS",
    "MIN_TTL_SECONDS",
    "SWEEPER_ACTOR",
    "SWEEP_INTERVAL_SECONDS",
    "ExternalWeightsUrlsResponse",
    "PublishRefusedError",
    "SaveWeightsExternalRequest",
    "SetTtlRequest",
    "checkpoint_is_live",
    "delete_checkpoint_artifacts",
    "export_external_weights",
    "find_checkpoint",
    "is_expired",
    "record_checkpoint",
    "router",
    "sweep_expired_checkpoints",
    "sweep_when_due",
]

_log = logging.getLogger("tensafe.server.checkpoints")

#: Lifetime of a download URL (seconds).
DOWNLOAD_URL_SECONDS = 15 * 60
#: Shortest and longest checkpoint TTL (the SDK's documented range: 1 hour to 10 years).
MIN_TTL_SECONDS = 3600
MAX_TTL_SECONDS = 10 * 366 * 86400
#: Most age recipients one export may name (the SDK documents at most 10).
MAX_AGE_RECIPIENTS = 10
#: How often the worker loop deletes expired checkpoints (seconds).
SWEEP_INTERVAL_SECONDS = 60.0
#: Audit actor of the expiry sweeper.
SWEEPER_ACTOR = "system:checkpoint-expiry"

#: Format label of the encrypted manifest ``<ref>.manifest`` of an external-weights export.
_MANIFEST_FORMAT = "tensafe.external_weights/v1"
_KIND = "external_weights"
_TOKEN = re.compile(r"[A-Za-z0-9_-]{32,128}")
_KINDS = ("weights", "sampler_weights", "external_weights")


class _RedactDownloadTokens(logging.Filter):
    """Keep download tokens (bearer capabilities) out of the HTTP access log."""

    _PATH = re.compile(r"(/api/v1/downloads/)[^/?#\s\"]+")

    def filter(self, record: logging.LogRecord) -> bool:
        if isinstance(record.args, tuple):
            record.args = tuple(
                self._PATH.sub(r"\1<redacted>", a) if isinstance(a, str) else a for a in record.args
            )
        if isinstance(record.msg, str):
            record.msg = self._PATH.sub(r"\1<redacted>", record.msg)
        return True


_access_log = logging.getLogger("uvicorn.access")
if not any(isinstance(f, _RedactDownloadTokens) for f in _access_log.filters):
    _access_log.addFilter(_RedactDownloadTokens())


class PublishRefusedError(BadRequestError):
    """Publishing is refused by TenSafe's privacy rule (HTTP 400, never retried)."""

    error = "publish_refused"


# --------------------------------------------------------------------------- wire models


class SaveWeightsExternalRequest(BaseModel):
    """Body of ``/save_weights_external`` (strict: unknown fields are refused)."""

    model_config = ConfigDict(extra="forbid", frozen=True, protected_namespaces=())

    model_id: Annotated[
        str, StringConstraints(min_length=1, max_length=200, pattern=r"^[A-Za-z0-9][A-Za-z0-9:._-]*$")
    ]
    path: p.CheckpointName
    seq_id: Annotated[int, Field(ge=0, le=2**31 - 1)]
    ttl_seconds: Annotated[int, Field(ge=MIN_TTL_SECONDS, le=MAX_TTL_SECONDS)] | None = None
    age_encryption_recipients: (
        Annotated[
            list[Annotated[str, StringConstraints(min_length=1, max_length=16384)]], Field(max_length=64)
        ]
        | None
    ) = None
    type: Literal["save_weights_external"] | None = None


class SetTtlRequest(BaseModel):
    """Body of ``PUT .../ttl``: seconds from now (3600 s to 10 years), or null for no expiry."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    ttl_seconds: int | None


class ExternalWeightsUrlsResponse(BaseModel):
    """Answer of ``.../external_weights_urls``: one download URL per file, valid until ``expires``."""

    urls: dict[str, str]
    expires: _dt.datetime


# --------------------------------------------------------------------------- helpers


def checkpoint_is_live(now: _dt.datetime | None = None) -> ColumnElement[bool]:
    """SQL condition: the checkpoint has no expiry or has not expired at ``now``."""
    moment = now or utcnow()
    return or_(TrainingCheckpoint.expires_at.is_(None), TrainingCheckpoint.expires_at > moment)


def is_expired(row: TrainingCheckpoint, now: _dt.datetime | None = None) -> bool:
    """Whether the checkpoint's TTL has passed (it is then invisible even before the sweeper runs)."""
    return row.expires_at is not None and row.expires_at <= (now or utcnow())


def delete_checkpoint_artifacts(store: EncryptedArtifactStore, tenant: str, ref: str | None) -> int:
    """Delete every encrypted artifact of a checkpoint: ``ref`` and ``ref.<anything>``.

    This covers each layout (``weights``: ``ref``; ``sampler_weights``: ``ref.0``, ``ref.1``;
    ``external_weights``: ``ref.<i>`` and ``ref.manifest``). Returns how many were deleted.
    """
    if not ref:
        return 0
    names = [a for a in store.list(tenant) if a == ref or a.startswith(ref + ".")]
    return sum(1 for name in names if store.delete(tenant, name))


def find_checkpoint(session: Session, model_id: str, kind: str, name: str) -> TrainingCheckpoint | None:
    """The row of ``tinker://{model_id}/{kind}/{name}``, live or expired, if any."""
    return session.execute(
        select(TrainingCheckpoint).where(
            TrainingCheckpoint.model_id == model_id,
            TrainingCheckpoint.kind == kind,
            TrainingCheckpoint.name == name,
        )
    ).scalar_one_or_none()


def record_checkpoint(
    session: Session,
    *,
    tenant: str,
    model_id: str,
    kind: str,
    name: str,
    artifact_id: str,
    size_bytes: int,
    user_metadata: str,
    ttl_seconds: int | None,
) -> TrainingCheckpoint:
    """Create the row of a new checkpoint, or replace an existing (expired or overwritten) one.

    A replaced row keeps only its id: the new content is not published and gets its own
    creation time and expiry.
    """
    now = utcnow()
    row = find_checkpoint(session, model_id, kind, name)
    if row is None:
        row = TrainingCheckpoint(
            id="ckpt-" + secrets.token_hex(10), tenant_id=tenant, model_id=model_id, kind=kind, name=name
        )
        session.add(row)
    row.public = False
    row.artifact_id, row.size_bytes, row.user_metadata, row.created_at = (
        artifact_id,
        size_bytes,
        user_metadata,
        now,
    )
    row.expires_at = None if ttl_seconds is None else now + _dt.timedelta(seconds=int(ttl_seconds))
    return row


def _own_live(session: Session, who: Principal, run_id: str, kind: str, name: str) -> TrainingCheckpoint:
    """The caller's live checkpoint, else 404 (also for another tenant's or an expired one)."""
    path = f"tinker://{run_id}/{kind}/{name}"
    if kind not in _KINDS:
        raise BadRequestError(f"{path!r}: the checkpoint kind must be one of {', '.join(_KINDS)}")
    row = find_checkpoint(session, run_id, kind, name)
    if row is None or row.tenant_id != who.tenant or is_expired(row):
        raise NotFoundError(f"unknown checkpoint {path!r}")
    return row


def _publish_refusal(model: TrainingModel | None, kind: str) -> str | None:
    """Why TenSafe's privacy rule forbids publishing a checkpoint of ``kind`` of ``model``, or None.

    Only the adapter of a run with a differential privacy guarantee may be published: a
    ``weights`` checkpoint (training state) holds the optimizer state and, for a
    server-sampled run, the registered data set itself; a run without DP, or whose noise was
    deterministic (``TS_DETERMINISTIC=1``), has no guarantee.
    """
    if kind == "weights":
        return (
            "training-state (weights) checkpoints hold the optimizer state and, for server-sampled runs, "
            "the registered data set; publish the adapter instead (save_weights_for_sampler or "
            "save_weights_external)"
        )
    if model is None or not model.dp_policy:
        return "this run has no DP policy"
    try:
        data = json.loads(model.dp_policy)
    except ValueError:
        return "this run has no readable DP policy"
    if not (isinstance(data, dict) and isinstance(data.get("policy"), dict)):
        return "this run has no DP policy"
    from tensafe.server.privacy import model_certificate

    try:
        certificate = model_certificate(model)
    except Exception:  # an unreadable record never admits a publication
        return "the run's DP certificate cannot be read"
    if certificate is not None and not certificate.private:
        return "the run's noise was deterministic (TS_DETERMINISTIC=1), so it has no privacy guarantee"
    return None


def _hash_token(token: str) -> str:
    return hashlib.sha256(b"tensafe-download-token-v1\x00" + token.encode("ascii")).hexdigest()


# --------------------------------------------------------------------------- the export job


def _age_recipients(raw: Sequence[Any]) -> list[Any]:
    """Parse age recipients (``age1...`` X25519 keys or SSH public keys) with ``pyrage``."""
    import pyrage

    if len(raw) > MAX_AGE_RECIPIENTS:
        raise JobFailedError(
            f"at most {MAX_AGE_RECIPIENTS} age recipients are accepted, got {len(raw)}", category="user"
        )
    recipients: list[Any] = []
    for i, text in enumerate(raw, start=1):
        value = str(text).strip()
        try:
            if value.startswith("age1"):
                recipients.append(pyrage.x25519.Recipient.from_str(value))
            elif value.startswith(("ssh-ed25519 ", "ssh-rsa ")):
                recipients.append(pyrage.ssh.Recipient.from_str(value))
            else:
                raise JobFailedError(
                    f"age recipient #{i} is neither an X25519 key (age1...) nor an ssh-ed25519/ssh-rsa "
                    "public key",
                    category="user",
                )
        except pyrage.RecipientError as exc:
            raise JobFailedError(f"age recipient #{i} is invalid: {exc}", category="user") from None
    return recipients


def _export_files(ctx: JobContext, session: Any, ledger_id: str | None) -> dict[str, bytes]:
    """The PEFT adapter files and, for a run with a DP policy, its signed DP certificate."""
    from tensafe.privacy.certificate import CERTIFICATE_FILENAME
    from tensafe.training.runtime import SessionStateError

    files: dict[str, bytes] = dict(session.sampler_weights_files())
    if getattr(session, "policy", None) is not None:
        try:
            certificate = session.privacy_certificate()
        except SessionStateError:
            return files  # server_poisson before its data set is registered: nothing trained yet
        signer = ctx.services.signer
        if signer is None:
            raise JobFailedError(
                "this server has no deployment signing key, so it cannot issue a signed DP certificate",
                category="server",
            )
        if ledger_id is not None:
            certificate = dataclasses.replace(certificate, ledger_id=ledger_id)
        files[CERTIFICATE_FILENAME] = certificate.sign(signer).to_json().encode("utf-8")
    return files


def export_external_weights(ctx: JobContext, session: Any, *, ledger_id: str | None = None) -> JobResult:
    """Execute ``save_weights_external`` for the loaded training ``session`` of ``ctx.model_id``.

    The DP certificate is signed by the deployment's key and names the run's privacy ledger
    (``ledger_id``), whose whole spend its ε covers (the caller synchronises the session).

    Raises:
        JobFailedError: A bad name, an existing live checkpoint of that name or invalid age
            recipients (category ``user``).
    """
    import pyrage

    model_id, tenant, store = str(ctx.model_id), ctx.tenant, ctx.services.store
    name = str(ctx.payload.get("path") or "")
    if not re.fullmatch(r"[A-Za-z0-9][A-Za-z0-9._-]{0,127}", name):
        raise JobFailedError(f"invalid external weights name {name!r}", category="user")
    raw_recipients = ctx.payload.get("age_encryption_recipients") or []
    recipients = _age_recipients(raw_recipients) if raw_recipients else []
    with ctx.services.sessions() as db:
        existing = find_checkpoint(db, model_id, _KIND, name)
        if existing is not None and not is_expired(existing):
            raise JobFailedError(
                f"checkpoint tinker://{model_id}/{_KIND}/{name} already exists; choose another name",
                category="user",
            )
        old_ref = None if existing is None else existing.artifact_id

    files = _export_files(ctx, session, ledger_id)
    ref = "ext-" + secrets.token_hex(12)
    entries: list[dict[str, Any]] = []
    size = 0
    for i, (file_name, plain) in enumerate(sorted(files.items())):
        data, served = plain, file_name
        if recipients:
            data, served = pyrage.encrypt(plain, recipients), file_name + ".age"
        artifact = f"{ref}.{i}"
        store.put_bytes(tenant, artifact, data, kind="external-weights")
        entries.append(
            {
                "name": served,
                "artifact": artifact,
                "size": len(data),
                "sha256": hashlib.sha256(data).hexdigest(),
            }
        )
        size += len(data)
    manifest = {"format": _MANIFEST_FORMAT, "age_encrypted": bool(recipients), "files": entries}
    store.put_bytes(tenant, f"{ref}.manifest", json.dumps(manifest, sort_keys=True).encode(), kind="manifest")
    ttl = ctx.payload.get("ttl_seconds")

    def apply(db: Session) -> None:
        record_checkpoint(
            db,
            tenant=tenant,
            model_id=model_id,
            kind=_KIND,
            name=name,
            artifact_id=ref,
            size_bytes=size,
            user_metadata="{}",
            ttl_seconds=None if ttl is None else int(ttl),
        )

    def cleanup() -> None:
        if old_ref is not None and old_ref != ref:
            delete_checkpoint_artifacts(store, tenant, old_ref)

    path = f"tinker://{model_id}/{_KIND}/{name}"
    return JobResult(
        json={"path": path, "size_bytes": size, "type": "save_weights_external"},
        apply=apply,
        after_commit=cleanup,
        details={
            "checkpoint": path,
            "artifact": ref,
            "size_bytes": size,
            "files": [e["name"] for e in entries],
            "age_recipients": len(recipients),
        },
    )


# --------------------------------------------------------------------------- expiry


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
        path = f"tinker://{model_id}/{kind}/{name}"
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


def sweep_when_due(services: Services, due: float) -> float:
    """Run :func:`sweep_expired_checkpoints` and the retention sweeps
    (:func:`tensafe.server.retention.run_retention_sweeps`) if the monotonic time ``due``
    has come.

    Called from the worker loop; never raises. Returns when the next sweep is due.
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


# --------------------------------------------------------------------------- routes


router = APIRouter(prefix="/api/v1")

_CKPT = "/training_runs/{run_id}/checkpoints/{kind}/{name}"


def _audit(
    services: Services, session: Session, who: Principal, action: str, resource: str, **details: Any
) -> None:
    services.audit(
        session, tenant=who.tenant, actor=who.actor, action=action, resource=resource, details=details
    )


@router.post("/save_weights_external", tags=["weights"])
def save_weights_external(
    body: SaveWeightsExternalRequest, who: Caller, services: Svc, request: Request
) -> p.UntypedFuture:
    """Export the adapter (PEFT) as ``tinker://<model>/external_weights/<path>`` (a future)."""
    if body.seq_id < 1:
        raise BadRequestError("seq_id must be at least 1 (0 is the model's creation)")
    payload = body.model_dump(mode="json", exclude_none=True, exclude={"type", "model_id", "seq_id"})
    services.store.ensure_key(who.tenant)  # the request digest needs the tenant's key
    with services.sessions.begin() as session:
        model = session.get(TrainingModel, body.model_id)
        if model is None or model.tenant_id != who.tenant:
            raise NotFoundError(f"unknown model {body.model_id!r}")
        if model.state == "failed":
            raise BadRequestError(f"model {body.model_id!r} could not be created: {model.error}")
        future, created = submit_future(
            services,
            session,
            tenant=who.tenant,
            actor=who.actor,
            request_type="save_weights_external",
            model_id=body.model_id,
            seq_id=body.seq_id,
            payload=payload,
        )
        if created:
            model.last_request_time = utcnow()
            _audit(
                services,
                session,
                who,
                "api.save_weights_external",
                body.model_id,
                request_id=future.id,
                request_digest=future.request_sha256,
                seq_id=body.seq_id,
                age_recipients=len(body.age_encryption_recipients or ()),
            )
    worker: Worker = request.app.state.worker
    worker.wake()
    return p.UntypedFuture(request_id=future.id, model_id=body.model_id)


@router.get(_CKPT + "/external_weights_urls", tags=["rest"])
def external_weights_urls(
    run_id: str, kind: str, name: str, who: Caller, services: Svc, request: Request
) -> ExternalWeightsUrlsResponse:
    """One short-lived download URL per file of an ``external_weights`` checkpoint."""
    if kind != _KIND:
        raise BadRequestError(
            f"download URLs exist only for external_weights checkpoints, not {kind!r}; export one with "
            "save_weights_external"
        )
    now = utcnow()
    with services.sessions() as session:
        row = _own_live(session, who, run_id, kind, name)
        ref, ckpt_id, ckpt_expiry = row.artifact_id, row.id, row.expires_at
    if ref is None:
        raise NotFoundError(f"unknown checkpoint 'tinker://{run_id}/{kind}/{name}'")
    manifest = json.loads(services.store.get_bytes(who.tenant, f"{ref}.manifest"))
    if manifest.get("format") != _MANIFEST_FORMAT:
        raise BadRequestError(f"unsupported external weights format {manifest.get('format')!r}")
    expires = now + _dt.timedelta(seconds=DOWNLOAD_URL_SECONDS)
    if ckpt_expiry is not None:
        expires = min(expires, ckpt_expiry)
    base = str(request.base_url).rstrip("/")
    urls: dict[str, str] = {}
    with services.sessions.begin() as session:
        for entry in manifest["files"]:
            token = secrets.token_urlsafe(32)
            session.add(
                DownloadToken(
                    id="dl-" + secrets.token_hex(12),
                    token_hash=_hash_token(token),
                    tenant_id=who.tenant,
                    checkpoint_id=ckpt_id,
                    artifact_id=str(entry["artifact"]),
                    file_name=str(entry["name"]),
                    size_bytes=int(entry["size"]),
                    created_by=who.actor,
                    created_at=now,
                    expires_at=expires,
                )
            )
            urls[str(entry["name"])] = f"{base}/api/v1/downloads/{token}"
        session.flush()
        _audit(
            services,
            session,
            who,
            "api.external_weights_urls",
            f"tinker://{run_id}/{kind}/{name}",
            files=sorted(urls),
            expires=expires.isoformat(),
        )
    return ExternalWeightsUrlsResponse(urls=urls, expires=expires)


@router.get("/downloads/{token}", tags=["rest"])
def download(token: str, services: Svc) -> StreamingResponse:
    """Stream one exported file; the URL's token is the capability (no API key; 404 once expired)."""
    missing = NotFoundError("unknown or expired download URL")
    if not _TOKEN.fullmatch(token):
        raise missing
    now = utcnow()
    with services.sessions.begin() as session:
        grant = session.execute(
            select(DownloadToken).where(DownloadToken.token_hash == _hash_token(token))
        ).scalar_one_or_none()
        if grant is None or grant.expires_at <= now:
            raise missing
        ckpt = session.get(TrainingCheckpoint, grant.checkpoint_id)
        if (
            ckpt is None
            or ckpt.tenant_id != grant.tenant_id
            or is_expired(ckpt, now)
            or ckpt.artifact_id is None
            or not grant.artifact_id.startswith(ckpt.artifact_id + ".")
        ):
            raise missing
        tenant, artifact, file_name, size = (
            grant.tenant_id,
            grant.artifact_id,
            grant.file_name,
            grant.size_bytes,
        )
        path = f"tinker://{ckpt.model_id}/{ckpt.kind}/{ckpt.name}"
        services.audit(
            session,
            tenant=tenant,
            actor=f"download-token:{grant.id}",
            action="api.download",
            resource=path,
            details={"file": file_name, "size_bytes": size, "granted_by": grant.created_by},
        )
    store = services.store

    def body() -> Iterator[bytes]:
        with store.open(tenant, artifact) as stream:
            while chunk := stream.read(1 << 16):
                yield chunk

    return StreamingResponse(
        body(),
        media_type="application/octet-stream",
        headers={
            "Content-Length": str(size),
            "Content-Disposition": f'attachment; filename="{file_name}"',
            "Cache-Control": "no-store",
            "Referrer-Policy": "no-referrer",
        },
    )


@router.post(_CKPT + "/publish", tags=["rest"])
def publish(run_id: str, kind: str, name: str, who: Caller, services: Svc) -> dict[str, str]:
    """Mark a checkpoint public (only for runs trained with DP; no cross-tenant access follows)."""
    with services.sessions.begin() as session:
        row = _own_live(session, who, run_id, kind, name)
        reason = _publish_refusal(session.get(TrainingModel, row.model_id), kind)
        if reason is not None:
            raise PublishRefusedError(
                f"tinker://{run_id}/{kind}/{name} cannot be published: TenSafe publishes only the adapter "
                f"of runs with a differential privacy guarantee, and {reason}"
            )
        if not row.public:
            row.public = True
            _audit(services, session, who, "api.publish_checkpoint", f"tinker://{run_id}/{kind}/{name}")
    return {"status": "published"}


@router.delete(_CKPT + "/publish", tags=["rest"])
def unpublish(run_id: str, kind: str, name: str, who: Caller, services: Svc) -> dict[str, str]:
    """Clear a checkpoint's ``public`` flag."""
    with services.sessions.begin() as session:
        row = _own_live(session, who, run_id, kind, name)
        if row.public:
            row.public = False
            _audit(services, session, who, "api.unpublish_checkpoint", f"tinker://{run_id}/{kind}/{name}")
    return {"status": "unpublished"}


@router.put(_CKPT + "/ttl", tags=["rest"])
def set_ttl(
    run_id: str, kind: str, name: str, body: SetTtlRequest, who: Caller, services: Svc
) -> dict[str, Any]:
    """Expire a checkpoint ``ttl_seconds`` from now (3600 s to 10 years), or never (null)."""
    ttl = body.ttl_seconds
    if ttl is not None and not MIN_TTL_SECONDS <= ttl <= MAX_TTL_SECONDS:
        raise BadRequestError(
            f"ttl_seconds must be between {MIN_TTL_SECONDS} (1 hour) and {MAX_TTL_SECONDS} (10 years), "
            "or null for no expiry"
        )
    with services.sessions.begin() as session:
        row = _own_live(session, who, run_id, kind, name)
        row.expires_at = None if ttl is None else utcnow() + _dt.timedelta(seconds=ttl)
        expires = None if row.expires_at is None else row.expires_at.isoformat()
        _audit(
            services,
            session,
            who,
            "api.set_checkpoint_ttl",
            f"tinker://{run_id}/{kind}/{name}",
            ttl_seconds=ttl,
            expires_at=expires,
        )
    return {"status": "ok", "expires_at": expires}
