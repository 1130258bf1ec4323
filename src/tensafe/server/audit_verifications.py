"""A bound on ``GET /api/v1/tensafe/audit/verify``: full chain verifications cost O(length) CPU.

Verifying a tenant's chain re-hashes every record and checks every checkpoint signature.
Without a bound, a tenant calling the endpoint in a loop keeps server cores busy. Per
process, :class:`AuditVerifications` therefore

* runs **at most one full verification per tenant per interval**
  (``TS_AUDIT_VERIFY_INTERVAL_S``, default 60 s): calls in between are answered from the
  tenant's cached result, marked ``cached: true`` with the ``verified_at`` time of the
  verification that produced it;
* runs **one verification per tenant at a time**: calls that arrive while one is running
  wait for it and share its result (they never start a second one);
* runs **at most** ``TS_AUDIT_VERIFY_CONCURRENCY`` (default 2) **verifications at once**
  across tenants; the rest wait for a slot without holding a thread (the waiting happens
  on the event loop).

It never answers 429 or 5xx for being busy: the Tinker SDK retries those for minutes,
which would only add load. A waiting call simply takes longer. A result is cached whether
the chain verified or not; an exception other than a failed verification (the database
is down) is not cached and propagates.

All state is touched only on the event loop's thread. The asyncio primitives are created
for the loop that uses them, so an application served again on another loop (a test
client created twice) starts with fresh ones and keeps its cache.
"""

from __future__ import annotations

import asyncio
import datetime as _dt
import time
from collections.abc import Callable
from dataclasses import dataclass

from starlette.concurrency import run_in_threadpool

from tensafe.audit import AuditVerificationError, VerificationReport
from tensafe.db import utcnow

__all__ = ["AuditVerifications", "VerificationOutcome"]


@dataclass(frozen=True)
class VerificationOutcome:
    """The result of one full verification of a tenant's chain.

    Attributes:
        report: What was verified, or None when verification failed.
        reason: Why it failed (one line), or None.
        verified_at: When the verification ran (UTC).
        monotonic: :func:`time.monotonic` at that time (for the interval).
    """

    report: VerificationReport | None
    reason: str | None
    verified_at: _dt.datetime
    monotonic: float


class AuditVerifications:
    """Per-process cache and limits for full audit chain verifications (see the module docstring)."""

    def __init__(
        self,
        verify: Callable[[str], VerificationReport],
        *,
        interval_seconds: float,
        concurrency: int,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        """Create the bound.

        Args:
            verify: Verifies one tenant's chain (blocking; runs in a worker thread) and
                raises :class:`~tensafe.audit.AuditVerificationError` when it fails.
            interval_seconds: Shortest time between two full verifications of a tenant.
            concurrency: Most verifications running at once.
            clock: Monotonic seconds (injectable for tests).
        """
        if not interval_seconds > 0 or concurrency < 1:
            raise ValueError("interval_seconds must be positive and concurrency at least 1")
        self._verify = verify
        self._interval = interval_seconds
        self._concurrency = concurrency
        self._clock = clock
        self._cache: dict[str, VerificationOutcome] = {}
        self._loop: asyncio.AbstractEventLoop | None = None
        self._slots = asyncio.Semaphore(concurrency)
        self._inflight: dict[str, asyncio.Task[VerificationOutcome]] = {}

    def _bind(self) -> asyncio.AbstractEventLoop:
        loop = asyncio.get_running_loop()
        if loop is not self._loop:
            self._loop = loop
            self._slots = asyncio.Semaphore(self._concurrency)
            self._inflight = {}
        return loop

    async def outcome(self, tenant: str) -> tuple[VerificationOutcome, bool]:
        """Return the tenant's verification outcome and whether it came from the cache.

        A cached outcome is one produced before this call; joining a verification that
        another call started counts as fresh.
        """
        loop = self._bind()
        cached = self._cache.get(tenant)
        if cached is not None and self._clock() - cached.monotonic < self._interval:
            return cached, True
        task = self._inflight.get(tenant)
        if task is None:
            task = loop.create_task(self._run(tenant))
            self._inflight[tenant] = task
            task.add_done_callback(lambda done: self._forget(tenant, done))
        # shield: a caller that disconnects does not cancel the verification others wait for.
        return await asyncio.shield(task), False

    def _forget(self, tenant: str, task: asyncio.Task[VerificationOutcome]) -> None:
        if self._inflight.get(tenant) is task:
            del self._inflight[tenant]

    async def _run(self, tenant: str) -> VerificationOutcome:
        async with self._slots:
            outcome = await run_in_threadpool(self._timed, tenant)
        self._cache[tenant] = outcome
        return outcome

    def _timed(self, tenant: str) -> VerificationOutcome:
        at, when = self._clock(), utcnow()
        try:
            report = self._verify(tenant)
        except AuditVerificationError as exc:
            return VerificationOutcome(None, str(exc), when, at)
        return VerificationOutcome(report, None, when, at)
