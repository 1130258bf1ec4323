"""What the server's routers share: FastAPI dependencies and the tenant-scoped lookups.

Dependencies (``Annotated`` aliases, resolved per request from ``request.app.state``):

* ``Caller``: the authenticated :class:`~tensafe.server.tenants.Principal` (the
  :class:`~tensafe.server.limits.RequestGuard` authenticated it before the body was read);
* ``Svc``: the application's :class:`~tensafe.server.services.Services`;
* ``Cfg``: its :class:`~tensafe.server.settings.ServerSettings`;
* ``Jobs``: its :class:`~tensafe.server.jobs.Worker` (routes call ``wake()`` after a
  submission);
* ``Page20`` / ``Page100``: the query parameters ``limit`` (1 to 1000, default 20 or 100)
  and ``offset`` (0 to 2**31 - 1) of a paginated listing, as a :class:`Page`.

Ownership lookups, written once: :func:`own_session`, :func:`own_model`,
:func:`own_checkpoint` (and :func:`own_live_checkpoint` for REST paths) and
:func:`own_sampler` return the caller's row or raise
:class:`~tensafe.server.errors.NotFoundError`: another tenant's resource gets the same
404 as one that does not exist, so the answer never reveals that it exists. They take the
open database session of the route's transaction (a lookup belongs to the transaction that
acts on the row). :func:`audit` appends a record in the caller's name.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Annotated, Any, TypeVar

from fastapi import Depends, Header, Query, Request
from sqlalchemy import Select
from sqlalchemy.orm import Session

from tensafe import protocol as p
from tensafe.protocol import CHECKPOINT_KINDS, InvalidTinkerPathError, TinkerPath
from tensafe.server.checkpoints import find_checkpoint, is_expired, parse_checkpoint_path
from tensafe.server.errors import BadRequestError, NotFoundError
from tensafe.server.jobs import Worker
from tensafe.server.limits import principal_of
from tensafe.server.models import SamplingSessionRow, ServerSession, TrainingCheckpoint, TrainingModel
from tensafe.server.services import Services
from tensafe.server.settings import ServerSettings
from tensafe.server.states import ModelState
from tensafe.server.tenants import Principal, authenticate

__all__ = [
    "Caller",
    "Cfg",
    "Jobs",
    "Page",
    "Page20",
    "Page100",
    "Svc",
    "audit",
    "authenticate_key",
    "caller",
    "own_checkpoint",
    "own_live_checkpoint",
    "own_model",
    "own_sampler",
    "own_session",
    "own_session_row",
    "require_trainable",
    "require_usable",
    "route_checkpoint_path",
    "services_of",
    "settings_of",
    "worker_of",
]


def services_of(request: Request) -> Services:
    """The application's shared :class:`~tensafe.server.services.Services`."""
    services: Services = request.app.state.services
    return services


def settings_of(request: Request) -> ServerSettings:
    """The application's :class:`~tensafe.server.settings.ServerSettings`."""
    settings: ServerSettings = request.app.state.settings
    return settings


def worker_of(request: Request) -> Worker:
    """The application's in-process :class:`~tensafe.server.jobs.Worker`."""
    worker: Worker = request.app.state.worker
    return worker


def authenticate_key(services: Services, key: str | None) -> Principal:
    """Authenticate an API key in a read-only transaction (blocking: call it from a thread).

    Raises:
        AuthenticationError: The key is missing, malformed, unknown, revoked or expired.
    """
    with services.reads() as session:
        return authenticate(session, key)


def caller(request: Request, x_api_key: Annotated[str | None, Header(alias="X-API-Key")] = None) -> Principal:
    """The calling tenant.

    :class:`~tensafe.server.limits.RequestGuard` authenticated the ``X-API-Key`` header
    before the body was read; its result is reused. Without the guard (a router mounted
    on its own), the header is authenticated here.
    """
    principal = principal_of(request.scope)
    if principal is not None:
        return principal
    return authenticate_key(services_of(request), x_api_key)


@dataclass(frozen=True)
class Page:
    """One page of a listing: at most ``limit`` rows, from row ``offset``."""

    limit: int
    offset: int

    def of(self, query: Select[Any]) -> Select[Any]:
        """``query`` restricted to this page (order it first)."""
        return query.limit(self.limit).offset(self.offset)

    def cursor(self, total: int) -> p.Cursor:
        """The listing's cursor: this page of ``total`` rows."""
        return p.Cursor(offset=self.offset, limit=self.limit, total_count=int(total))


def _paging(default_limit: int) -> Any:
    def page(
        limit: Annotated[int, Query(ge=1, le=1000)] = default_limit,
        # The largest offset any database here takes (SQLite integers are 64-bit).
        offset: Annotated[int, Query(ge=0, le=2**31 - 1)] = 0,
    ) -> Page:
        return Page(limit=limit, offset=offset)

    return Depends(page)


