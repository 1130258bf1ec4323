"""Platform-wide tables owned by the database layer.

Only tables that every other layer references live here (today: ``tenants``). Each
domain keeps its own models next to its code (``tensafe.audit.models``,
``tensafe.keys.models``) on the shared :class:`~tensafe.db.base.Base`.
"""

from __future__ import annotations

import datetime as _dt
import re
import uuid

from sqlalchemy import String, select
from sqlalchemy.orm import Mapped, Session, mapped_column

from tensafe.db.base import Base, UTCDateTime, utcnow
from tensafe.db.errors import DatabaseError

__all__ = ["TENANT_ID_PATTERN", "Tenant", "ensure_tenant"]

#: Tenant identifiers: lower-case letters, digits, ``_``, ``.`` and ``-``; 1 to 64
#: characters, starting with a letter or digit. They appear in audit records and key
#: paths, so they are restricted to characters that never need quoting.
TENANT_ID_PATTERN = re.compile(r"[a-z0-9][a-z0-9_.-]{0,63}")


class Tenant(Base):
    """A customer organisation. Deleting a tenant is a soft delete (``deleted_at``)."""

    __tablename__ = "tenants"

    id: Mapped[str] = mapped_column(String(64), primary_key=True)
    name: Mapped[str] = mapped_column(String(200), unique=True)
    created_at: Mapped[_dt.datetime] = mapped_column(UTCDateTime(), default=utcnow)
    deleted_at: Mapped[_dt.datetime | None] = mapped_column(UTCDateTime(), default=None)

    def __repr__(self) -> str:
        return f"Tenant(id={self.id!r}, name={self.name!r})"


def ensure_tenant(session: Session, tenant_id: str | None = None, *, name: str | None = None) -> Tenant:
    """Return the tenant with ``tenant_id``, creating it if it does not exist.

    Args:
        session: An open session; the caller commits.
        tenant_id: The identifier (see :data:`TENANT_ID_PATTERN`); a random one when None.
        name: Display name, unique across tenants; defaults to the identifier.

    Returns:
        The existing or newly added tenant (flushed, not committed).

    Raises:
        DatabaseError: The identifier is malformed.
    """
    if tenant_id is None:
        tenant_id = uuid.uuid4().hex
    if not TENANT_ID_PATTERN.fullmatch(tenant_id):
        raise DatabaseError(
            f"invalid tenant id {tenant_id!r}: use 1-64 characters from a-z, 0-9, '_', '.', '-'"
        )
    existing = session.execute(select(Tenant).where(Tenant.id == tenant_id)).scalar_one_or_none()
    if existing is not None:
        return existing
    tenant = Tenant(id=tenant_id, name=name if name is not None else tenant_id, created_at=utcnow())
    session.add(tenant)
    session.flush()
    return tenant
