"""Durable futures: submission with de-duplication, and the worker that executes them.

A submitted request becomes a ``futures`` row (state ``queued``; the states and their
moves are :mod:`tensafe.server.states`). Requests that carry
training data or weights keep them as an encrypted artifact of the tenant
(``<future_id>.payload``), never in the database. A :class:`Worker` claims each model
through a lease on its ``training_models`` row and runs that model's futures one at a
time in ``seq_id`` order; the result is written back (JSON in the row, or bytes as the
encrypted artifact ``<future_id>.result``) in the same transaction as the audit record
of the outcome.

Durable completion overlapped with the next request: a handler whose result needs a
durable write first (``JobResult.durable``: the auto-checkpoint after a step) returns it
unwritten; the worker hands the write and the completing transaction to its background
committer (:mod:`tensafe.server.durability`) and goes on with the model's next queued
``forward``/``forward_backward`` (``Operation.overlaps_state_write``) while the write runs.
Completions are committed strictly in execution order: every other request of the model,
and any completion or failure while a commit of the model is pending, waits for it. The
future of a step therefore completes only once its state is durable, exactly as when the
write ran inline.

Crash recovery: when a worker takes over a model whose lease expired (the previous
worker died, or the server was restarted), futures left ``running`` are re-queued if
their operation is idempotent and failed with a clear ``server`` error otherwise; queued
futures simply run.
"""

from __future__ import annotations

import contextlib
import dataclasses
import datetime as _dt
import json
import logging
import secrets
import threading
from collections.abc import Callable, Iterator, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

from sqlalchemy import or_, select, update
from sqlalchemy.exc import IntegrityError
from sqlalchemy.orm import Session

from tensafe.db import utcnow
from tensafe.server.durability import OrderedCommitter
from tensafe.server.errors import BadRequestError, Category, JobFailedError, NotFoundError, ServerError
from tensafe.server.events import register_operation
from tensafe.server.models import FutureRow, TrainingModel
from tensafe.server.services import Services
from tensafe.server.states import FutureState, transition

__all__ = [
    "INLINE_MAX_BYTES",
    "JobContext",
    "JobFailedError",
    "JobResult",
    "Operation",
    "OperationRegistry",
    "Services",
    "StagedPayload",
    "Worker",
    "load_future",
    "open_record",
    "stage_payload",
    "submit_future",
]

_log = logging.getLogger("tensafe.server.jobs")

#: A periodic task of the worker loop (e.g. :class:`tensafe.server.retention.Sweeper`):
#: called once per loop pass, it decides itself whether it is due; it should not raise.
PeriodicTask = Callable[[], object]


@dataclass(frozen=True)
class JobContext:
    """One future being executed."""

    future_id: str
    tenant: str
    actor: str
    model_id: str | None
    seq_id: int | None
    request_type: str
    payload: Mapping[str, Any]
    payload_bytes: bytes | None
    services: Services


@dataclass(frozen=True)
class JobResult:
    """What a handler produced.

    Attributes:
        json: The JSON result (non-sensitive: ids, paths, metrics).
        data: A sensitive result (e.g. protobuf logprobs) stored encrypted; exclusive with ``json``.
        content_type: Media type of ``data``.
        apply: Database changes that must commit together with the result.
        details: Extra audit details (hashes, counts, privacy spent).
        after_commit: Called once the result is committed (e.g. delete a superseded
            artifact); its errors are logged, never raised.
        on_abort: Called instead of ``after_commit`` when the result could not be committed
            (the transaction failed, or another worker took the future over): it undoes what
            the handler did in memory (e.g. a staged ``forward_backward``), so that a request
            that did not complete leaves no trace.
        durable: A write that must be durable before the result is committed (e.g. the
            encrypted auto-checkpoint of a step). The worker runs it in its background
            committer, then commits the result; when it raises, the future fails with a
            ``server`` error and ``on_abort`` runs. It must not touch the live session.
    """

    json: Mapping[str, Any] | None = None
    data: bytes | None = None
    content_type: str = "application/json"
    apply: Callable[[Session], None] | None = None
    details: Mapping[str, Any] = field(default_factory=dict)
    after_commit: Callable[[], None] | None = None
    on_abort: Callable[[], None] | None = None
    durable: Callable[[], None] | None = None


