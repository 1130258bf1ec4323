"""The key manager: tenant DEKs wrapped under the deployment KEK, rotation and shredding.

Every wrapped key in the database is bound to its row (:mod:`tensafe.keys._binding`):
a tenant DEK to its tenant and version, the deployment signing key's sealing key to the
key's name and id. The deployment's verifying key is always derived from the unwrapped
private key; the stored ``public_key`` column is only compared with it, so a database
writer who replaces it makes every use of the key fail instead of handing out their key.

Legacy rows (written before binding) are refused until :meth:`KeyManager.rebind_all`
(``tensafe keys rebind``) re-wraps them. A crypto-shred reports success only once the
database has dropped the erased bytes from its files (:mod:`tensafe.keys._purge`);
otherwise it raises :class:`~tensafe.keys.errors.ShredIncompleteError` and
:meth:`KeyManager.finish_shred` completes it later. Every key event is appended with the
deployment signing key and checkpoint interval, so it is covered by signed checkpoints.
"""

from __future__ import annotations

import contextlib
import hashlib
import hmac
import logging
import secrets
import threading
from collections import OrderedDict
from collections.abc import Iterator, Mapping
from dataclasses import dataclass
from typing import Any

from sqlalchemy import Engine, and_, func, inspect, or_, select, text
from sqlalchemy.exc import IntegrityError, OperationalError, ProgrammingError
from sqlalchemy.orm import Session

from tensafe.crypto.aead import open_sealed, seal
from tensafe.crypto.errors import CryptoError
from tensafe.crypto.signing import HybridSigningKey, HybridVerifyingKey
from tensafe.db import Tenant, utcnow
from tensafe.keys._audit import DEFAULT_ACTOR, DEPLOYMENT_TENANT, record_key_event
from tensafe.keys._binding import dek_context, deployment_key_context
from tensafe.keys._config import DEFAULT_AUDIT_CHECKPOINT_EVERY, KeySettings, open_provider
from tensafe.keys._provider import KekProvider
from tensafe.keys._purge import DEFAULT_PURGE_TIMEOUT_S, check_timeout, purge_erased
from tensafe.keys.errors import (
    KeyConfigurationError,
    KeyManagementError,
    KeyNotFoundError,
    ProviderError,
    TenantShreddedError,
)
from tensafe.keys.models import DeploymentKey, TenantDek
from tensafe.storage import EncryptedArtifactStore

__all__ = ["DekInfo", "KekRotation", "KeyManager"]

_log = logging.getLogger("tensafe.keys")

DEK_BYTES = 32
SIGNING_KEY_NAME = "signing"
_SIGNING_KIND = "hybrid-signing/ed25519+ml-dsa-65"
_LABEL_DEPLOYMENT_KEY = "tensafe/deployment-key/v1"
_CACHE_SIZE = 1024


@dataclass(frozen=True)
class DekInfo:
    """Non-secret facts about one DEK version."""

    tenant_id: str
    version: int
    state: str
    kek_provider: str
    kek_version: int
    created_at: str
    destroyed_at: str | None


@dataclass(frozen=True)
class KekRotation:
    """Outcome of :meth:`KeyManager.rotate_kek`."""

    previous_version: int
    new_version: int
    rewrapped: int


@dataclass(frozen=True)
class _StoredKey:
    """A ``deployment_keys`` row read out of its session."""

    name: str
    kind: str
    key_id: str
    public_key: bytes
    kek_provider: str
    kek_version: int
    wrapped_key: bytes
    sealed_private: bytes

    @classmethod
    def from_row(cls, row: DeploymentKey) -> _StoredKey:
        return cls(
            name=row.name,
            kind=row.kind,
            key_id=row.key_id,
            public_key=bytes(row.public_key),
            kek_provider=row.kek_provider,
            kek_version=row.kek_version,
            wrapped_key=bytes(row.wrapped_key),
            sealed_private=bytes(row.sealed_private),
        )

    def fingerprint(self) -> bytes:
        """SHA-256 over every column that the opened key depends on (cache key)."""
        digest = hashlib.sha256()
        for part in (
            self.name.encode(),
            self.kind.encode(),
            self.key_id.encode(),
            self.public_key,
            self.kek_provider.encode(),
            str(self.kek_version).encode(),
            self.wrapped_key,
            self.sealed_private,
        ):
            digest.update(len(part).to_bytes(8, "big") + part)
        return digest.digest()

    @property
    def context(self) -> bytes:
        """The binding context of this row's wrapped sealing key."""
        return deployment_key_context(name=self.name, key_id=self.key_id)


def _shredded(tenant: str) -> TenantShreddedError:
    return TenantShreddedError(
        f"tenant {tenant!r} was deleted and its keys destroyed (crypto-shredded); "
        "its data can no longer be decrypted"
    )


