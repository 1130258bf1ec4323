"""Probes: ``/healthz`` (liveness) and ``/readyz`` (database reachable, schema at the newest migration)."""

# No "from __future__ import annotations": FastAPI evaluates the annotations.

from fastapi import APIRouter
from fastapi.responses import JSONResponse
from sqlalchemy import text

from tensafe.db import current_revision, head_revision
from tensafe.server.deps import Cfg, Svc

__all__ = ["router"]

router = APIRouter(tags=["health"])


@router.get("/healthz")
@router.get("/api/v1/healthz", include_in_schema=False)
def healthz() -> dict[str, str]:
    """Liveness: the process answers."""
    return {"status": "ok"}


@router.get("/readyz")
def readyz(services: Svc, settings: Cfg) -> JSONResponse:
    """Readiness: the database answers and its schema is at the newest migration."""
    try:
        with services.sessions.kw["bind"].connect() as conn:
            conn.execute(text("SELECT 1"))
        current, head = current_revision(settings.database_url), head_revision()
    except Exception as exc:
        return JSONResponse(
            {"status": "unavailable", "detail": f"database unreachable ({type(exc).__name__})"}, 503
        )
    if current != head:
        return JSONResponse(
            {
                "status": "unavailable",
                "detail": f"schema at {current}, expected {head}: run 'tensafe db upgrade'",
            },
            503,
        )
    return JSONResponse({"status": "ready", "schema": head})