@dataclass(frozen=True)
class Operation:
    """A registered asynchronous operation.

    Attributes:
        name: The request type stored in ``futures.request_type`` (e.g. ``create_model``).
        handler: Executes the job outside any database transaction.
        idempotent: Whether re-running after a crash is safe (else the future is failed).
        on_failure: Database changes to make when the job fails (same transaction).
        overlaps_state_write: The job may execute while the model's previous state change
            is still being written (it neither reads nor changes what that commit records:
            ``forward``, ``forward_backward``); its own completion is committed after it.
    """

    name: str
    handler: Callable[[JobContext], JobResult]
    idempotent: bool
    on_failure: Callable[[Session, JobContext, str], None] | None = None
    overlaps_state_write: bool = False


class OperationRegistry:
    """Request types the worker can execute."""

    def __init__(self) -> None:
        """Create an empty registry."""
        self._ops: dict[str, Operation] = {}

    def register(self, operation: Operation) -> None:
        """Add an operation (a name may be registered once) and register its audit events.

        The events are ``api.<name>``, ``api.<name>.complete`` and ``api.<name>.failed``
        (:func:`tensafe.server.events.register_operation`).
        """
        if operation.name in self._ops:
            raise ValueError(f"operation {operation.name!r} is already registered")
        register_operation(operation.name)
        self._ops[operation.name] = operation

    def get(self, name: str) -> Operation | None:
        """Return the operation called ``name``, if any."""
        return self._ops.get(name)

    def names(self) -> list[str]:
        """Return the registered names."""
        return sorted(self._ops)


#: Labels of the keyed digests the server records (``EncryptedArtifactStore.tenant_digest``).
REQUEST_DIGEST_LABEL = b"tensafe/request-digest/v2"
RESULT_DIGEST_LABEL = b"tensafe/result-digest/v1"


def request_digest(
    services: Services, tenant: str, request_type: str, payload: Mapping[str, Any] | None, data: bytes | None
) -> str:
    """The keyed digest of a request, for de-duplication and the audit log.

    HMAC-SHA256 under the tenant's digest key of the request type, its canonical JSON
    parameters and its raw bytes. Unlike a plain hash it lets no reader of the database or
    the audit log confirm a guess of the training data, and it becomes unlinkable once the
    tenant is crypto-shredded.
    """
    head = json.dumps(payload or {}, sort_keys=True, separators=(",", ":")).encode()
    return services.store.tenant_digest(
        tenant,
        label=REQUEST_DIGEST_LABEL,
        data=[request_type.encode(), b"\x00", head, b"\x00", data or b""],
    )


#: Request payloads and results up to this size are sealed into the future's row (one
#: database commit) instead of written as store files (a file, its fsync and a directory
#: fsync each); larger ones go to the store.
INLINE_MAX_BYTES = 1 << 20


@dataclass(frozen=True)
class StagedPayload:
    """A request's sensitive bytes, encrypted under the tenant's DEK, ready to submit.

    ``blob`` is the sealed record for a small payload (kept in the future's row); it is
    None when the payload was written to the store as artifact ``ref``.
    """

    ref: str
    blob: bytes | None = field(default=None, repr=False)


def stage_payload(services: Services, tenant: str, data: bytes) -> StagedPayload:
    """Encrypt a sensitive request payload for :func:`submit_future`.

    Call this *before* opening the database transaction that submits the future: the
    key manager needs its own connection (on SQLite an open write transaction would
    block it). Payloads up to :data:`INLINE_MAX_BYTES` are sealed in memory (the future's
    row will hold them); larger ones are written to the store, and :func:`submit_future`
    deletes that artifact when the submission turns out to be a duplicate.
    """
    ref = "payload-" + secrets.token_hex(12)
    if len(data) <= INLINE_MAX_BYTES:
        blob, _ = services.store.seal_bytes(tenant, ref, data, kind="request-payload")
        return StagedPayload(ref=ref, blob=blob)
    services.store.put_bytes(tenant, ref, data, kind="request-payload")
    return StagedPayload(ref=ref)


