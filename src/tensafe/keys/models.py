"""Database tables of key management: wrapped tenant DEKs and deployment keys.

Created by the migration ``0002_keys`` (``tensafe/db/migrations/versions/v0002_keys.py``),
which must stay identical to these models (``tests/keys/test_schema.py`` checks it).
"""

from __future__ import annotations

import datetime as _dt

from sqlalchemy import ForeignKey, Integer, LargeBinary, String
from sqlalchemy.orm import Mapped, mapped_column

import tensafe.db.models  # noqa: F401  (registers the tenants table the foreign key refers to)
from tensafe.db import Base, UTCDateTime

__all__ = ["DEK_STATES", "DeploymentKey", "TenantDek"]

#: ``active``: the tenant's current DEK (encrypts new data); ``retired``: an older
#: version, decrypt only; ``destroyed``: wrapped key erased (crypto-shredded).
DEK_STATES = ("active", "retired", "destroyed")


class TenantDek(Base):
    """One version of a tenant's data-encryption key, wrapped under a KEK version."""

    __tablename__ = "tenant_deks"

    tenant_id: Mapped[str] = mapped_column(String(64), ForeignKey("tenants.id"), primary_key=True)
    version: Mapped[int] = mapped_column(Integer, primary_key=True, autoincrement=False)
    kek_provider: Mapped[str] = mapped_column(String(32))
    kek_version: Mapped[int] = mapped_column(Integer)
    wrapped_dek: Mapped[bytes | None] = mapped_column(LargeBinary, nullable=True)
    created_at: Mapped[_dt.datetime] = mapped_column(UTCDateTime())
    destroyed_at: Mapped[_dt.datetime | None] = mapped_column(UTCDateTime(), nullable=True)
    state: Mapped[str] = mapped_column(String(16))

    def __repr__(self) -> str:
        return (
            f"TenantDek(tenant_id={self.tenant_id!r}, version={self.version}, state={self.state!r}, "
            f"kek={self.kek_provider}:v{self.kek_version})"
        )


class DeploymentKey(Base):
    """A deployment-wide private key sealed under a random key that is wrapped by the KEK."""

    __tablename__ = "deployment_keys"

    name: Mapped[str] = mapped_column(String(64), primary_key=True)
    kind: Mapped[str] = mapped_column(String(64))
    key_id: Mapped[str] = mapped_column(String(64))
    public_key: Mapped[bytes] = mapped_column(LargeBinary)
    kek_provider: Mapped[str] = mapped_column(String(32))
    kek_version: Mapped[int] = mapped_column(Integer)
    wrapped_key: Mapped[bytes] = mapped_column(LargeBinary)
    sealed_private: Mapped[bytes] = mapped_column(LargeBinary)
    created_at: Mapped[_dt.datetime] = mapped_column(UTCDateTime())

    def __repr__(self) -> str:
        return f"DeploymentKey(name={self.name!r}, kind={self.kind!r}, key_id={self.key_id!r})"
