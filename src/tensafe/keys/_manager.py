"""The key manager: tenant DEKs wrapped under the deployment KEK, rotation and shredding."""

from __future__ import annotations

import contextlib
import hashlib
import logging
import secrets
import threading
from collections import OrderedDict
from collections.abc import Iterator, Mapping
from dataclasses import dataclass
from typing import Any

from sqlalchemy import Engine, func, inspect, select, text
from sqlalchemy.exc import IntegrityError, OperationalError, ProgrammingError
from sqlalchemy.orm import Session

from tensafe.crypto.aead import open_sealed, seal
from tensafe.crypto.errors import CryptoError
from tensafe.crypto.signing import HybridSigningKey, HybridVerifyingKey
from tensafe.db import Tenant, utcnow
from tensafe.keys._audit import DEFAULT_ACTOR, DEPLOYMENT_TENANT, record_key_event
from tensafe.keys._config import KeySettings, open_provider
from tensafe.keys._provider import KekProvider
from tensafe.keys.errors import (
    KeyConfigurationError,
    KeyManagementError,
    KeyNotFoundError,
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
    re-wrapped, deployment signing key created) appends an audit record in the same
    database transaction as the change; there is no way to turn this off. See
    ``docs/audit.md`` ("Event ids") for the events and their details.
    """

    def __init__(
        self,
        engine: Engine,
        provider: KekProvider,
        *,
        production: bool = False,
        actor: str = DEFAULT_ACTOR,
    ) -> None:
        """Create a manager.

        Args:
            engine: Database engine; the schema must be migrated (``tensafe db upgrade``).
            provider: The deployment's KEK provider.
            production: Whether production rules apply (used by :meth:`from_environment`).
            actor: Who the audit records name as acting (an identifier such as
                ``user:alice`` or ``service:api``, never a credential).
        """
        self._engine = engine
        self._provider = provider
        self._production = production
        self._actor = actor
        self._cache: OrderedDict[tuple[str, int, int, bytes], bytes] = OrderedDict()
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
        loud warning is logged; later starts load the same keys.

        Args:
            env: Environment to read (default :data:`os.environ`).
            engine: Database engine (default: from ``DATABASE_URL``).
            create: Create a missing KEK (default: in development only).
            actor: Who the audit records name as acting.

        Raises:
            KeyConfigurationError: Missing or weak configuration, or an unmigrated database.
            ProviderError: The KEK provider could not be reached.
        """
        settings = KeySettings.from_environment(env)
        if engine is None:
            from tensafe.db import create_engine_from_url, get_database_url

            url = settings.get("DATABASE_URL") or get_database_url()
            engine = create_engine_from_url(url)
        if not inspect(engine).has_table("tenant_deks"):
            raise KeyConfigurationError("the database has no key tables; run 'tensafe db upgrade' first")
        provider = open_provider(settings, create=(not settings.production) if create is None else create)
        return cls(engine, provider, production=settings.production, actor=actor)

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

    def close(self) -> None:
        """Forget cached DEKs and close the provider."""
        with self._lock:
            self._cache.clear()
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
        dek = self._provider.unwrap(kek_version, blob)
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

    def _audit_dek(self, session: Session, event: str, row: TenantDek, *, retired: list[int]) -> None:
        details: dict[str, Any] = {
            "dek_version": row.version,
            "kek_provider": row.kek_provider,
            "kek_version": row.kek_version,
        }
        if event == "keys.dek.rotated":
            details["retired_versions"] = retired
        record_key_event(
            session,
            event,
            tenant=row.tenant_id,
            actor=self._actor,
            resource=f"dek/{row.tenant_id}/{row.version}",
            details=details,
        )

    def _new_dek_row(self, session: Session, tenant: str, version: int) -> tuple[TenantDek, bytes]:
        dek = secrets.token_bytes(DEK_BYTES)
        kek_version, blob = self._provider.wrap(dek)
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
        """
        with self._read_session() as session:  # the common case: the DEK exists, nothing to write
            self._check_tenant(session, tenant)
            found = self._active_dek(session, tenant)
        for attempt in range(2):
            if found is not None:
                break
            try:
                with self._session() as session:
                    self._check_tenant(session, tenant)
                    found = self._active_dek(session, tenant)
                    if found is None:
                        if self._has_destroyed(session, tenant):
                            raise _shredded(tenant)
                        row, dek = self._new_dek_row(session, tenant, self._max_version(session, tenant) + 1)
                        self._audit_dek(session, "keys.dek.created", row, retired=[])
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
            self._audit_dek(session, "keys.dek.rotated", row, retired=sorted(retired))
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

    def shred_tenant(self, tenant: str, *, store: EncryptedArtifactStore | None = None) -> int:
        """Crypto-shred a tenant: erase every wrapped DEK and mark the tenant deleted.

        In one transaction every DEK row's ``wrapped_dek`` is set to NULL, its state to
        ``destroyed`` and ``destroyed_at`` to now, and the tenant's ``deleted_at`` is set.
        From then on the tenant's artifacts cannot be decrypted by anyone holding only the
        database and the storage. On SQLite the transaction runs with
        ``secure_delete`` so the erased bytes are overwritten in the file; see
        ``docs/security/keys.md`` for backups and PostgreSQL.

        Args:
            tenant: The tenant to shred.
            store: If given, the tenant's artifact blobs are deleted afterwards too.

        Returns:
            The number of DEK versions destroyed.
        """
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
            record_key_event(
                session,
                "keys.tenant.shredded",
                tenant=tenant,
                actor=self._actor,
                resource=f"tenant/{tenant}",
                details={
                    "destroyed_versions": sorted(destroyed),
                    "destroyed_count": count,
                    "artifacts_deleted": store is not None,
                },
            )
        if self._engine.dialect.name == "sqlite":
            # Move the overwritten pages out of the WAL into the main file and truncate the
            # WAL, so the erased wrapped keys do not linger in the -wal file.
            # It must run outside a transaction, so use the DBAPI connection directly.
            raw = self._engine.raw_connection()
            try:
                raw.cursor().execute("PRAGMA wal_checkpoint(TRUNCATE)")
            finally:
                raw.close()
        self._forget(tenant)
        _log.warning("crypto-shredded tenant %s: %d DEK version(s) destroyed", tenant, count)
        if store is not None:
            for artifact_id in store.list(tenant):
                store.delete(tenant, artifact_id)
        return count

    # -- KEK lifecycle ------------------------------------------------------------------

    def rotate_kek(self) -> KekRotation:
        """Create a new KEK version and re-wrap every stored key under it.

        Data is not touched: only wrapped DEKs (and deployment keys) change. If the
        re-wrap is interrupted, run :meth:`rewrap_all` again; keys not yet re-wrapped stay
        readable under their old KEK version meanwhile.
        """
        previous = self._provider.current_version
        new = self._provider.rotate()
        with self._session() as session:
            record_key_event(
                session,
                "keys.kek.rotated",
                tenant=DEPLOYMENT_TENANT,
                actor=self._actor,
                resource=f"kek/{self._provider.name}",
                details={
                    "kek_provider": self._provider.name,
                    "previous_version": previous,
                    "new_version": new,
                },
            )
        count = self.rewrap_all()
        _log.warning("rotated the KEK from version %d to %d; re-wrapped %d key(s)", previous, new, count)
        return KekRotation(previous_version=previous, new_version=new, rewrapped=count)

    def rewrap_all(self, *, batch_size: int = 100) -> int:
        """Re-wrap every live key still under an older KEK version; returns how many.

        When any key was re-wrapped, a ``keys.kek.rewrapped`` audit record with the total
        commits together with the last batch.
        """
        target = self._provider.current_version
        total = 0
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
                    self._check_provider(row.kek_provider)
                    assert row.wrapped_dek is not None
                    row.kek_version, row.wrapped_dek = self._provider.rewrap(row.kek_version, row.wrapped_dek)
            total += len(rows)
            if len(rows) < batch_size:
                break
        with self._session() as session:
            for key in session.execute(
                select(DeploymentKey).where(DeploymentKey.kek_version < target)
            ).scalars():
                self._check_provider(key.kek_provider)
                key.kek_version, key.wrapped_key = self._provider.rewrap(key.kek_version, key.wrapped_key)
                total += 1
            if total:
                record_key_event(
                    session,
                    "keys.kek.rewrapped",
                    tenant=DEPLOYMENT_TENANT,
                    actor=self._actor,
                    resource=f"kek/{self._provider.name}",
                    details={"kek_provider": self._provider.name, "kek_version": target, "rewrapped": total},
                )
        return total

    # -- deployment signing key ---------------------------------------------------------

    def deployment_signing_key(self) -> HybridSigningKey:
        """The deployment's hybrid signing key (audit checkpoints, packages).

        Created on first use: its private bytes are sealed (AES-256-GCM) under a random
        key that the KEK wraps, and stored in ``deployment_keys``. Later calls, in any
        process, load the same key.
        """
        for attempt in range(2):
            with self._session() as session:
                row = session.get(DeploymentKey, SIGNING_KEY_NAME)
                if row is not None:
                    data = (
                        row.kek_provider,
                        row.kek_version,
                        row.wrapped_key,
                        row.sealed_private,
                        row.key_id,
                    )
                    break
            try:
                return self._create_signing_key()
            except IntegrityError:
                if attempt:
                    raise
        provider, kek_version, wrapped, sealed, key_id = data
        self._check_provider(provider)
        sealing_key = self._provider.unwrap(kek_version, wrapped)
        try:
            private = open_sealed(
                sealing_key, sealed, label=_LABEL_DEPLOYMENT_KEY, associated_data=_signing_ad(key_id)
            )
            key = HybridSigningKey.from_private_bytes(private, passphrase=None)
        except CryptoError:
            raise KeyManagementError("the stored deployment signing key does not open (modified?)") from None
        if key.key_id != key_id:
            raise KeyManagementError("the stored deployment signing key does not match its key id")
        return key

    def deployment_verifying_key(self) -> HybridVerifyingKey:
        """The public half of :meth:`deployment_signing_key` (read without unwrapping)."""
        with self._session() as session:
            row = session.get(DeploymentKey, SIGNING_KEY_NAME)
            public = row.public_key if row is not None else None
        if public is None:
            return self.deployment_signing_key().verifying_key()
        return HybridVerifyingKey.from_public_bytes(public)

    def _create_signing_key(self) -> HybridSigningKey:
        key = HybridSigningKey.generate()
        sealing_key = secrets.token_bytes(32)
        kek_version, wrapped = self._provider.wrap(sealing_key)
        sealed = seal(
            sealing_key,
            key.private_bytes(passphrase=None),
            label=_LABEL_DEPLOYMENT_KEY,
            associated_data=_signing_ad(key.key_id),
        )
        with self._session() as session:
            session.add(
                DeploymentKey(
                    name=SIGNING_KEY_NAME,
                    kind=_SIGNING_KIND,
                    key_id=key.key_id,
                    public_key=key.verifying_key().public_bytes(),
                    kek_provider=self._provider.name,
                    kek_version=kek_version,
                    wrapped_key=wrapped,
                    sealed_private=sealed,
                    created_at=utcnow(),
                )
            )
            session.flush()  # a concurrent creator fails here, before the audit record
            record_key_event(
                session,
                "keys.deployment_key.created",
                tenant=DEPLOYMENT_TENANT,
                actor=self._actor,
                resource=f"deployment-key/{SIGNING_KEY_NAME}",
                details={
                    "name": SIGNING_KEY_NAME,
                    "kind": _SIGNING_KIND,
                    "key_id": key.key_id,
                    "kek_provider": self._provider.name,
                    "kek_version": kek_version,
                },
            )
        _log.info("created the deployment signing key %s", key.key_id)
        return key

    # -- status -------------------------------------------------------------------------

    def status(self) -> dict[str, Any]:
        """Non-secret summary: provider, KEK versions in use, DEK counts, signing key id."""
        with self._session() as session:
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
            signing = session.get(DeploymentKey, SIGNING_KEY_NAME)
            signing_id = signing.key_id if signing is not None else None
        return {
            "environment": "production" if self._production else "development",
            "kek": self._provider.describe(),
            "tenants_with_deks": int(tenants),
            "deks_by_state": dict(sorted(by_state.items())),
            "live_deks_by_kek_version": dict(sorted(by_kek.items())),
            "signing_key_id": signing_id,
        }


def _signing_ad(key_id: str) -> bytes:
    return f"{SIGNING_KEY_NAME}:{key_id}".encode()