Page20 = Annotated[Page, _paging(20)]
Page100 = Annotated[Page, _paging(100)]

#: A row numbered within a client session (``{session}:<kind>:{n}``).
SessionRow = TypeVar("SessionRow", TrainingModel, SamplingSessionRow)

Caller = Annotated[Principal, Depends(caller)]
Svc = Annotated[Services, Depends(services_of)]
Cfg = Annotated[ServerSettings, Depends(settings_of)]
Jobs = Annotated[Worker, Depends(worker_of)]


def audit(
    services: Services, session: Session, who: Principal, action: str, resource: str, **details: Any
) -> None:
    """Append the audit record of ``who``'s ``action`` on ``resource`` in ``session``'s transaction."""
    services.audit(
        session, tenant=who.tenant, actor=who.actor, action=action, resource=resource, details=details
    )


def own_session(session: Session, who: Principal, session_id: str) -> ServerSession:
    """The caller's client session ``session_id``, else 404."""
    row = session.get(ServerSession, session_id)
    if row is None or row.tenant_id != who.tenant:
        raise NotFoundError(f"unknown session {session_id!r}")
    return row


def own_session_row(
    session: Session, who: Principal, table: type[SessionRow], session_id: str, row_id: str
) -> SessionRow | None:
    """Before creating row ``row_id`` of ``table`` in client session ``session_id``: the
    existing row (a re-submission), or None; 404 unless the session is the caller's (a row of
    another tenant gets the same answer)."""
    own_session(session, who, session_id)
    existing = session.get(table, row_id)
    if existing is not None and existing.tenant_id != who.tenant:
        raise NotFoundError(f"unknown session {session_id!r}")
    return existing


def own_model(session: Session, who: Principal, model_id: str, *, noun: str = "model") -> TrainingModel:
    """The caller's training model ``model_id``, else 404 ``unknown {noun} ...``."""
    row = session.get(TrainingModel, model_id)
    if row is None or row.tenant_id != who.tenant:
        raise NotFoundError(f"unknown {noun} {model_id!r}")
    return row


def require_usable(row: TrainingModel) -> TrainingModel:
    """``row``, unless its creation failed (then a 400 that says why: it takes no requests)."""
    if row.state == ModelState.FAILED:
        raise BadRequestError(f"model {row.id!r} could not be created: {row.error}")
    return row


def require_trainable(row: TrainingModel) -> TrainingModel:
    """``row``, if it can take training requests: usable, and not the run of an uploaded adapter.

    Raises:
        BadRequestError: Its creation failed, or it only holds an uploaded adapter (which is
            loaded into a new run with ``load_weights``, not trained in place).
    """
    require_usable(row)
    if row.state == ModelState.UPLOADED:
        raise BadRequestError(
            f"model {row.id!r} holds an uploaded adapter and takes no requests; start a run from it "
            "with load_weights (create_training_client_from_state) or sample from it"
        )
    return row


def own_sampler(session: Session, who: Principal, sampler_id: str) -> SamplingSessionRow:
    """The caller's sampling session ``sampler_id``, else 404."""
    row = session.get(SamplingSessionRow, sampler_id)
    if row is None or row.tenant_id != who.tenant:
        raise NotFoundError(f"unknown sampling session {sampler_id!r}")
    return row


def route_checkpoint_path(run_id: str, kind: str, name: str) -> TinkerPath:
    """The checkpoint a REST route names by the parts of its URL.

    Raises:
        BadRequestError: ``kind`` is not a checkpoint kind.
        NotFoundError: ``run_id`` or ``name`` is not an identifier (no checkpoint has it).
    """
    if kind not in CHECKPOINT_KINDS:
        raise BadRequestError(
            f"{f'tinker://{run_id}/{kind}/{name}'[:120]!r}: the checkpoint kind must be one of "
            f"{', '.join(CHECKPOINT_KINDS)}"
        )
    try:
        return TinkerPath(run_id=run_id, kind=kind, name=name)
    except InvalidTinkerPathError:
        raise NotFoundError(f"unknown checkpoint {f'tinker://{run_id}/{kind}/{name}'[:120]!r}") from None


def own_live_checkpoint(session: Session, who: Principal, path: TinkerPath) -> TrainingCheckpoint:
    """The caller's live (unexpired) checkpoint at ``path``, else 404."""
    row = find_checkpoint(session, path.run_id, path.kind, path.name)
    if row is None or row.tenant_id != who.tenant or is_expired(row):
        raise NotFoundError(f"unknown checkpoint {str(path)!r}")
    return row


def own_checkpoint(session: Session, who: Principal, path: str) -> TrainingCheckpoint:
    """The caller's live checkpoint at the client's ``tinker://`` ``path``, else 404 (400 if malformed)."""
    return own_live_checkpoint(session, who, parse_checkpoint_path(path))
