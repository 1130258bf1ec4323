"""Tenants and API keys: creation, hashing, verification, revocation.

API keys look like Tinker's: ``tml-`` followed by ``secrets.token_urlsafe(32)`` (256
random bits). Only ``SHA-256("tensafe-api-key-v1" || 0x00 || key)`` is stored. Because
every key carries 256 bits of entropy, a leaked hash cannot be inverted by guessing, so
no pepper or slow hash is needed (a slow password hash would cost ~0.5 s per request).
The plaintext key is shown once, at creation, and never logged. The table, the hash and
the lookup live in :mod:`tensafe.db.api_keys` (``tensafe serve`` uses the same lookup).
"""

from __future__ import annotations

import datetime as _dt
import re
import secrets
from dataclasses import dataclass

from sqlalchemy import func, select
from sqlalchemy.orm import Session

from tensafe.db import Tenant, ensure_tenant, utcnow
from tensafe.db.api_keys import ApiKey, ApiKeyRejectedError, hash_api_key, lookup_api_key
from tensafe.protocol import API_KEY_PREFIX
from tensafe.server.errors import AuthenticationError, TenantAdminError

__all__ = [
    "ApiKeyInfo",
    "Principal",
    "authenticate",
    "create_api_key",
    "create_tenant",
    "hash_api_key",
    "list_api_keys",
    "list_tenants",
    "revoke_api_key",
]

_NAME_RE = re.compile(r"[a-z0-9][a-z0-9_.-]{0,63}")
MAX_EXPIRY_DAYS = 3650


@dataclass(frozen=True)
class Principal:
    """Who is calling: the tenant and the id (not the secret) of the API key used."""

    tenant: str
    key_id: str

    @property
    def actor(self) -> str:
        """The audit ``actor`` string for this caller."""
        return f"apikey:{self.key_id}"


@dataclass(frozen=True)
class ApiKeyInfo:
    """Public facts about an API key (never the key itself)."""

    key_id: str
    tenant: str
    name: str
    created_at: _dt.datetime
    expires_at: _dt.datetime | None
    revoked_at: _dt.datetime | None


def create_tenant(session: Session, name: str) -> Tenant:
    """Create a tenant whose id and name are ``name``.

    Raises:
        TenantAdminError: The name is malformed or already taken.
    """
    if not _NAME_RE.fullmatch(name):
        raise TenantAdminError(
            f"invalid tenant name {name!r}: use 1-64 characters from a-z, 0-9, '_', '.', '-', "
            "starting with a letter or digit"
        )
    if (
        session.get(Tenant, name) is not None
        or session.execute(select(Tenant.id).where(Tenant.name == name)).first()
    ):
        raise TenantAdminError(f"tenant {name!r} already exists")
    return ensure_tenant(session, name, name=name)


def _tenant(session: Session, name: str) -> Tenant:
    tenant = session.get(Tenant, name)
    if tenant is None or tenant.deleted_at is not None:
        raise TenantAdminError(f"unknown tenant {name!r}: create it with 'tensafe admin create-tenant'")
    return tenant


def list_tenants(session: Session) -> list[tuple[Tenant, int]]:
    """Return every live tenant with its number of usable (unrevoked, unexpired) keys."""
    now = utcnow()
    usable = (
        select(ApiKey.tenant_id, func.count().label("n"))
        .where(ApiKey.revoked_at.is_(None))
        .where((ApiKey.expires_at.is_(None)) | (ApiKey.expires_at > now))
        .group_by(ApiKey.tenant_id)
        .subquery()
    )
    rows = session.execute(
        select(Tenant, usable.c.n)
        .outerjoin(usable, usable.c.tenant_id == Tenant.id)
        .where(Tenant.deleted_at.is_(None))
        .order_by(Tenant.id)
    ).all()
    return [(tenant, int(n or 0)) for tenant, n in rows]


def create_api_key(
    session: Session,
    tenant: str,
    *,
    name: str = "",
    expires_in: _dt.timedelta | None = None,
) -> tuple[str, ApiKeyInfo]:
    """Create an API key for ``tenant``.

    Args:
        session: An open session; the caller commits.
        tenant: Existing tenant id.
        name: Free label shown in listings.
        expires_in: Lifetime (None: no expiry). At most ten years.

    Returns:
        ``(key, info)``: the plaintext key, to show once, and its public facts.

    Raises:
        TenantAdminError: Unknown tenant or invalid lifetime.
    """
    _tenant(session, tenant)
    if expires_in is not None and not (_dt.timedelta(0) < expires_in <= _dt.timedelta(days=MAX_EXPIRY_DAYS)):
        raise TenantAdminError(f"the key lifetime must be between 1 second and {MAX_EXPIRY_DAYS} days")
    if len(name) > 200:
        raise TenantAdminError("the key name must be at most 200 characters")
    key = API_KEY_PREFIX + secrets.token_urlsafe(32)
    now = utcnow()
    row = ApiKey(
        id="key_" + secrets.token_hex(8),
        tenant_id=tenant,
        key_hash=hash_api_key(key),
        name=name,
        created_at=now,
        expires_at=None if expires_in is None else now + expires_in,
        revoked_at=None,
    )
    session.add(row)
    session.flush()
    return key, _info(row)


def _info(row: ApiKey) -> ApiKeyInfo:
    return ApiKeyInfo(
        key_id=row.id,
        tenant=row.tenant_id,
        name=row.name,
        created_at=row.created_at,
        expires_at=row.expires_at,
        revoked_at=row.revoked_at,
    )


def list_api_keys(session: Session, tenant: str) -> list[ApiKeyInfo]:
    """Return the keys of ``tenant`` (public facts only), oldest first."""
    _tenant(session, tenant)
    rows = session.execute(select(ApiKey).where(ApiKey.tenant_id == tenant).order_by(ApiKey.created_at))
    return [_info(row) for row in rows.scalars()]


def revoke_api_key(session: Session, key_id: str) -> ApiKeyInfo:
    """Revoke a key by its id (``key_...``); revoking twice keeps the first time.

    Raises:
        TenantAdminError: No key has this id.
    """
    row = session.get(ApiKey, key_id)
    if row is None:
        raise TenantAdminError(f"no API key with id {key_id!r}")
    if row.revoked_at is None:
        row.revoked_at = utcnow()
        session.flush()
    return _info(row)


def authenticate(session: Session, key: str | None, *, now: _dt.datetime | None = None) -> Principal:
    """Return the caller behind an API key.

    Raises:
        AuthenticationError: The key is missing, malformed, unknown, revoked or expired,
            or its tenant was deleted. The message never contains the key.
    """
    if not key:
        raise AuthenticationError("missing API key: send it in the X-API-Key header")
    try:
        owner = lookup_api_key(session, key, now=now)
    except ApiKeyRejectedError as exc:
        raise AuthenticationError(str(exc)) from None
    return Principal(tenant=owner.tenant, key_id=owner.key_id)
