"""Shared helpers of the audit tests (imported by module name; pytest puts this folder on sys.path)."""

from __future__ import annotations

from dataclasses import dataclass

from sqlalchemy import Engine
from sqlalchemy.orm import Session, sessionmaker

from tensafe.audit import AuditLog


@dataclass
class AuditDB:
    """A migrated database with tenants ``acme`` and ``globex`` and an AuditLog on it."""

    url: str
    engine: Engine
    sessions: sessionmaker[Session]
    log: AuditLog