def submit_future(
    services: Services,
    session: Session,
    *,
    tenant: str,
    actor: str,
    request_type: str,
    model_id: str | None,
    seq_id: int | None,
    payload: Mapping[str, Any] | None = None,
    payload_bytes: bytes | None = None,
    staged: StagedPayload | None = None,
) -> tuple[FutureRow, bool]:
    """Record a request as a queued future, or return the existing one for ``(model_id, seq_id)``.

    Args:
        services: Shared services.
        session: An open session; the caller commits.
        tenant: Owning tenant.
        actor: Audit actor of the caller.
        request_type: The registered operation name.
        model_id: Training model or sampling session id (None: unordered request).
        seq_id: The client's sequence number within ``model_id``.
        payload: Non-sensitive JSON parameters (stored in the row).
        payload_bytes: Sensitive bytes (training data), hashed here for de-duplication;
            they must already be staged with :func:`stage_payload` as ``staged``.
        staged: ``payload_bytes`` as encrypted by :func:`stage_payload`.

    Returns:
        ``(future, created)``; ``created`` is False for an idempotent re-submission.

    Raises:
        BadRequestError: ``(model_id, seq_id)`` was already used by a different request.
    """
    if (payload_bytes is None) != (staged is None):
        raise ValueError("payload_bytes must be staged with stage_payload() and passed as staged")
    digest = request_digest(services, tenant, request_type, payload, payload_bytes)

    def duplicate(existing: FutureRow) -> tuple[FutureRow, bool]:
        if staged is not None and staged.blob is None:
            services.store.delete(tenant, staged.ref)
        return _same(existing, tenant, digest, model_id or "", seq_id or 0), False

    if model_id is not None and seq_id is not None:
        existing = _existing(session, model_id, seq_id)
        if existing is not None:
            return duplicate(existing)
    now = utcnow()
    row = FutureRow(
        id="req-" + secrets.token_hex(12),
        tenant_id=tenant,
        model_id=model_id,
        seq_id=seq_id,
        request_type=request_type,
        state=FutureState.QUEUED,
        actor=actor,
        request_sha256=digest,
        payload_json=None if payload is None else json.dumps(payload, sort_keys=True),
        payload_ref=None if staged is None else staged.ref,
        payload_blob=None if staged is None else staged.blob,
        attempts=0,
        created_at=now,
        updated_at=now,
    )
    try:
        with session.begin_nested():
            session.add(row)
            session.flush()
    except IntegrityError:
        # A concurrent re-submission of the same (model_id, seq_id) won the race.
        if model_id is None or seq_id is None:
            raise
        existing = _existing(session, model_id, seq_id)
        if existing is None:
            raise
        return duplicate(existing)
    return row, True


def _next_queued(model_id: str) -> Any:
    """The query of a model's next queued future (``seq_id`` order)."""
    return (
        select(FutureRow)
        .where(FutureRow.model_id == model_id, FutureRow.state == FutureState.QUEUED)
        .order_by(FutureRow.seq_id, FutureRow.created_at)
        .limit(1)
    )


def _existing(session: Session, model_id: str, seq_id: int) -> FutureRow | None:
    return session.execute(
        select(FutureRow).where(FutureRow.model_id == model_id, FutureRow.seq_id == seq_id)
    ).scalar_one_or_none()


def _same(row: FutureRow, tenant: str, digest: str, model_id: str, seq_id: int) -> FutureRow:
    if row.tenant_id != tenant:
        raise NotFoundError(f"unknown model {model_id!r}")
    if row.request_sha256 != digest:
        raise BadRequestError(
            f"seq_id {seq_id} of model {model_id!r} was already used by a different request; "
            "each request of a model needs the next seq_id"
        )
    return row


def load_future(session: Session, tenant: str, future_id: str) -> FutureRow:
    """Return the tenant's future ``future_id``.

    Raises:
        NotFoundError: No such future for this tenant.
    """
    row = session.get(FutureRow, future_id)
    if row is None or row.tenant_id != tenant:
        raise NotFoundError(f"unknown request_id {future_id!r}")
    return row


def open_record(services: Services, tenant: str, ref: str, blob: bytes | None) -> bytes:
    """Decrypt a payload or result: sealed in its row when ``blob`` is set, else a store artifact."""
    if blob is not None:
        return services.store.unseal_bytes(tenant, ref, blob)
    return services.store.get_bytes(tenant, ref)


# --------------------------------------------------------------------------- worker



