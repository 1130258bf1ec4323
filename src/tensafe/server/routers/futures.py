"""``retrieve_future``: long-polling a durable future, woken by the in-process worker.

A request waits up to ``TS_SERVER_LONG_POLL_S`` for the future to finish: each
:class:`Waiters` event set by the worker's ``notify`` (or every poll interval, for a future
another process runs) re-reads the row. It answers the result, the failure, or 408
``try_again``; a result deleted by the retention sweep is a 410.
"""

# No "from __future__ import annotations": FastAPI evaluates the annotations.

import asyncio
import contextlib
import json
import time
from typing import Annotated

from fastapi import APIRouter, Depends, Request
from fastapi.concurrency import run_in_threadpool
from fastapi.responses import JSONResponse, Response

from tensafe import protocol as p
from tensafe.server.deps import Caller, Cfg, Svc
from tensafe.server.errors import ResultExpiredError
from tensafe.server.jobs import load_future, open_record
from tensafe.server.models import FutureRow
from tensafe.server.retention import RESULT_EXPIRED
from tensafe.server.services import Services
from tensafe.server.states import FutureState

__all__ = ["Waiters", "result_response", "router"]


class Waiters:
    """Wakes long-polling ``retrieve_future`` requests when the in-process worker finishes."""

    def __init__(self) -> None:
        """No waiter yet; :meth:`bind` the event loop before the first :meth:`notify`."""
        self._loop: asyncio.AbstractEventLoop | None = None
        self._events: dict[str, set[asyncio.Event]] = {}

    def bind(self, loop: asyncio.AbstractEventLoop) -> None:
        """Deliver notifications on ``loop`` (the application's event loop)."""
        self._loop = loop

    def notify(self, future_id: str) -> None:
        """Thread-safe: wake every waiter of ``future_id``."""
        loop = self._loop
        if loop is not None and not loop.is_closed():
            loop.call_soon_threadsafe(self._set, future_id)

    def _set(self, future_id: str) -> None:
        for event in self._events.get(future_id, ()):
            event.set()

    async def wait(self, future_id: str, timeout: float) -> None:
        """Return when ``future_id`` is notified or after ``timeout`` seconds."""
        event = asyncio.Event()
        self._events.setdefault(future_id, set()).add(event)
        try:
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(event.wait(), timeout)
        finally:
            waiting = self._events.get(future_id)
            if waiting is not None:
                waiting.discard(event)
                if not waiting:
                    del self._events[future_id]


def waiters_of(request: Request) -> Waiters:
    """The application's :class:`Waiters`."""
    waiters: Waiters = request.app.state.waiters
    return waiters


def result_response(services: Services, row: FutureRow) -> Response:
    """The answer for a finished future: its result, its failure, or 410 once the result expired."""
    if row.result_content_type == RESULT_EXPIRED:
        raise ResultExpiredError(
            f"the result of request {row.id!r} was deleted: results are kept for "
            f"{services.result_ttl_seconds:g} s after the request finished"
        )
    if row.state == FutureState.FAILED:
        body = p.FutureFailed(error=row.error or "request failed", category=row.error_category or "unknown")  # type: ignore[arg-type]
        return JSONResponse(body.model_dump())
    if row.result_ref is not None:
        data = open_record(services, row.tenant_id, row.result_ref, row.result_blob)
        return Response(data, media_type=row.result_content_type or "application/octet-stream")
    return JSONResponse(json.loads(row.result_json or "{}"))


router = APIRouter(prefix="/api/v1", tags=["futures"])


@router.post(
    "/retrieve_future",
    responses={408: {"description": "not finished yet: poll again", "model": p.TryAgain}},
)
async def retrieve_future(
    body: p.RetrieveFutureRequest,
    who: Caller,
    services: Svc,
    settings: Cfg,
    waiters: Annotated[Waiters, Depends(waiters_of)],
) -> Response:
    """Long-poll a future: its result, its failure, or 408 ``try_again`` after ~25 s."""

    def load() -> FutureRow:
        with services.reads() as session:
            return load_future(session, who.tenant, body.request_id)

    deadline = time.monotonic() + settings.long_poll_seconds
    while True:
        row = await run_in_threadpool(load)
        if row.state in (FutureState.COMPLETE, FutureState.FAILED):
            return await run_in_threadpool(result_response, services, row)
        remaining = deadline - time.monotonic()
        if remaining <= 0:
            return JSONResponse(p.TryAgain(request_id=row.id).model_dump(exclude_none=True), 408)
        await waiters.wait(row.id, min(remaining, settings.poll_interval_seconds))
