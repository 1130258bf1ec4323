"""Purging erased wrapped keys from the database files after a crypto-shred.

Setting ``tenant_deks.wrapped_dek`` to NULL destroys a DEK *logically* in one
transaction. The old bytes can survive in the database's files until the database
rewrites them, and nobody should be told "shredded" while they do. :func:`purge_erased`
asks the database to drop them and checks that it did, retrying with exponential
backoff (10 ms doubling up to 0.5 s) until a deadline; if the database still cannot,
it raises :class:`~tensafe.keys.errors.ShredIncompleteError`, which names
``tensafe keys shred --finish`` (:meth:`tensafe.keys.KeyManager.finish_shred`).

SQLite (WAL mode, the shred transaction ran with ``PRAGMA secure_delete=ON``, so the
new page images have the erased bytes zeroed): ``PRAGMA wal_checkpoint(TRUNCATE)``
copies every WAL frame into the main file, overwriting the old pages, and truncates
the ``-wal`` file to zero bytes. It returns ``(busy, log, checkpointed)``; success is
``busy = 0`` and an empty log. A reader holding a snapshot older than the shred (an
open read transaction on any connection) keeps the checkpoint from finishing: the old
page stays in the main file or the WAL, and the result is ``busy = 1``.

PostgreSQL: the UPDATE leaves the old row versions (with the wrapped DEK) as dead
tuples in the heap. An attempt succeeds when, in this order:

1. no session of this database (``pg_stat_activity``, any role) or background process,
   prepared transaction or replication slot holds a snapshot (``xmin``) or transaction
   id from before the purge started;
2. ``VACUUM tenant_deks`` leaves no dead tuple: the statistics VACUUM itself reports
   (``pg_stat_user_tables.n_dead_tup``, set to the dead tuples it could not remove)
   read 0 right after it. This also catches what step 1 cannot see (a standby's
   feedback arriving later, ``vacuum_defer_cleanup_age``);
3. ``VACUUM FULL tenant_deks`` rewrites the table into a new file holding only live rows
   (with ``lock_timeout`` 1 s: it needs an exclusive lock, so key reads wait for the
   few milliseconds it takes on this small table). Plain VACUUM alone is not enough:
   it frees the dead tuples' space inside the page without overwriting it, and the
   tests found the wrapped DEK still in the heap file afterwards. PostgreSQL truncates
   the old file when the rewrite commits and unlinks it at the next checkpoint.

WAL segments, archives, base backups and replicas keep their copies;
docs/security/keys.md ("Crypto-shredding") says exactly what remains.
"""

from __future__ import annotations

import math
import time
from collections.abc import Callable
from typing import Final

from sqlalchemy import Engine, text
from sqlalchemy.exc import OperationalError

from tensafe.keys.errors import KeyConfigurationError, ShredIncompleteError

__all__ = ["DEFAULT_PURGE_TIMEOUT_S", "check_timeout", "purge_erased"]

#: How long :func:`purge_erased` retries by default, in seconds.
DEFAULT_PURGE_TIMEOUT_S: Final = 30.0
_FIRST_DELAY_S: Final = 0.01
_MAX_DELAY_S: Final = 0.5
_SQLITE_ATTEMPT_BUSY_MS: Final = 250
_PG_LOCK_TIMEOUT_MS: Final = 1000
_PG_LOCK_NOT_AVAILABLE: Final = "55P03"

_PG_HORIZON_BLOCKERS: Final = text(
    """
    SELECT
      (SELECT count(*) FROM pg_stat_activity
        WHERE pid <> pg_backend_pid()
          AND (datname = current_database() OR datname IS NULL)
          AND (age(backend_xmin) > age(CAST(:t AS xid)) OR age(backend_xid) > age(CAST(:t AS xid))))
    + (SELECT count(*) FROM pg_prepared_xacts WHERE age(transaction) > age(CAST(:t AS xid)))
    + (SELECT count(*) FROM pg_replication_slots WHERE age(xmin) > age(CAST(:t AS xid)))
    """
)
_PG_DEAD_TUPLES: Final = text(
    "SELECT n_dead_tup FROM pg_stat_user_tables WHERE relid = to_regclass('tenant_deks')"
)
_PG_CAN_VACUUM: Final = text(
    "SELECT pg_has_role(c.relowner, 'USAGE') OR r.rolsuper FROM pg_class c, pg_roles r "
    "WHERE c.oid = to_regclass('tenant_deks') AND r.rolname = current_user"
)


def check_timeout(timeout_s: float) -> float:
    """Return ``timeout_s`` if it is a finite number of seconds >= 0, else raise."""
    if isinstance(timeout_s, bool) or not isinstance(timeout_s, int | float) or not math.isfinite(timeout_s):
        raise KeyConfigurationError("the shred purge timeout must be a finite number of seconds")
    if timeout_s < 0:
        raise KeyConfigurationError("the shred purge timeout must not be negative")
    return float(timeout_s)


def _incomplete(reason: str, *, tenant: str | None, destroyed: int) -> ShredIncompleteError:
    what = f"tenant {tenant!r}: its keys are" if tenant is not None else "shredded keys are"
    return ShredIncompleteError(
        f"{what} destroyed logically (every read is refused), but the erased wrapped keys may remain "
        f"in the database files: {reason}; close those readers, then run 'tensafe keys shred --finish' "
        "(KeyManager.finish_shred()) until it succeeds",
        tenant=tenant,
        destroyed=destroyed,
    )


