"""Checkpoint lifecycle routes: external-weights export, download URLs, downloads, publishing, TTLs.

Routes (Tinker wire protocol 0.38, sections 2.2 and 2.5); the job side (the export, the
rows and artifacts, the publishing rule) is :mod:`tensafe.server.checkpoints`:

* ``POST /api/v1/save_weights_external`` -> a future (operation ``save_weights_external``,
  executed by :func:`~tensafe.server.checkpoints.export_external_weights`).
* ``GET .../checkpoints/external_weights/<name>/external_weights_urls``: one short-lived
  (:data:`~tensafe.server.checkpoints.DOWNLOAD_URL_SECONDS`) bearer URL per file,
  ``GET /api/v1/downloads/<token>``, on the host the client called. The token (256 bits
  from :mod:`secrets`) is the whole capability: the download needs no API key (the
  ``tinker`` CLI fetches with a plain GET); only its SHA-256 is stored (table
  ``download_tokens``), and it is redacted from the HTTP access log. Every download is
  audited.
* ``POST`` / ``DELETE .../checkpoints/<kind>/<name>/publish``: set / clear ``public``.
  **Privacy rule** (:func:`~tensafe.server.checkpoints.publish_refusal`): only the adapter
  of a run trained under a DP policy may be published; anything else is a 400. ``public``
  is recorded, audited and listed, but this server offers **no cross-tenant access** to
  published checkpoints: another tenant still gets a 404 for every route.
* ``PUT .../checkpoints/<kind>/<name>/ttl`` ``{"ttl_seconds": int | null}``: expire
  ``ttl_seconds`` (3600 s to 10 years) from now, or never.

Every route is scoped to the caller's tenant: another tenant's checkpoint is a 404. This
router is included before the REST router: its ``.../publish`` and ``.../ttl`` routes must
precede ``DELETE .../checkpoints/{path}``.
"""

# No "from __future__ import annotations": FastAPI evaluates the annotations.

import datetime as _dt
import hashlib
import json
import logging
import re
import secrets
from collections.abc import Iterator
from typing import Any

from fastapi import APIRouter, Request
from fastapi.responses import StreamingResponse
from sqlalchemy import select

from tensafe import protocol as p
from tensafe.db import utcnow
from tensafe.protocol.tensafe import (
    MAX_TTL_SECONDS,
    MIN_TTL_SECONDS,
    ExternalWeightsUrlsResponse,
    SaveWeightsExternalRequest,
    SetTtlRequest,
)
from tensafe.server.checkpoints import (
    DOWNLOAD_URL_SECONDS,
    EXTERNAL_KIND,
    MANIFEST_FORMAT,
    checkpoint_path,
    is_expired,
    publish_refusal,
)
from tensafe.server.deps import Caller, Jobs, Svc, audit, own_live_checkpoint, route_checkpoint_path
from tensafe.server.errors import BadRequestError, NotFoundError, PublishRefusedError
from tensafe.server.models import DownloadToken, TrainingCheckpoint, TrainingModel
from tensafe.server.routers._common import submit_model_body

__all__ = ["router"]

_TOKEN = re.compile(r"[A-Za-z0-9_-]{32,128}")


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


def _hash_token(token: str) -> str:
    return hashlib.sha256(b"tensafe-download-token-v1\x00" + token.encode("ascii")).hexdigest()


router = APIRouter(prefix="/api/v1")

_CKPT = "/training_runs/{run_id}/checkpoints/{kind}/{name}"


@router.post("/save_weights_external", tags=["weights"])
def save_weights_external(
    body: SaveWeightsExternalRequest, who: Caller, services: Svc, worker: Jobs
) -> p.UntypedFuture:
    """Export the adapter (PEFT) as ``tinker://<model>/external_weights/<path>`` (a future)."""
    recipients = len(body.age_encryption_recipients or ())
    return submit_model_body(services, worker, who, body, "save_weights_external", age_recipients=recipients)


@router.get(_CKPT + "/external_weights_urls", tags=["rest"])
def external_weights_urls(
    run_id: str, kind: str, name: str, who: Caller, services: Svc, request: Request
) -> ExternalWeightsUrlsResponse:
    """One short-lived download URL per file of an ``external_weights`` checkpoint."""
    if kind != EXTERNAL_KIND:
        raise BadRequestError(
            f"download URLs exist only for external_weights checkpoints, not {kind!r}; export one with "
            "save_weights_external"
        )
    path = route_checkpoint_path(run_id, kind, name)
    now = utcnow()
    with services.sessions() as session:
        row = own_live_checkpoint(session, who, path)
        ref, ckpt_id, ckpt_expiry = row.artifact_id, row.id, row.expires_at
    if ref is None:
        raise NotFoundError(f"unknown checkpoint {str(path)!r}")
    manifest = json.loads(services.store.get_bytes(who.tenant, f"{ref}.manifest"))
    if manifest.get("format") != MANIFEST_FORMAT:
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
        audit(
            services,
            session,
            who,
            "api.external_weights_urls",
            str(path),
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
        path = str(checkpoint_path(ckpt))
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
    path = route_checkpoint_path(run_id, kind, name)
    with services.sessions.begin() as session:
        row = own_live_checkpoint(session, who, path)
        reason = publish_refusal(session.get(TrainingModel, row.model_id), kind)
        if reason is not None:
            raise PublishRefusedError(
                f"{path} cannot be published: TenSafe publishes only the adapter "
                f"of runs with a differential privacy guarantee, and {reason}"
            )
        if not row.public:
            row.public = True
            audit(services, session, who, "api.publish_checkpoint", str(path))
    return {"status": "published"}


@router.delete(_CKPT + "/publish", tags=["rest"])
def unpublish(run_id: str, kind: str, name: str, who: Caller, services: Svc) -> dict[str, str]:
    """Clear a checkpoint's ``public`` flag."""
    path = route_checkpoint_path(run_id, kind, name)
    with services.sessions.begin() as session:
        row = own_live_checkpoint(session, who, path)
        if row.public:
            row.public = False
            audit(services, session, who, "api.unpublish_checkpoint", str(path))
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
    path = route_checkpoint_path(run_id, kind, name)
    with services.sessions.begin() as session:
        row = own_live_checkpoint(session, who, path)
        row.expires_at = None if ttl is None else utcnow() + _dt.timedelta(seconds=ttl)
        expires = None if row.expires_at is None else row.expires_at.isoformat()
        audit(
            services,
            session,
            who,
            "api.set_checkpoint_ttl",
            str(path),
            ttl_seconds=ttl,
            expires_at=expires,
        )
    return {"status": "ok", "expires_at": expires}