def _audit_outcome(
    services: Services, session: Session, row: FutureRow, outcome: str, details: Mapping[str, Any]
) -> None:
    """Append ``api.<request_type>.<outcome>`` for the future ``row`` (its actor, its model)."""
    services.audit(
        session,
        tenant=row.tenant_id,
        actor=row.actor,
        action=f"api.{row.request_type}.{outcome}",
        resource=row.model_id or row.id,
        details=dict(details),
    )

class Worker:
    """Executes queued futures: per model strictly in ``seq_id`` order, one at a time.

    Several workers (threads or processes, on one PostgreSQL database) may run; a model
    is executed by the worker holding its lease. Models a worker holds are renewed on
    every pass, so their weights can stay loaded in that worker.
    """

    def __init__(
        self,
        services: Services,
        registry: OperationRegistry,
        *,
        lease_seconds: float = 30.0,
        poll_interval: float = 0.25,
        notify: Callable[[str], None] | None = None,
        worker_id: str | None = None,
        periodic: Sequence[PeriodicTask] = (),
    ) -> None:
        """Create a worker (call :meth:`start` to run it in a thread).

        ``periodic`` are the tasks the loop calls on every pass before looking for work
        (:func:`tensafe.server.app.create_app` passes the retention sweeper); an error one
        raises is logged and the loop goes on.
        """
        self.services = services
        self.registry = registry
        self.worker_id = worker_id or "w-" + secrets.token_hex(8)
        self._lease = _dt.timedelta(seconds=lease_seconds)
        self._interval = poll_interval
        self._notify = notify
        self._periodic = tuple(periodic)
        self._wake = threading.Event()
        self._stop = threading.Event()
        # Leases this worker holds (model id -> expiry it wrote) and models taken over but
        # not yet checked for futures a previous holder left running.
        self._held: dict[str, _dt.datetime] = {}
        self._fresh: set[str] = set()
        self._thread: threading.Thread | None = None
        # Durable writes and the completions queued behind them, in execution order.
        self._committer = OrderedCommitter(f"tensafe-commit-{self.worker_id}")
        # Per model, the next future, claimed by the transaction that completed the previous one.
        self._claimed: dict[str, FutureRow] = {}

    def __repr__(self) -> str:
        return f"Worker(id={self.worker_id!r})"

    def wake(self) -> None:
        """Ask the worker to look for work now (called after a submission)."""
        self._wake.set()

    def start(self) -> None:
        """Run :meth:`run_pending` in a daemon thread until :meth:`stop`."""
        if self._thread is not None:
            return
        self._thread = threading.Thread(target=self._loop, name=f"tensafe-{self.worker_id}", daemon=True)
        self._thread.start()

    def stop(self, timeout: float = 30.0) -> None:
        """Stop the thread after its current job, commit what is pending, release the leases."""
        self._stop.set()
        self._wake.set()
        if self._thread is not None:
            self._thread.join(timeout)
            self._thread = None
        self._committer.close(timeout)
        try:
            self._unclaim()
        except Exception:  # pragma: no cover - best effort at shutdown; recovery handles them
            _log.exception("could not put back the futures %s claimed ahead", self.worker_id)
        self._held.clear()
        try:
            with self.services.sessions.begin() as session:
                session.execute(
                    update(TrainingModel)
                    .where(TrainingModel.worker_id == self.worker_id)
                    .values(worker_id=None, lease_until=None)
                )
        except Exception:  # pragma: no cover - best effort at shutdown
            _log.exception("could not release the model leases of %s", self.worker_id)

    def _loop(self) -> None:
        while not self._stop.is_set():
            for task in self._periodic:
                try:
                    task()
                except Exception:
                    _log.exception("worker %s: periodic task %r failed; retrying later", self.worker_id, task)
            try:
                ran = self.run_pending()
            except Exception:
                _log.exception("worker %s: unexpected error; retrying", self.worker_id)
                ran = 0
            if not ran:
                self._wake.wait(self._interval)
                self._wake.clear()

    # -- one pass -------------------------------------------------------------------------

    def run_pending(self) -> int:
        """Execute every future that is runnable now and commit its outcome; return how many ran."""
        ran = 0
        for model_id in self._models_with_work():
            if self._stop.is_set():
                break
            if model_id is None:
                ran += self._run_unordered()
            elif self._acquire(model_id):
                ran += self._run_model(model_id)
        # Commits still being written were overlapped with this pass's requests; the pass
        # ends when they are done, so a future this pass ran is complete or failed.
        self._committer.wait()
        return ran

    def _models_with_work(self) -> list[str | None]:
        with self.services.reads() as session:
            rows = session.execute(
                select(FutureRow.model_id)
                .where(FutureRow.state.in_((FutureState.QUEUED, FutureState.RUNNING)))
                .distinct()
            ).scalars()
            return list(rows)

    def _acquire(self, model_id: str) -> bool:
        """Take or renew the lease on ``model_id``; False if another worker holds it.

        A lease this worker wrote recently is trusted without a database round trip: no
        other worker can take a model before its lease expires, so renewal is needed only
        once half of the lease has passed.
        """
        now = utcnow()
        held = self._held.get(model_id)
        if held is not None and held - now > self._lease / 2:
            return True
        self._held.pop(model_id, None)
        with self.services.sessions.begin() as session:
            result = session.execute(
                update(TrainingModel)
                .where(TrainingModel.id == model_id)
                .where(
                    or_(
                        TrainingModel.worker_id.is_(None),
                        TrainingModel.worker_id == self.worker_id,
                        TrainingModel.lease_until < now,
                    )
                )
                .values(worker_id=self.worker_id, lease_until=now + self._lease)
            )
            if not result.rowcount:  # type: ignore[attr-defined]
                return False
        if held is None or held <= now:
            self._fresh.add(model_id)  # newly taken: look for futures a dead worker left running
        self._held[model_id] = now + self._lease
        return True

    def _run_model(self, model_id: str) -> int:
        if model_id in self._fresh:
            self._recover(model_id)
            self._fresh.discard(model_id)
        ran = 0
        while not self._stop.is_set():
            # The previous request's completing transaction may have claimed this one.
            row = self._claimed.pop(model_id, None)
            if row is None:
                with self.services.reads() as session:
                    row = session.execute(_next_queued(model_id)).scalar_one_or_none()
                if row is None or not self._claim(row.id):
                    return ran
            with self._keep_lease(model_id):
                self._execute(row)
            ran += 1
            if not self._acquire(model_id):  # renew; another worker took over
                self._unclaim(model_id)
                return ran
        self._unclaim(model_id)
        return ran

    def _unclaim(self, model_id: str | None = None) -> None:
        """Put back futures claimed ahead (``_claimed``) that this worker will not run now.

        They never started, so they go back to ``queued`` (not to recovery, which would fail
        a non-idempotent one as interrupted).
        """
        ids = list(self._claimed) if model_id is None else [model_id]
        rows = [r for r in (self._claimed.pop(i, None) for i in ids) if r is not None]
        if not rows:
            return
        with self.services.sessions.begin() as session:
            session.execute(
                update(FutureRow)
                .where(
                    FutureRow.id.in_([r.id for r in rows]),
                    FutureRow.state == FutureState.RUNNING,
                    FutureRow.worker_id == self.worker_id,
                )
                .values(
                    state=transition(FutureState.RUNNING, FutureState.QUEUED),
                    worker_id=None,
                    attempts=FutureRow.attempts - 1,
                    updated_at=utcnow(),
                )
            )

    @contextlib.contextmanager
    def _keep_lease(self, model_id: str) -> Iterator[None]:
        """Renew the lease on ``model_id`` while a (possibly long) job runs.

        Without this, a job longer than the lease (a first model load, a large batch) lets
        another worker take the model over and run the same future a second time.
        """
        done = threading.Event()
        period = max(self._lease.total_seconds() / 3.0, 0.05)

        def renew() -> None:
            while not done.wait(period):
                try:
                    until = utcnow() + self._lease
                    with self.services.sessions.begin() as session:
                        renewed = session.execute(
                            update(TrainingModel)
                            .where(TrainingModel.id == model_id, TrainingModel.worker_id == self.worker_id)
                            .values(lease_until=until)
                        )
                    if renewed.rowcount:  # type: ignore[attr-defined]
                        self._held[model_id] = until
                except Exception:  # the next renewal retries; the lease check at completion decides
                    _log.warning("worker %s could not renew its lease on %s", self.worker_id, model_id)

        keeper = threading.Thread(target=renew, name=f"tensafe-lease-{self.worker_id}", daemon=True)
        keeper.start()
        try:
            yield
        finally:
            done.set()
            keeper.join()

    def _run_unordered(self) -> int:
        with self.services.reads() as session:
            rows = list(
                session.execute(
                    select(FutureRow)
                    .where(FutureRow.model_id.is_(None), FutureRow.state == FutureState.QUEUED)
                    .order_by(FutureRow.created_at)
                    .limit(16)
                ).scalars()
            )
        ran = 0
        for row in rows:
            if self._claim(row.id):
                self._execute(row)
                ran += 1
        return ran

    def _recover(self, model_id: str) -> None:
        """Handle futures another (dead) worker left running on a model we now lease."""
        with self.services.sessions.begin() as session:
            stale = list(
                session.execute(
                    select(FutureRow).where(
                        FutureRow.model_id == model_id,
                        FutureRow.state == FutureState.RUNNING,
                        or_(FutureRow.worker_id.is_(None), FutureRow.worker_id != self.worker_id),
                    )
                ).scalars()
            )
            dropped: list[tuple[str, str | None]] = []
            for row in stale:
                op = self.registry.get(row.request_type)
                if op is not None and op.idempotent:
                    _log.warning(
                        "re-queueing %s (%s) left running by %s", row.id, row.request_type, row.worker_id
                    )
                    row.state = transition(row.state, FutureState.QUEUED)
                    row.worker_id, row.updated_at = None, utcnow()
                    continue
                message = (
                    f"the server stopped while this {row.request_type} request was running; it was "
                    "not completed and cannot be safely repeated automatically: submit it again"
                )
                ref = self._finish_failed(session, row, message, "server", ctx=None)
                dropped.append((row.tenant_id, ref))
        for tenant, ref in dropped:
            self._drop_payload(tenant, ref)
        for row in stale:
            self._signal(row.id)

    def _claim(self, future_id: str) -> bool:
        with self.services.sessions.begin() as session:
            return self._claim_in(session, future_id, utcnow())

    def _claim_in(self, session: Session, future_id: str, now: _dt.datetime) -> bool:
        result = session.execute(
            update(FutureRow)
            .where(FutureRow.id == future_id, FutureRow.state == FutureState.QUEUED)
            .values(
                state=transition(FutureState.QUEUED, FutureState.RUNNING),
                worker_id=self.worker_id,
                started_at=now,
                updated_at=now,
                attempts=FutureRow.attempts + 1,
            )
        )
        return bool(result.rowcount)  # type: ignore[attr-defined]

    def _context(self, row: FutureRow) -> JobContext:
        """The future's context with its sensitive payload decrypted."""
        data = None
        if row.payload_ref is not None:
            data = open_record(self.services, row.tenant_id, row.payload_ref, row.payload_blob)
        return dataclasses.replace(self._bare_context(row), payload_bytes=data)

    def _await_turn(self, row: FutureRow, op: Operation | None) -> None:
        """Wait for the model's pending commits unless ``op`` may overlap them (module docstring)."""
        key = row.model_id
        if not self._committer.pending(key):
            return
        if op is not None and op.overlaps_state_write and self._committer.overlappable(key):
            return
        self._committer.wait(key)

    def _execute(self, row: FutureRow) -> None:
        op = self.registry.get(row.request_type)
        self._await_turn(row, op)
        ctx: JobContext | None = None
        try:
            if op is None:
                raise JobFailedError(
                    f"this server cannot execute {row.request_type!r} requests", category="user"
                )
            ctx = self._context(row)
            result = op.handler(ctx)
        except JobFailedError as exc:
            self._fail(row, str(exc), exc.category, ctx, op)
            return
        except ServerError as exc:
            self._fail(row, str(exc), "user" if exc.status_code < 500 else "server", ctx, op)
            return
        except Exception as exc:  # a bug or an infrastructure fault: never hang the future
            _log.exception("future %s (%s) failed", row.id, row.request_type)
            self._fail(
                row,
                f"internal error while running {row.request_type} ({type(exc).__name__})",
                "server",
                ctx,
                op,
            )
            return
        self._complete(row, result)

    def _complete(self, row: FutureRow, result: JobResult) -> None:
        """Commit ``result``: now, or after the write and the model's pending commits."""
        if not self._committer.pending(row.model_id):
            if result.durable is None:
                self._complete_now(row, result, claim_next=True)
                return
            if not self._queued(row.model_id):  # nothing to overlap with: no hand-over either
                self._complete_deferred(row, result, inline=True)
                return
        self._committer.submit(
            row.model_id, lambda: self._complete_deferred(row, result), state_write=result.durable is not None
        )

    def _queued(self, model_id: str | None) -> bool:
        """Whether the model has a queued future (one read)."""
        if model_id is None:
            return False
        with self.services.reads() as session:
            return session.execute(_next_queued(model_id)).first() is not None

    def _complete_deferred(self, row: FutureRow, result: JobResult, *, inline: bool = False) -> None:
        """Write what must be durable, then commit (or fail) the future.

        In the committer, or ``inline`` in the worker's thread when no commit of the model is
        pending and nothing is queued behind it (then nothing needs poisoning).
        """
        op = self.registry.get(row.request_type)
        if not inline and self._committer.poisoned(row.model_id):
            self._abort(row, result)
            self._fail_now(
                row,
                f"this {row.request_type} request ran after a request of the same model whose result "
                "could not be saved, so it was not completed: submit it again",
                "server",
                None,
                op,
            )
            return
        try:
            if result.durable is not None:
                result.durable()
        except Exception as exc:
            _log.exception("future %s (%s): the durable write failed", row.id, row.request_type)
            if not inline:
                self._committer.poison(row.model_id)
            self._abort(row, result)
            self._fail_now(
                row,
                f"the server could not save the state after this {row.request_type} "
                f"({type(exc).__name__}); it was not completed and the run is as before it: "
                "submit it again (for an optim_step, with its forward_backward requests)",
                "server",
                None,
                op,
            )
            return
        # In the committer an error poisons the model (OrderedCommitter).
        self._complete_now(row, result, claim_next=inline)

    def _complete_now(self, row: FutureRow, result: JobResult, *, claim_next: bool = False) -> None:
        """Commit the result (``claim_next``: in the worker's thread, claim the model's next future too)."""
        try:
            committed = self._commit_result(row, result, claim_next=claim_next)
        except BaseException:
            self._abort(row, result)
            raise
        if not committed:
            self._abort(row, result)
            return
        if result.after_commit is not None:
            try:
                result.after_commit()
            except Exception:
                _log.exception("after-commit action of future %s failed", row.id)
        self._drop_payload(row.tenant_id, None if row.payload_blob is not None else row.payload_ref)
        self._signal(row.id)

    @staticmethod
    def _abort(row: FutureRow, result: JobResult) -> None:
        if result.on_abort is not None:
            try:
                result.on_abort()
            except Exception:
                _log.exception("abort action of future %s failed", row.id)

    def _commit_result(self, row: FutureRow, result: JobResult, *, claim_next: bool = False) -> bool:
        """Store the result and complete the future in one transaction; False if taken over.

        With ``claim_next`` (only from the worker's own thread), the same transaction claims
        the model's next queued future while this worker's lease has more than half to run,
        saving the claim's own commit; :meth:`_run_model` runs it next.
        """
        result_ref = None
        result_blob = None
        details: dict[str, Any] = {"request_id": row.id, "request_digest": row.request_sha256}
        if row.seq_id is not None:
            details["seq_id"] = row.seq_id
        store = self.services.store
        if result.data is not None:
            result_ref = f"{row.id}.result"
            if len(result.data) <= INLINE_MAX_BYTES:
                result_blob, _ = store.seal_bytes(
                    row.tenant_id, result_ref, result.data, kind="request-result"
                )
            else:
                store.put_bytes(row.tenant_id, result_ref, result.data, kind="request-result")
            details["result_digest"] = store.tenant_digest(
                row.tenant_id, label=RESULT_DIGEST_LABEL, data=result.data
            )
            details["result_artifact"] = result_ref
        else:
            text = json.dumps(dict(result.json or {}), sort_keys=True)
            details["result_digest"] = store.tenant_digest(
                row.tenant_id, label=RESULT_DIGEST_LABEL, data=text.encode()
            )
        details.update(result.details)
        now = utcnow()
        with self.services.sessions.begin() as session:
            done = session.execute(
                update(FutureRow)
                .where(
                    FutureRow.id == row.id,
                    FutureRow.state == FutureState.RUNNING,
                    FutureRow.worker_id == self.worker_id,
                )
                .values(
                    state=transition(FutureState.RUNNING, FutureState.COMPLETE),
                    payload_ref=None,  # the staged payload is deleted below: no copy outlives the job
                    payload_blob=None,
                    result_json=None if result.data is not None else json.dumps(dict(result.json or {})),
                    result_ref=result_ref,
                    result_blob=result_blob,
                    result_content_type=result.content_type,
                    finished_at=now,
                    updated_at=now,
                )
            )
            if not done.rowcount:  # type: ignore[attr-defined]
                _log.warning("future %s was taken over by another worker; result discarded", row.id)
                return False
            if result.apply is not None:
                result.apply(session)
            _audit_outcome(self.services, session, row, "complete", details)
            if claim_next and row.model_id is not None and self._lease_fresh(row.model_id):
                nxt = session.execute(_next_queued(row.model_id)).scalar_one_or_none()
                if nxt is not None and self._claim_in(session, nxt.id, now):
                    session.expunge(nxt)
                    self._claimed[row.model_id] = nxt
        return True

    def _lease_fresh(self, model_id: str) -> bool:
        held = self._held.get(model_id)
        return held is not None and held - utcnow() > self._lease / 2

    def _fail(
        self, row: FutureRow, message: str, category: Category, ctx: JobContext | None, op: Operation | None
    ) -> None:
        """Fail the future: now, or after the model's pending commits (completion order)."""
        if not self._committer.pending(row.model_id):
            self._fail_now(row, message, category, ctx, op)
            return
        self._committer.submit(
            row.model_id, lambda: self._fail_now(row, message, category, ctx, op), state_write=False
        )

    def _fail_now(
        self, row: FutureRow, message: str, category: Category, ctx: JobContext | None, op: Operation | None
    ) -> None:
        with self.services.sessions.begin() as session:
            fresh = session.get(FutureRow, row.id)
            if fresh is None or fresh.state != FutureState.RUNNING or fresh.worker_id != self.worker_id:
                return
            dropped = self._finish_failed(session, fresh, message, category, ctx=ctx, op=op)
        self._drop_payload(row.tenant_id, dropped)
        self._signal(row.id)

    def _finish_failed(
        self,
        session: Session,
        row: FutureRow,
        message: str,
        category: Category,
        *,
        ctx: JobContext | None,
        op: Operation | None = None,
    ) -> str | None:
        """Mark ``row`` failed (the caller commits); return its staged payload to delete after commit."""
        now = utcnow()
        row.state = transition(row.state, FutureState.FAILED)
        row.error, row.error_category = message[:4000], category
        row.finished_at = row.updated_at = now
        payload_ref, row.payload_ref = row.payload_ref, None
        if row.payload_blob is not None:  # sealed in the row: cleared with it, no file to delete
            row.payload_blob, payload_ref = None, None
        if op is None:
            op = self.registry.get(row.request_type)
        if op is not None and op.on_failure is not None:
            op.on_failure(session, ctx or self._bare_context(row), message)
        _audit_outcome(
            self.services,
            session,
            row,
            "failed",
            {"request_id": row.id, "request_digest": row.request_sha256, "category": category},
        )
        return payload_ref

    def _drop_payload(self, tenant: str, ref: str | None) -> None:
        """Delete a finished future's staged request payload (its row no longer points at it).

        Called only after the future's terminal state is committed: until then a worker that
        re-runs the future after a crash still needs the payload. A failure to delete leaves
        an unreferenced encrypted artifact behind; it is logged, never raised.
        """
        if ref is None:
            return
        try:
            self.services.store.delete(tenant, ref)
        except Exception:
            _log.exception("could not delete the staged payload %s of tenant %s", ref, tenant)

    def _bare_context(self, row: FutureRow) -> JobContext:
        """The future's context without its payload (failure handlers need no training data)."""
        return JobContext(
            future_id=row.id,
            tenant=row.tenant_id,
            actor=row.actor,
            model_id=row.model_id,
            seq_id=row.seq_id,
            request_type=row.request_type,
            payload=json.loads(row.payload_json) if row.payload_json else {},
            payload_bytes=None,
            services=self.services,
        )

    def _signal(self, future_id: str) -> None:
        if self._notify is not None:
            try:
                self._notify(future_id)
            except Exception:  # pragma: no cover - a closed event loop at shutdown
                _log.debug("could not notify waiters of %s", future_id)
