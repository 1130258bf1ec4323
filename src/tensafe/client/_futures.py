"""``APIFuture``: the result of an asynchronous server operation, sync or async.

A future is resolved by a background thread of the client. Server-side futures are
long-polled through ``POST /api/v1/retrieve_future``: the server holds the request while
the operation is pending and answers 408 ``try_again`` after a while; the client then
polls again at once.
"""

from __future__ import annotations

import asyncio
import concurrent.futures
import threading
from collections.abc import Callable, Generator
from typing import Any, Generic, Literal, TypeVar

from tensafe.client._exceptions import APIResponseValidationError, RequestFailedError
from tensafe.client._http import Transport
from tensafe.client._requests import wire_body
from tensafe.protocol import RetrieveFutureRequest

__all__ = ["APIFuture", "FutureStatus", "retrieve"]

T = TypeVar("T")

#: What :meth:`APIFuture.status` answers.
FutureStatus = Literal["pending", "done", "failed", "cancelled"]

#: How long one ``retrieve_future`` request may stay open (the server answers sooner).
_POLL_TIMEOUT_S = 60.0


class APIFuture(Generic[T]):
    """A pending result: ``result(timeout)``, ``await future``, ``status()``, ``cancel()``.

    ``cancel()`` stops waiting on this side only: an operation the server has already
    accepted still runs there (its outcome stays in the audit log and can be fetched
    again with a new future on the same request id).
    """

    def __init__(
        self,
        executor: concurrent.futures.Executor,
        work: Callable[[threading.Event], T],
        *,
        request_id: str | None = None,
    ) -> None:
        """Start ``work(cancelled_event)`` on ``executor``; its return value is the result."""
        self.request_id = request_id
        self._cancelled = threading.Event()
        self._future: concurrent.futures.Future[T] = concurrent.futures.Future()
        executor.submit(self._run, work)

    @classmethod
    def completed(cls, value: T) -> APIFuture[T]:
        """A future that is already done with ``value``."""
        future: APIFuture[T] = cls.__new__(cls)
        future.request_id = None
        future._cancelled = threading.Event()
        future._future = concurrent.futures.Future()
        future._future.set_result(value)
        return future

    @classmethod
    def failed(cls, error: BaseException) -> APIFuture[T]:
        """A future that has already failed with ``error``."""
        future: APIFuture[T] = cls.__new__(cls)
        future.request_id = None
        future._cancelled = threading.Event()
        future._future = concurrent.futures.Future()
        future._future.set_exception(error)
        return future

    def _run(self, work: Callable[[threading.Event], T]) -> None:
        try:
            value = work(self._cancelled)
        except BaseException as exc:  # delivered to whoever waits on the future
            if self._future.set_running_or_notify_cancel():
                self._future.set_exception(exc)
            return
        if self._future.set_running_or_notify_cancel():
            self._future.set_result(value)

    def __repr__(self) -> str:
        return f"APIFuture(request_id={self.request_id!r}, status={self.status()!r})"

    def result(self, timeout: float | None = None) -> T:
        """Block until the result is there.

        Raises:
            TimeoutError: ``timeout`` seconds passed first (the future keeps running).
            concurrent.futures.CancelledError: The future was cancelled.
            RequestFailedError: The operation failed on the server.
        """
        return self._future.result(timeout)

    async def result_async(self, timeout: float | None = None) -> T:
        """Await the result without blocking the event loop (same errors as :meth:`result`)."""
        wrapped = asyncio.wrap_future(self._future)
        return await asyncio.wait_for(asyncio.shield(wrapped), timeout)

    def __await__(self) -> Generator[Any, None, T]:
        return self.result_async().__await__()

    def future(self) -> concurrent.futures.Future[T]:
        """The underlying ``concurrent.futures.Future``."""
        return self._future

    def done(self) -> bool:
        """Whether the future has finished (with a result, an error, or cancelled)."""
        return self._future.done()

    def status(self) -> FutureStatus:
        """``pending``, ``done``, ``failed`` or ``cancelled``."""
        if self._future.cancelled():
            return "cancelled"
        if not self._future.done():
            return "pending"
        return "failed" if self._future.exception() is not None else "done"

    def cancel(self) -> bool:
        """Stop waiting for the result; returns whether the future was still pending."""
        self._cancelled.set()
        return self._future.cancel()


def retrieve(
    transport: Transport,
    request_id: str,
    cancelled: threading.Event,
    *,
    on_json: Callable[[dict[str, Any]], Any],
    on_proto: Callable[[bytes], Any] | None = None,
    request_type: str = "",
) -> Any:
    """Long-poll a server future until it completes; decode its result.

    Raises:
        RequestFailedError: The future failed (with the server's message and category).
        APIResponseValidationError: The result has an unexpected form.
        concurrent.futures.CancelledError: ``cancelled`` was set.
    """
    headers = {"X-Tinker-Request-Type": request_type} if request_type else {}
    if on_proto is not None:
        headers["Accept"] = "application/x-protobuf, application/json"
    while True:
        if cancelled.is_set():
            raise concurrent.futures.CancelledError()
        response = transport.request(
            "POST",
            "api/v1/retrieve_future",
            json=wire_body(RetrieveFutureRequest, request_id=request_id, allow_metadata_only=False),
            headers=headers,
            timeout=_POLL_TIMEOUT_S,
            accept=(408,),
        )
        if response.status_code == 408:
            continue
        if "application/x-protobuf" in response.headers.get("content-type", ""):
            if on_proto is None:
                raise APIResponseValidationError(f"unexpected protobuf result for request {request_id}")
            return on_proto(response.content)
        try:
            body = response.json()
        except ValueError:
            raise APIResponseValidationError(f"request {request_id}: the result is not JSON") from None
        if not isinstance(body, dict):
            raise APIResponseValidationError(f"request {request_id}: the result is not a JSON object")
        if body.get("type") == "try_again":
            continue
        if "error" in body:
            category = body.get("category")
            raise RequestFailedError(
                str(body["error"]),
                request_id=request_id,
                category=category if category in ("user", "server") else "unknown",
            )
        return on_json(body)
