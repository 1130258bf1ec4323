"""Tenant API keys: the table and the one lookup every API (training server, serving) uses.

API keys look like Tinker's: ``tml-`` followed by ``secrets.token_urlsafe(32)`` (256 random
bits). Only ``SHA-256("tensafe-api-key-v1" || 0x00 || key)`` is stored. Because every key
carries 256 bits of entropy, a leaked hash cannot be inverted by guessing, so no pepper or
slow hash is needed. The table lives in the database layer (not in ``tensafe.server``) so
that ``tensafe serve`` (:mod:`tensafe.serving`, below the server) authenticates with the
same keys through the same code: :func:`lookup_api_key`. Creation, listing and revocation
are in ``tensafe.server.tenants`` (``tensafe admin``).
"""

from __future__ import annotations

import datetime as _dt
import hashlib
import re
from dataclasses import dataclass

from sqlalchemy import ForeignKey, String, select
from sqlalchemy.orm import Mapped, Session, mapped_column

from tensafe.db.base import Base, UTCDateTime, utcnow
from tensafe.db.models import Tenant
from tensafe.errors import TenSafeError
from tensafe.protocol import API_KEY_PREFIX

__all__ = ["API_KEY_PATTERN", "ApiKey", "ApiKeyRejectedError", "KeyOwner", "hash_api_key", "lookup_api_key"]

_DOMAIN = b"tensafe-api-key-v1\x00"
#: The shape of every API key (the prefix and 43 URL-safe base64 characters).
API_KEY_PATTERN = re.compile(re.escape(API_KEY_PREFIX) + r"[A-Za-z0-9_-]{43}")


class ApiKeyRejectedError(TenSafeError):
    """The API key is missing, malformed, unknown, revoked or expired, or its tenant is gone.

    The message never contains the key; each API maps it to its own 401 error.
    """


class ApiKey(Base):
    """An API key of a tenant, stored only as a hash (see ``docs/server.md``; migration 0003)."""

    __tablename__ = "api_keys"

    id: Mapped[str] = mapped_column(String(32), primary_key=True)
    tenant_id: Mapped[str] = mapped_column(String(64), ForeignKey("tenants.id"))
    key_hash: Mapped[str] = mapped_column(String(64), unique=True)
    name: Mapped[str] = mapped_column(String(200))
    created_at: Mapped[_dt.datetime] = mapped_column(UTCDateTime())
    expires_at: Mapped[_dt.datetime | None] = mapped_column(UTCDateTime(), nullable=True)
    revoked_at: Mapped[_dt.datetime | None] = mapped_column(UTCDateTime(), nullable=True)

    def __repr__(self) -> str:
        return f"ApiKey(id={self.id!r}, tenant_id={self.tenant_id!r})"


@dataclass(frozen=True)
class KeyOwner:
    """The tenant behind a valid API key and the key's id (never the secret)."""

    tenant: str
    key_id: str


def hash_api_key(key: str) -> str:
    """Return the stored hash of an API key (hex SHA-256 with a domain label)."""
    return hashlib.sha256(_DOMAIN + key.encode("utf-8")).hexdigest()


def lookup_api_key(session: Session, key: str | None, *, now: _dt.datetime | None = None) -> KeyOwner:
    """Return the owner of a usable API key.

    Raises:
        ApiKeyRejectedError: The key is missing, malformed, unknown, revoked or expired, or
            its tenant was deleted. The message never contains the key.
    """
    if not key:
        raise ApiKeyRejectedError("missing API key")
    if not API_KEY_PATTERN.fullmatch(key):
        raise ApiKeyRejectedError("invalid API key")
    row = session.execute(select(ApiKey).where(ApiKey.key_hash == hash_api_key(key))).scalar_one_or_none()
    if row is None:
        raise ApiKeyRejectedError("invalid API key")
    now = now or utcnow()
    if row.revoked_at is not None:
        raise ApiKeyRejectedError("this API key was revoked")
    if row.expires_at is not None and row.expires_at <= now:
        raise ApiKeyRejectedError("this API key has expired; ask the operator for a new one")
    tenant = session.get(Tenant, row.tenant_id)
    if tenant is None or tenant.deleted_at is not None:
        raise ApiKeyRejectedError("invalid API key")
    return KeyOwner(tenant=row.tenant_id, key_id=row.id)