def _retry(attempt: Callable[[], str | None], *, timeout_s: float) -> str | None:
    """Call ``attempt`` until it returns None (done) or the deadline passes; return the last reason."""
    deadline = time.monotonic() + timeout_s
    delay = _FIRST_DELAY_S
    while True:
        reason = attempt()
        if reason is None:
            return None
        remaining = deadline - time.monotonic()
        if remaining <= 0:
            return reason
        time.sleep(min(delay, remaining))
        delay = min(delay * 2, _MAX_DELAY_S)


def _sqlite_attempt(engine: Engine) -> str | None:
    raw = engine.raw_connection()
    try:
        cursor = raw.cursor()
        previous = int(cursor.execute("PRAGMA busy_timeout").fetchone()[0])
        cursor.execute(f"PRAGMA busy_timeout = {_SQLITE_ATTEMPT_BUSY_MS}")
        try:
            busy, log, _checkpointed = cursor.execute("PRAGMA wal_checkpoint(TRUNCATE)").fetchone()
        finally:
            cursor.execute(f"PRAGMA busy_timeout = {previous}")
    finally:
        raw.close()
    if busy == 0 and log in (0, -1):  # -1: not in WAL mode (nothing to checkpoint)
        return None
    return (
        "SQLite could not checkpoint and truncate its write-ahead log (a connection holds a read "
        "transaction that started before the shred, or a write is in progress)"
    )


def _postgres_attempt(engine: Engine, threshold: str) -> str | None:
    with engine.connect() as conn:
        conn = conn.execution_options(isolation_level="AUTOCOMMIT")
        blockers = int(conn.execute(_PG_HORIZON_BLOCKERS, {"t": threshold}).scalar_one())
        if blockers:
            return (
                f"{blockers} PostgreSQL session(s), prepared transaction(s) or replication slot(s) hold "
                "a snapshot from before the shred, so VACUUM cannot remove the old row versions yet"
            )
        conn.execute(text("VACUUM tenant_deks"))
        dead = conn.execute(_PG_DEAD_TUPLES).scalar_one_or_none()
        if dead is None or int(dead) > 0:
            return (
                f"VACUUM tenant_deks left {dead} dead row version(s) in the table (a snapshot, a "
                "standby's feedback or a concurrent key change still needs them)"
            )
        conn.execute(text(f"SET lock_timeout = {_PG_LOCK_TIMEOUT_MS}"))
        try:
            conn.execute(text("VACUUM FULL tenant_deks"))
        except OperationalError as exc:
            if getattr(exc.orig, "sqlstate", None) != _PG_LOCK_NOT_AVAILABLE:
                raise
            return "VACUUM FULL tenant_deks could not lock the table (a long transaction uses it)"
        finally:
            conn.execute(text("RESET lock_timeout"))
    return None


def _postgres_preflight(engine: Engine) -> tuple[str | None, str]:
    """Return ``(problem, threshold)``: a reason the purge cannot work at all, and the xid horizon."""
    with engine.connect() as conn:
        conn = conn.execution_options(isolation_level="AUTOCOMMIT")
        if conn.execute(text("SELECT current_setting('track_counts')")).scalar_one() != "on":
            return (
                "track_counts is off, so PostgreSQL cannot report whether VACUUM removed the old row "
                "versions; set track_counts = on"
            ), ""
        if not conn.execute(_PG_CAN_VACUUM).scalar_one_or_none():
            return (
                "the database role does not own tenant_deks, so its VACUUM would be skipped; run "
                "'VACUUM tenant_deks' as the table owner"
            ), ""
        next_xid = int(
            conn.execute(text("SELECT pg_snapshot_xmax(pg_current_snapshot())::text")).scalar_one()
        )
    return None, str(next_xid % 2**32)


def purge_erased(engine: Engine, *, timeout_s: float, tenant: str | None = None, destroyed: int = 0) -> None:
    """Make sure erased wrapped keys are gone from the database files, or raise.

    Args:
        engine: The key manager's engine.
        timeout_s: How long to retry while readers block the purge (0: one attempt).
        tenant: The tenant just shredded (for the error message), if any.
        destroyed: How many DEK versions that shred destroyed (kept on the error).

    Raises:
        ShredIncompleteError: The database could not (yet) drop the erased bytes.
    """
    timeout_s = check_timeout(timeout_s)
    dialect = engine.dialect.name
    if dialect == "sqlite":
        if engine.url.database in (None, "", ":memory:"):
            return  # nothing is on disk
        reason = _retry(lambda: _sqlite_attempt(engine), timeout_s=timeout_s)
    elif dialect == "postgresql":
        problem, threshold = _postgres_preflight(engine)
        if problem is not None:
            raise _incomplete(problem, tenant=tenant, destroyed=destroyed)
        reason = _retry(lambda: _postgres_attempt(engine, threshold), timeout_s=timeout_s)
    else:  # pragma: no cover - the engine factory accepts only these two
        raise KeyConfigurationError(f"crypto-shredding supports SQLite and PostgreSQL, not {dialect}")
    if reason is not None:
        raise _incomplete(f"{reason} (waited {timeout_s:g} s)", tenant=tenant, destroyed=destroyed)
