"""Client sessions: bootstrap configuration, ``create_session``, heartbeats, ``finish``, telemetry."""

# No "from __future__ import annotations": FastAPI evaluates the annotations.

import logging
import secrets
from typing import Any

from fastapi import APIRouter
from fastapi.responses import JSONResponse

from tensafe import protocol as p
from tensafe.db import utcnow
from tensafe.server.deps import Caller, Cfg, Svc, audit, own_session
from tensafe.server.errors import error_body
from tensafe.server.models import ServerSession
from tensafe.server.routers._common import dump

__all__ = ["CLIENT_CONFIG", "router"]

_log = logging.getLogger("tensafe.server")

#: What ``/client/config`` answers: plain httpx transport, no JWT, server-side features off.
CLIENT_CONFIG: dict[str, Any] = {
    "pjwt_auth_enabled": False,
    "use_pyqwest_transport": False,
    "parallel_fwdbwd_chunks": True,
    "proto_compress_fwdbwd": False,
    "sample_use_retrieve_futures": False,
    "custom_loss_server_side": False,
    "sample_join_sampling_session": False,
}

router = APIRouter(prefix="/api/v1", tags=["session"])


@router.post("/client/config")
def client_config(body: p.ClientConfigRequest, who: Caller) -> dict[str, Any]:
    """Feature flags for the SDK."""
    return dict(CLIENT_CONFIG)


@router.post("/client/dynamic_config")
def dynamic_config(body: p.ClientConfigRequest, who: Caller) -> dict[str, Any]:
    """Runtime knobs for the SDK."""
    return {"refresh_interval_sec": 300, "sample_cancel_enabled": False}


@router.post("/create_session")
def create_session(body: p.CreateSessionRequest, who: Caller, services: Svc) -> p.CreateSessionResponse:
    """Open a session (one ``ServiceClient``)."""
    now = utcnow()
    row = ServerSession(
        id="sess-" + secrets.token_hex(10),
        tenant_id=who.tenant,
        created_at=now,
        last_heartbeat_at=now,
        user_metadata=dump(body.user_metadata),
        tags=dump(body.tags),
        project_id=body.project_id,
        display_name=body.display_name,
        sdk_version=body.sdk_version,
    )
    with services.sessions.begin() as session:
        session.add(row)
        session.flush()
        audit(services, session, who, "api.create_session", row.id, sdk_version=body.sdk_version or "")
    return p.CreateSessionResponse(session_id=row.id)


@router.post("/session_heartbeat")
def heartbeat(body: p.SessionHeartbeatRequest, who: Caller, services: Svc, settings: Cfg) -> JSONResponse:
    """Keep a session alive; 410 once it has finished or expired."""
    with services.sessions.begin() as session:
        row = own_session(session, who, body.session_id)
        now = utcnow()
        expired = (now - row.last_heartbeat_at).total_seconds() > settings.session_expiry_seconds
        if row.finished_at is not None or expired:
            return JSONResponse(error_body("session_finished", "this session has finished"), 410)
        row.last_heartbeat_at = now
    return JSONResponse({"type": "session_heartbeat"})


@router.post("/sessions/{session_id}/finish")
def finish_session(
    session_id: str, body: p.FinishSessionRequest, who: Caller, services: Svc
) -> dict[str, str]:
    """Close a session."""
    with services.sessions.begin() as session:
        row = own_session(session, who, session_id)
        if row.finished_at is None:
            row.finished_at, row.finish_reason = utcnow(), body.reason.type
            audit(services, session, who, "api.finish_session", row.id, reason=body.reason.type)
    return {"status": "finished"}


@router.post("/telemetry")
def telemetry(body: p.TelemetryRequest, who: Caller) -> dict[str, str]:
    """Accept SDK telemetry; events are counted in the log, not stored."""
    _log.debug("telemetry: %d events from tenant %s", len(body.events), who.tenant)
    return {"status": "accepted"}