class KeyManager:
    """Tenant DEKs wrapped by a :class:`KekProvider` and stored in the database.

    It implements :class:`tensafe.storage.DekResolver`, so it can be handed straight to
    :class:`tensafe.storage.EncryptedArtifactStore`. Unwrapped DEKs are cached in
    memory (keyed by the wrapped blob), but the database row is read on every call, so a
    tenant shredded by another process is refused immediately.

    Every key change (DEK created or rotated, tenant shredded, KEK rotated and keys
    re-wrapped or rebound, deployment signing key created) appends an audit record in the
    same database transaction as the change; there is no way to turn this off. The
    appends pass the deployment signing key (loaded once and cached) and the checkpoint
    interval, so a signed checkpoint is made whenever one is due. See ``docs/audit.md``
    ("Event ids") for the events and their details.
    """

    def __init__(
        self,
        engine: Engine,
        provider: KekProvider,
        *,
        production: bool = False,
        actor: str = DEFAULT_ACTOR,
        audit_checkpoint_every: int | None = DEFAULT_AUDIT_CHECKPOINT_EVERY,
        purge_timeout_s: float = DEFAULT_PURGE_TIMEOUT_S,
    ) -> None:
        """Create a manager.

        Args:
            engine: Database engine; the schema must be migrated (``tensafe db upgrade``).
            provider: The deployment's KEK provider.
            production: Whether production rules apply (used by :meth:`from_environment`).
            actor: Who the audit records name as acting (an identifier such as
                ``user:alice`` or ``service:api``, never a credential).
            audit_checkpoint_every: The deployment's audit checkpoint interval
                (``TS_AUDIT_CHECKPOINT_EVERY``): key events are appended with the
                deployment signing key and sign a checkpoint whenever one is due.
                ``None`` never signs (audit verification then fails once that many key
                events are unsigned; for tests and tools only).
            purge_timeout_s: How long :meth:`shred_tenant` and :meth:`finish_shred` wait
                for readers that keep the database from dropping erased keys, in seconds.

        Raises:
            KeyConfigurationError: A non-positive interval or a negative timeout.
        """
        if audit_checkpoint_every is not None and (
            isinstance(audit_checkpoint_every, bool)
            or not isinstance(audit_checkpoint_every, int)
            or audit_checkpoint_every < 1
        ):
            raise KeyConfigurationError("audit_checkpoint_every must be a positive integer or None")
        self._engine = engine
        self._provider = provider
        self._production = production
        self._actor = actor
        self._checkpoint_every = audit_checkpoint_every
        self._purge_timeout_s = check_timeout(purge_timeout_s)
        self._cache: OrderedDict[tuple[str, int, int, bytes], bytes] = OrderedDict()
        self._signing: tuple[bytes, HybridSigningKey] | None = None
        self._lock = threading.Lock()

    def __repr__(self) -> str:
        return f"KeyManager(provider={self._provider!r})"

    @classmethod
    def from_environment(
        cls,
        env: Mapping[str, str] | None = None,
        *,
        engine: Engine | None = None,
        create: bool | None = None,
        actor: str = DEFAULT_ACTOR,
    ) -> KeyManager:
        """Build a manager from ``TS_*`` variables and ``DATABASE_URL``.

        In production, missing or weak configuration is refused. In development, a
        missing local KEK (and its passphrase) is created once under ``TS_DATA_DIR`` and a
        loud warning is logged; later starts load the same keys. The audit checkpoint
        interval comes from ``TS_AUDIT_CHECKPOINT_EVERY`` (default 1000).

        Args:
            env: Environment to read (default :data:`os.environ`).
            engine: Database engine (default: from ``DATABASE_URL``).
            create: Create a missing KEK (default: in development only).
            actor: Who the audit records name as acting.

        Raises:
            KeyConfigurationError: Missing or weak configuration (including a
                ``TS_AUDIT_CHECKPOINT_EVERY`` that is not a positive integer), or an
                unmigrated database.
            ProviderError: The KEK provider could not be reached.
        """
        settings = KeySettings.from_environment(env)
        checkpoint_every = settings.audit_checkpoint_every
        if engine is None:
            from tensafe.db import create_engine_from_url, get_database_url

            url = settings.get("DATABASE_URL") or get_database_url()
            engine = create_engine_from_url(url)
        if not inspect(engine).has_table("tenant_deks"):
            raise KeyConfigurationError("the database has no key tables; run 'tensafe db upgrade' first")
        provider = open_provider(settings, create=(not settings.production) if create is None else create)
        return cls(
            engine,
            provider,
            production=settings.production,
            actor=actor,
            audit_checkpoint_every=checkpoint_every,
        )

    @property
    def provider(self) -> KekProvider:
        """The KEK provider."""
        return self._provider

    @property
    def actor(self) -> str:
        """The actor named in this manager's audit records."""
        return self._actor

    @property
    def engine(self) -> Engine:
        """The database engine."""
        return self._engine

    @property
    def audit_checkpoint_every(self) -> int | None:
        """The checkpoint interval key events are appended with."""
        return self._checkpoint_every

    def close(self) -> None:
        """Forget cached DEKs and the signing key, and close the provider."""
        with self._lock:
            self._cache.clear()
            self._signing = None
        self._provider.close()

    # -- helpers ------------------------------------------------------------------------

    @contextlib.contextmanager
    def _session(self, *, begin: str | None = None) -> Iterator[Session]:
        bind = self._engine if begin is None else self._engine.execution_options(tensafe_sqlite_begin=begin)
        try:
            with Session(bind, expire_on_commit=False) as session, session.begin():
                yield session
        except (OperationalError, ProgrammingError) as exc:
            if "tenant_deks" in str(exc) or "deployment_keys" in str(exc):
                raise KeyConfigurationError(
                    "the database has no key tables; run 'tensafe db upgrade' first"
                ) from None
            raise

    @contextlib.contextmanager
    def _read_session(self) -> Iterator[Session]:
        """A read-only transaction: on SQLite it does not take (or wait for) the write lock."""
        with self._session(begin="DEFERRED") as session:
            yield session

    def _check_tenant(self, session: Session, tenant: str) -> None:
        row = session.get(Tenant, tenant)
        if row is None:
            raise KeyNotFoundError(f"unknown tenant {tenant!r}")
        if row.deleted_at is not None:
            raise _shredded(tenant)

    def _check_provider(self, provider_name: str) -> None:
        if provider_name != self._provider.name:
            raise KeyConfigurationError(
                f"a stored key is wrapped by the {provider_name!r} KEK provider but {self._provider.name!r} "
                "is configured; set TS_KEK_PROVIDER to the provider that holds the deployment's KEK"
            )

    def _unwrap(self, tenant: str, version: int, kek_version: int, blob: bytes) -> bytes:
        cache_key = (tenant, version, kek_version, hashlib.sha256(blob).digest())
        with self._lock:
            cached = self._cache.get(cache_key)
            if cached is not None:
                self._cache.move_to_end(cache_key)
                return cached
        dek = self._provider.unwrap(kek_version, blob, context=dek_context(tenant=tenant, version=version))
        if len(dek) != DEK_BYTES:
            raise KeyManagementError("an unwrapped DEK has the wrong length")
        with self._lock:
            self._cache[cache_key] = dek
            while len(self._cache) > _CACHE_SIZE:
                self._cache.popitem(last=False)
        return dek

    def _forget(self, tenant: str) -> None:
        with self._lock:
            for key in [k for k in self._cache if k[0] == tenant]:
                del self._cache[key]

    def _checkpoint_signer(self) -> HybridSigningKey | None:
        """The signer for key-event appends; call it *before* opening a write transaction.

        Loading (or, the first time, creating) the deployment signing key reads and may
        write the database, which must not happen inside another open write transaction
        (SQLite has one writer).
        """
        if self._checkpoint_every is None:
            return None
        return self.deployment_signing_key()

    def _record(
        self,
        session: Session,
        event: str,
        *,
        tenant: str,
        resource: str,
        details: Mapping[str, Any],
        signer: HybridSigningKey | None,
    ) -> None:
        record_key_event(
            session,
            event,
            tenant=tenant,
            actor=self._actor,
            resource=resource,
            details=details,
            signer=signer,
            checkpoint_every=self._checkpoint_every,
        )

    def _audit_dek(
        self,
        session: Session,
        event: str,
        row: TenantDek,
        *,
        retired: list[int],
        signer: HybridSigningKey | None,
    ) -> None:
        details: dict[str, Any] = {
            "dek_version": row.version,
            "kek_provider": row.kek_provider,
            "kek_version": row.kek_version,
        }
        if event == "keys.dek.rotated":
            details["retired_versions"] = retired
        self._record(
            session,
            event,
            tenant=row.tenant_id,
            resource=f"dek/{row.tenant_id}/{row.version}",
            details=details,
            signer=signer,
        )

    def _new_dek_row(self, session: Session, tenant: str, version: int) -> tuple[TenantDek, bytes]:
        dek = secrets.token_bytes(DEK_BYTES)
        kek_version, blob = self._provider.wrap(dek, context=dek_context(tenant=tenant, version=version))
        row = TenantDek(
            tenant_id=tenant,
            version=version,
            kek_provider=self._provider.name,
            kek_version=kek_version,
            wrapped_dek=blob,
            created_at=utcnow(),
            destroyed_at=None,
            state="active",
        )
        session.add(row)
        session.flush()
        return row, dek

    # -- DekResolver --------------------------------------------------------------------

    def encryption_key(self, tenant: str) -> tuple[int, bytes]:
        """Return ``(version, dek)`` of the tenant's active DEK, creating version 1 if needed.

        Raises:
            KeyNotFoundError: Unknown tenant.
            TenantShreddedError: The tenant was deleted.
            UnboundKeyError: The DEK row is in the legacy format (run ``tensafe keys rebind``).
            ProviderError: The wrapped DEK does not unwrap in this row (moved from another
                tenant's or version's row, or modified).
        """
        with self._read_session() as session:  # the common case: the DEK exists, nothing to write
            self._check_tenant(session, tenant)
            found = self._active_dek(session, tenant)
        for attempt in range(2):
            if found is not None:
                break
            signer = self._checkpoint_signer()
            try:
                with self._session() as session:
                    self._check_tenant(session, tenant)
                    found = self._active_dek(session, tenant)
                    if found is None:
                        if self._has_destroyed(session, tenant):
                            raise _shredded(tenant)
                        row, dek = self._new_dek_row(session, tenant, self._max_version(session, tenant) + 1)
                        self._audit_dek(session, "keys.dek.created", row, retired=[], signer=signer)
                        _log.info("created DEK version %d for tenant %s", row.version, tenant)
                        return row.version, dek
            except IntegrityError:
                if attempt:
                    raise
                # another process created the DEK first: the next attempt reads it
        assert found is not None
        version, kek_version, blob, provider = found
        self._check_provider(provider)
        return version, self._unwrap(tenant, version, kek_version, blob)

    @staticmethod
    def _active_dek(session: Session, tenant: str) -> tuple[int, int, bytes, str] | None:
        """``(version, kek_version, wrapped_dek, kek_provider)`` of the tenant's newest active DEK."""
        row = session.execute(
            select(TenantDek)
            .where(TenantDek.tenant_id == tenant, TenantDek.state == "active")
            .order_by(TenantDek.version.desc())
            .limit(1)
        ).scalar_one_or_none()
        if row is None:
            return None
        assert row.wrapped_dek is not None  # only destroyed DEKs lose their wrapped key
        return row.version, row.kek_version, row.wrapped_dek, row.kek_provider

    def decryption_key(self, tenant: str, dek_version: int) -> bytes:
        """Return the tenant's DEK of ``dek_version``.

        Raises:
            KeyNotFoundError: Unknown tenant or DEK version.
            TenantShreddedError: The tenant was deleted or this DEK destroyed.
            UnboundKeyError: The DEK row is in the legacy format (run ``tensafe keys rebind``).
            ProviderError: The wrapped DEK does not unwrap in this row (moved from another
                tenant's or version's row, or modified).
        """
        with self._read_session() as session:
            row = session.get(TenantDek, (tenant, dek_version))
            if row is None or row.state == "destroyed" or row.wrapped_dek is None:
                tenant_row = session.get(Tenant, tenant)
                if row is not None or (tenant_row is not None and tenant_row.deleted_at is not None):
                    raise _shredded(tenant)
                raise KeyNotFoundError(f"tenant {tenant!r} has no DEK version {dek_version}")
            version, kek_version, blob, provider = (
                row.version,
                row.kek_version,
                row.wrapped_dek,
                row.kek_provider,
            )
        self._check_provider(provider)
        return self._unwrap(tenant, version, kek_version, blob)

    @staticmethod
    def _max_version(session: Session, tenant: str) -> int:
        value = session.execute(
            select(func.max(TenantDek.version)).where(TenantDek.tenant_id == tenant)
        ).scalar_one()
        return int(value or 0)

    @staticmethod
    def _has_destroyed(session: Session, tenant: str) -> bool:
        return (
            session.execute(
                select(TenantDek.version)
                .where(TenantDek.tenant_id == tenant, TenantDek.state == "destroyed")
                .limit(1)
            ).first()
            is not None
        )

    # -- DEK lifecycle ------------------------------------------------------------------

    def create_dek(self, tenant: str) -> int:
        """Ensure the tenant has an active DEK; returns its version."""
        return self.encryption_key(tenant)[0]

    def rotate_dek(self, tenant: str) -> int:
        """Create a new DEK version for new data; older versions stay for decryption.

        Returns:
            The new version.
        """
        signer = self._checkpoint_signer()
        with self._session() as session:
            self._check_tenant(session, tenant)
            if self._has_destroyed(session, tenant):
                raise _shredded(tenant)
            retired: list[int] = []
            for row in session.execute(
                select(TenantDek).where(TenantDek.tenant_id == tenant, TenantDek.state == "active")
            ).scalars():
                row.state = "retired"
                retired.append(row.version)
            row, _dek = self._new_dek_row(session, tenant, self._max_version(session, tenant) + 1)
            version = row.version
            self._audit_dek(session, "keys.dek.rotated", row, retired=sorted(retired), signer=signer)
        _log.info("rotated tenant %s to DEK version %d", tenant, version)
        return version

    def dek_versions(self, tenant: str) -> list[DekInfo]:
        """All DEK versions of a tenant, oldest first (no key material)."""
        with self._session() as session:
            rows = session.execute(
                select(TenantDek).where(TenantDek.tenant_id == tenant).order_by(TenantDek.version)
            ).scalars()
            return [
                DekInfo(
                    tenant_id=r.tenant_id,
                    version=r.version,
                    state=r.state,
                    kek_provider=r.kek_provider,
                    kek_version=r.kek_version,
                    created_at=r.created_at.isoformat(),
                    destroyed_at=r.destroyed_at.isoformat() if r.destroyed_at else None,
                )
                for r in rows
            ]

    def shred_tenant(
        self,
        tenant: str,
        *,
        store: EncryptedArtifactStore | None = None,
        purge_timeout_s: float | None = None,
    ) -> int:
        """Crypto-shred a tenant: erase every wrapped DEK, mark the tenant deleted, purge the bytes.

        In one transaction every DEK row's ``wrapped_dek`` is set to NULL, its state to
        ``destroyed`` and ``destroyed_at`` to now, and the tenant's ``deleted_at`` is set
        (on SQLite with ``secure_delete``, so the erased bytes are zeroed in the new page
        images). From then on the tenant's artifacts cannot be decrypted by anyone
        holding only the database and the storage, and every read is refused. Then the
        erased bytes are purged from the database files (SQLite: WAL checkpoint with
        truncation; PostgreSQL: ``VACUUM`` then ``VACUUM FULL tenant_deks``), retrying
        while readers block it; see ``docs/security/keys.md`` ("Crypto-shredding") for what each database
        guarantees and what remains (backups, PostgreSQL's WAL).

        Args:
            tenant: The tenant to shred.
            store: If given, the tenant's artifact blobs are deleted afterwards too
                (before the purge, so they are gone even if the purge must be finished later).
            purge_timeout_s: How long to retry the purge (default: the manager's
                ``purge_timeout_s``).

        Returns:
            The number of DEK versions destroyed.

        Raises:
            KeyNotFoundError: Unknown tenant.
            ShredIncompleteError: The keys are destroyed logically, but the database
                could not drop their bytes from its files before the timeout; run
                :meth:`finish_shred` (``tensafe keys shred --finish``) once readers close.
        """
        timeout_s = self._purge_timeout_s if purge_timeout_s is None else check_timeout(purge_timeout_s)
        signer = self._checkpoint_signer()
        now = utcnow()
        with self._session() as session:
            if self._engine.dialect.name == "sqlite":
                session.execute(text("PRAGMA secure_delete = ON"))
            tenant_row = session.get(Tenant, tenant)
            if tenant_row is None:
                raise KeyNotFoundError(f"unknown tenant {tenant!r}")
            rows = list(session.execute(select(TenantDek).where(TenantDek.tenant_id == tenant)).scalars())
            count = 0
            destroyed: list[int] = []
            for row in rows:
                if row.state != "destroyed":
                    count += 1
                    destroyed.append(row.version)
                    row.destroyed_at = now
                row.wrapped_dek = None
                row.state = "destroyed"
            if tenant_row.deleted_at is None:
                tenant_row.deleted_at = now
            self._record(
                session,
                "keys.tenant.shredded",
                tenant=tenant,
                resource=f"tenant/{tenant}",
                details={
                    "destroyed_versions": sorted(destroyed),
                    "destroyed_count": count,
                    "artifacts_deleted": store is not None,
                },
                signer=signer,
            )
        self._forget(tenant)
        _log.warning("crypto-shredded tenant %s: %d DEK version(s) destroyed", tenant, count)
        if store is not None:
            for artifact_id in store.list(tenant):
                store.delete(tenant, artifact_id)
        purge_erased(self._engine, timeout_s=timeout_s, tenant=tenant, destroyed=count)
        return count

    def finish_shred(self, *, purge_timeout_s: float | None = None) -> None:
        """Purge erased wrapped keys from the database files (after a :class:`ShredIncompleteError`).

        Covers every earlier shred at once; safe to run at any time.

        Raises:
            ShredIncompleteError: Readers still keep the database from dropping the bytes.
        """
        timeout_s = self._purge_timeout_s if purge_timeout_s is None else check_timeout(purge_timeout_s)
        purge_erased(self._engine, timeout_s=timeout_s)
        _log.info("erased wrapped keys are purged from the database files")

    # -- KEK lifecycle ------------------------------------------------------------------

    def rotate_kek(self) -> KekRotation:
        """Create a new KEK version and re-wrap every stored key under it.

        Data is not touched: only wrapped DEKs (and deployment keys) change. If the
        re-wrap is interrupted, run :meth:`rewrap_all` again; keys not yet re-wrapped stay
        readable under their old KEK version meanwhile.
        """
        signer = self._checkpoint_signer()
        previous = self._provider.current_version
        new = self._provider.rotate()
        with self._session() as session:
            self._record(
                session,
                "keys.kek.rotated",
                tenant=DEPLOYMENT_TENANT,
                resource=f"kek/{self._provider.name}",
                details={
                    "kek_provider": self._provider.name,
                    "previous_version": previous,
                    "new_version": new,
                },
                signer=signer,
            )
        count = self.rewrap_all()
        _log.warning("rotated the KEK from version %d to %d; re-wrapped %d key(s)", previous, new, count)
        return KekRotation(previous_version=previous, new_version=new, rewrapped=count)

    def _rewrap_dek_row(self, row: TenantDek) -> bool:
        """Re-wrap one DEK row under the current KEK version, bound; True if it was legacy.

        A failure names the row (a blob moved from another row fails here too).
        """
        self._check_provider(row.kek_provider)
        assert row.wrapped_dek is not None
        context = dek_context(tenant=row.tenant_id, version=row.version)
        legacy = self._provider.is_legacy(row.wrapped_dek)
        try:
            if legacy:
                row.kek_version, row.wrapped_dek = self._provider.rebind(
                    row.kek_version, row.wrapped_dek, context=context
                )
            else:
                row.kek_version, row.wrapped_dek = self._provider.rewrap(
                    row.kek_version, row.wrapped_dek, context=context
                )
        except (ProviderError, KeyNotFoundError) as exc:
            raise type(exc)(f"tenant {row.tenant_id!r} DEK version {row.version}: {exc}") from None
        return legacy

    def rewrap_all(self, *, batch_size: int = 100) -> int:
        """Re-wrap every live key still under an older KEK version; returns how many.

        The results are bound to their rows; a legacy (unbound) key met on the way is
        rebound as :meth:`rebind_all` would (counted in ``rebound``). When any key was
        re-wrapped, a ``keys.kek.rewrapped`` audit record with the totals commits
        together with the last batch.
        """
        signer = self._checkpoint_signer()
        target = self._provider.current_version
        total = 0
        rebound = 0
        while True:
            with self._session() as session:
                rows = list(
                    session.execute(
                        select(TenantDek)
                        .where(TenantDek.kek_version < target, TenantDek.wrapped_dek.is_not(None))
                        .order_by(TenantDek.tenant_id, TenantDek.version)
                        .limit(batch_size)
                    ).scalars()
                )
                for row in rows:
                    rebound += self._rewrap_dek_row(row)
            total += len(rows)
            if len(rows) < batch_size:
                break
        with self._session() as session:
            for key in session.execute(
                select(DeploymentKey).where(DeploymentKey.kek_version < target)
            ).scalars():
                self._check_provider(key.kek_provider)
                stored = _StoredKey.from_row(key)
                if self._provider.is_legacy(stored.wrapped_key):
                    key.kek_version, key.wrapped_key, _ = self._rebind_stored_key(stored)
                    rebound += 1
                else:
                    key.kek_version, key.wrapped_key = self._provider.rewrap(
                        stored.kek_version, stored.wrapped_key, context=stored.context
                    )
                total += 1
            if total:
                self._record(
                    session,
                    "keys.kek.rewrapped",
                    tenant=DEPLOYMENT_TENANT,
                    resource=f"kek/{self._provider.name}",
                    details={
                        "kek_provider": self._provider.name,
                        "kek_version": target,
                        "rewrapped": total,
                        "rebound": rebound,
                    },
                    signer=signer,
                )
        return total

    # -- legacy (unbound) keys -----------------------------------------------------------

    def _rebind_stored_key(self, stored: _StoredKey) -> tuple[int, bytes, HybridSigningKey]:
        """Rebind a legacy deployment key row; the result is checked to open the row first."""
        kek_version, blob = self._provider.rebind(
            stored.kek_version, stored.wrapped_key, context=stored.context
        )
        sealing_key = self._provider.unwrap(kek_version, blob, context=stored.context)
        return kek_version, blob, self._open_stored_key(stored, sealing_key)

    def rebind_all(self, *, batch_size: int = 100) -> int:
        """Re-wrap every stored key still in a legacy, unbound format, bound to its row.

        Keys written before wrapped keys were bound to their tenant and version are
        refused on every read (:class:`~tensafe.keys.errors.UnboundKeyError`) until this
        runs (``tensafe keys rebind``). It first rebinds the deployment signing key
        (checking that it opens and matches its stored public key), then tenant DEKs in
        batches of ``batch_size``, one transaction each; every transaction that rebinds
        something appends a ``keys.kek.rebound`` record to the deployment chain. It is
        idempotent: an interrupted run is resumed by running it again.

        A legacy blob carries nothing that says which row it belongs to, so this trusts
        the rows as they are: run it once, right after upgrading (see
        ``docs/security/keys.md``, "Binding").

        Returns:
            How many keys were rebound (0 when everything is already bound).
        """
        if batch_size < 1:
            raise KeyConfigurationError("batch_size must be a positive integer")
        total = 0
        signer: HybridSigningKey | None
        stored = self._read_stored_key(SIGNING_KEY_NAME)
        if stored is not None and self._provider.is_legacy(stored.wrapped_key):
            self._check_provider(stored.kek_provider)
            kek_version, blob, signer = self._rebind_stored_key(stored)
            with self._session() as session:
                row = session.get(DeploymentKey, SIGNING_KEY_NAME)
                if row is None or _StoredKey.from_row(row).fingerprint() != stored.fingerprint():
                    raise KeyManagementError(
                        "the deployment signing key changed while it was being rebound; "
                        "run 'tensafe keys rebind' again"
                    )
                row.kek_version, row.wrapped_key = kek_version, blob
                self._record(
                    session,
                    "keys.kek.rebound",
                    tenant=DEPLOYMENT_TENANT,
                    resource=f"deployment-key/{SIGNING_KEY_NAME}",
                    details={
                        "kek_provider": self._provider.name,
                        "kek_version": kek_version,
                        "scope": "deployment-keys",
                        "rebound": 1,
                    },
                    signer=signer if self._checkpoint_every is not None else None,
                )
            total += 1
            _log.warning("rebound the deployment signing key %s to its name and key id", stored.key_id)
        signer = self._checkpoint_signer()
        after: tuple[str, int] = ("", 0)
        while True:
            with self._session() as session:
                rows = list(
                    session.execute(
                        select(TenantDek)
                        .where(
                            TenantDek.wrapped_dek.is_not(None),
                            or_(
                                TenantDek.tenant_id > after[0],
                                and_(TenantDek.tenant_id == after[0], TenantDek.version > after[1]),
                            ),
                        )
                        .order_by(TenantDek.tenant_id, TenantDek.version)
                        .limit(batch_size)
                    ).scalars()
                )
                rebound = 0
                for dek_row in rows:
                    assert dek_row.wrapped_dek is not None
                    if self._provider.is_legacy(dek_row.wrapped_dek):
                        rebound += self._rewrap_dek_row(dek_row)
                if rebound:
                    self._record(
                        session,
                        "keys.kek.rebound",
                        tenant=DEPLOYMENT_TENANT,
                        resource=f"kek/{self._provider.name}",
                        details={
                            "kek_provider": self._provider.name,
                            "kek_version": self._provider.current_version,
                            "scope": "tenant-deks",
                            "rebound": rebound,
                        },
                        signer=signer,
                    )
                if rows:
                    after = (rows[-1].tenant_id, rows[-1].version)
            total += rebound
            if len(rows) < batch_size:
                break
        if total:
            _log.warning("rebound %d legacy wrapped key(s) to their tenant and version", total)
        return total

    def legacy_key_count(self) -> int:
        """How many stored wrapped keys are still in a legacy, unbound format."""
        count = 0
        with self._read_session() as session:
            for blob in session.execute(
                select(TenantDek.wrapped_dek).where(TenantDek.wrapped_dek.is_not(None))
            ).scalars():
                count += blob is not None and self._provider.is_legacy(blob)
            for blob in session.execute(select(DeploymentKey.wrapped_key)).scalars():
                count += self._provider.is_legacy(blob)
        return count

    # -- deployment signing key ---------------------------------------------------------

    def _read_stored_key(self, name: str) -> _StoredKey | None:
        with self._read_session() as session:
            row = session.get(DeploymentKey, name)
            return None if row is None else _StoredKey.from_row(row)

    def deployment_signing_key(self) -> HybridSigningKey:
        """The deployment's hybrid signing key (audit checkpoints, packages).

        Created on first use: its private bytes are sealed (AES-256-GCM) under a random
        key that the KEK wraps bound to the key's name and id, and stored in
        ``deployment_keys``. Later calls, in any process, load the same key. The row is
        read on every call and the opened key is cached while the row is unchanged;
        opening checks the key id and that the stored public key is the private key's.

        Raises:
            KeyManagementError: The row does not open, or its stored public key or key id
                does not match the sealed private key (the row was modified).
            UnboundKeyError: The row is in the legacy format (run ``tensafe keys rebind``).
        """
        for attempt in range(2):
            stored = self._read_stored_key(SIGNING_KEY_NAME)
            if stored is not None:
                return self._load_signing_key(stored)
            try:
                return self._create_signing_key()
            except IntegrityError:
                if attempt:
                    raise
        raise AssertionError("unreachable")  # pragma: no cover

    def _load_signing_key(self, stored: _StoredKey) -> HybridSigningKey:
        fingerprint = stored.fingerprint()
        with self._lock:
            if self._signing is not None and hmac.compare_digest(self._signing[0], fingerprint):
                return self._signing[1]
        self._check_provider(stored.kek_provider)
        sealing_key = self._provider.unwrap(stored.kek_version, stored.wrapped_key, context=stored.context)
        key = self._open_stored_key(stored, sealing_key)
        with self._lock:
            self._signing = (fingerprint, key)
        return key

    @staticmethod
    def _open_stored_key(stored: _StoredKey, sealing_key: bytes) -> HybridSigningKey:
        """Open the sealed private key and check every public column against it."""
        try:
            private = open_sealed(
                sealing_key,
                stored.sealed_private,
                label=_LABEL_DEPLOYMENT_KEY,
                associated_data=_signing_ad(stored.key_id),
            )
            key = HybridSigningKey.from_private_bytes(private, passphrase=None)
        except CryptoError:
            raise KeyManagementError("the stored deployment signing key does not open (modified?)") from None
        if key.key_id != stored.key_id or stored.kind != _SIGNING_KIND:
            raise KeyManagementError("the stored deployment signing key does not match its key id or kind")
        if not hmac.compare_digest(key.verifying_key().public_bytes(), stored.public_key):
            raise KeyManagementError(
                "the stored public key of the deployment signing key does not match the sealed private key: "
                "the deployment_keys row was modified; do not distribute or trust a public key read from "
                "this database, and restore the row from a trusted backup"
            )
        return key

    def deployment_verifying_key(self) -> HybridVerifyingKey:
        """The public half of :meth:`deployment_signing_key`, derived from the unwrapped private key.

        The stored ``public_key`` column is never returned as such: it is only compared
        with the derived key, and a mismatch raises.

        Raises:
            KeyManagementError: As :meth:`deployment_signing_key`.
        """
        return self.deployment_signing_key().verifying_key()

    def _create_signing_key(self) -> HybridSigningKey:
        key = HybridSigningKey.generate()
        sealing_key = secrets.token_bytes(32)
        context = deployment_key_context(name=SIGNING_KEY_NAME, key_id=key.key_id)
        kek_version, wrapped = self._provider.wrap(sealing_key, context=context)
        sealed = seal(
            sealing_key,
            key.private_bytes(passphrase=None),
            label=_LABEL_DEPLOYMENT_KEY,
            associated_data=_signing_ad(key.key_id),
        )
        stored = _StoredKey(
            name=SIGNING_KEY_NAME,
            kind=_SIGNING_KIND,
            key_id=key.key_id,
            public_key=key.verifying_key().public_bytes(),
            kek_provider=self._provider.name,
            kek_version=kek_version,
            wrapped_key=wrapped,
            sealed_private=sealed,
        )
        with self._session() as session:
            session.add(
                DeploymentKey(
                    name=stored.name,
                    kind=stored.kind,
                    key_id=stored.key_id,
                    public_key=stored.public_key,
                    kek_provider=stored.kek_provider,
                    kek_version=stored.kek_version,
                    wrapped_key=stored.wrapped_key,
                    sealed_private=stored.sealed_private,
                    created_at=utcnow(),
                )
            )
            session.flush()  # a concurrent creator fails here, before the audit record
            # The new key signs the checkpoint of its own creation record when one is due.
            self._record(
                session,
                "keys.deployment_key.created",
                tenant=DEPLOYMENT_TENANT,
                resource=f"deployment-key/{SIGNING_KEY_NAME}",
                details={
                    "name": SIGNING_KEY_NAME,
                    "kind": _SIGNING_KIND,
                    "key_id": key.key_id,
                    "kek_provider": self._provider.name,
                    "kek_version": kek_version,
                },
                signer=key if self._checkpoint_every is not None else None,
            )
        with self._lock:
            self._signing = (stored.fingerprint(), key)
        _log.info("created the deployment signing key %s", key.key_id)
        return key

    # -- status -------------------------------------------------------------------------

    def status(self) -> dict[str, Any]:
        """Non-secret summary: provider, KEK versions in use, DEK counts, signing key id.

        ``signing_key_id`` is the id of the key as opened and checked (not the stored
        column); when the stored key does not open or does not match,
        ``signing_key_error`` says why. ``legacy_wrapped_keys`` counts keys that still
        need ``tensafe keys rebind``.
        """
        with self._read_session() as session:
            by_state = {
                str(state): int(n)
                for state, n in session.execute(
                    select(TenantDek.state, func.count()).group_by(TenantDek.state)
                )
            }
            by_kek = {
                str(version): int(n)
                for version, n in session.execute(
                    select(TenantDek.kek_version, func.count())
                    .where(TenantDek.wrapped_dek.is_not(None))
                    .group_by(TenantDek.kek_version)
                )
            }
            tenants = session.execute(select(func.count(func.distinct(TenantDek.tenant_id)))).scalar_one()
        stored = self._read_stored_key(SIGNING_KEY_NAME)
        signing_id: str | None = None
        signing_error: str | None = None
        if stored is not None:
            try:
                signing_id = self._load_signing_key(stored).key_id
            except KeyManagementError as exc:
                signing_error = str(exc)
        return {
            "environment": "production" if self._production else "development",
            "kek": self._provider.describe(),
            "tenants_with_deks": int(tenants),
            "deks_by_state": dict(sorted(by_state.items())),
            "live_deks_by_kek_version": dict(sorted(by_kek.items())),
            "legacy_wrapped_keys": self.legacy_key_count(),
            "signing_key_id": signing_id,
            "signing_key_error": signing_error,
            "audit_checkpoint_every": self._checkpoint_every,
        }


def _signing_ad(key_id: str) -> bytes:
    return f"{SIGNING_KEY_NAME}:{key_id}".encode()
