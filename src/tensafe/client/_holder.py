"""Shared state of one ``ServiceClient``: transport, thread pool, session and counters."""

from __future__ import annotations

import concurrent.futures
import contextlib
import threading
from collections.abc import Callable, Mapping
from typing import TypeVar

from tensafe._version import __version__
from tensafe.client._exceptions import APIError, GoneError
from tensafe.client._futures import APIFuture
from tensafe.client._http import Transport
from tensafe.client._requests import wire_body
from tensafe.protocol import (
    CreateSessionRequest,
    CreateSessionResponse,
    FinishReason,
    FinishSessionRequest,
    SessionHeartbeatRequest,
)

__all__ = ["Holder"]

T = TypeVar("T")

#: Seconds between session heartbeats.
HEARTBEAT_INTERVAL_S = 30.0


class Holder:
    """What a ServiceClient and the clients it creates share.

    The session is created lazily, by the first operation that needs one, and kept alive
    by a daemon heartbeat thread until :meth:`close`.
    """

    def __init__(
        self,
        transport: Transport,
        *,
        user_metadata: Mapping[str, str] | None = None,
        project_id: str | None = None,
        display_name: str | None = None,
        max_workers: int = 32,
    ) -> None:
        """Create the holder (no request is sent)."""
        self.transport = transport
        self.executor = concurrent.futures.ThreadPoolExecutor(
            max_workers, thread_name_prefix="tensafe-client"
        )
        self._user_metadata = dict(user_metadata or {})
        self._project_id = project_id
        self._display_name = display_name
        self._lock = threading.Lock()
        self._session_id: str | None = None
        self._model_seq = 0
        self._sampler_seq = 0
        self._stop = threading.Event()
        self._heartbeat: threading.Thread | None = None

    def run(self, fn: Callable[[], T]) -> APIFuture[T]:
        """Run ``fn`` in the pool as a future."""
        return APIFuture(self.executor, lambda _cancelled: fn())

    @property
    def session_id(self) -> str:
        """The session id, creating the session on first use."""
        with self._lock:
            if self._session_id is None:
                body = wire_body(
                    CreateSessionRequest,
                    tags=[],
                    user_metadata=self._user_metadata,
                    sdk_version=__version__,
                    project_id=self._project_id,
                    display_name=self._display_name,
                    type="create_session",
                )
                answer = self.transport.call(
                    "POST", "api/v1/create_session", CreateSessionResponse, json=body
                )
                self._session_id = answer.session_id
                self._heartbeat = threading.Thread(target=self._beat, name="tensafe-heartbeat", daemon=True)
                self._heartbeat.start()
            return self._session_id

    def next_model_seq(self) -> int:
        """Reserve the next ``model_seq_id`` of the session."""
        with self._lock:
            seq, self._model_seq = self._model_seq, self._model_seq + 1
            return seq

    def next_sampler_seq(self) -> int:
        """Reserve the next ``sampling_session_seq_id`` of the session."""
        with self._lock:
            seq, self._sampler_seq = self._sampler_seq, self._sampler_seq + 1
            return seq

    def _beat(self) -> None:
        while not self._stop.wait(HEARTBEAT_INTERVAL_S):
            try:
                self.transport.request(
                    "POST",
                    "api/v1/session_heartbeat",
                    json=wire_body(
                        SessionHeartbeatRequest, session_id=self._session_id, type="session_heartbeat"
                    ),
                    timeout=10.0,
                )
            except GoneError:
                return
            except APIError:
                continue

    def finish(self, reason: str) -> None:
        """Finish the session (if one was created), stop the heartbeat, close the pool."""
        self._stop.set()
        with self._lock:
            session_id, self._session_id = self._session_id, None
        try:
            if session_id is not None and not self.transport.closed:
                with contextlib.suppress(GoneError):
                    self.transport.request(
                        "POST",
                        f"api/v1/sessions/{session_id}/finish",
                        json=wire_body(
                            FinishSessionRequest,
                            reason=FinishReason.model_construct(type=reason),
                            detail=None,
                            exclude_none=False,
                        ),
                    )
        finally:
            self.executor.shutdown(wait=False, cancel_futures=False)
            self.transport.close()
