"""Shared helpers of the audit tests (imported by module name; pytest puts this folder on sys.path)."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from sqlalchemy import Engine, text
from sqlalchemy.orm import Session, sessionmaker

from tensafe.audit import GENESIS_HASH, AuditLog, parse_json_strict, record_hash


@dataclass
class AuditDB:
    """A migrated database with tenants ``acme`` and ``globex`` and an AuditLog on it."""

    url: str
    engine: Engine
    sessions: sessionmaker[Session]
    log: AuditLog


def sql(engine: Engine, statement: str, **params: Any) -> None:
    with engine.begin() as conn:
        conn.execute(text(statement), params)


def rows(engine: Engine, tenant: str = "acme") -> list[dict[str, Any]]:
    with engine.connect() as conn:
        result = conn.execute(
            text("SELECT * FROM audit_records WHERE tenant_id = :t ORDER BY seq"), {"t": tenant}
        )
        return [dict(r._mapping) for r in result]


def rehash_from(engine: Engine, start: int, tenant: str = "acme") -> None:
    """What an attacker who knows the (public) algorithm does: recompute every hash from ``start``."""
    all_rows = rows(engine, tenant)
    prev = GENESIS_HASH if start == 0 else all_rows[start - 1]["record_hash"]
    with engine.begin() as conn:
        for row in all_rows[start:]:
            body = {
                "format": row["format"],
                "tenant": tenant,
                "seq": row["seq"],
                "timestamp": row["timestamp"],
                "actor": row["actor"],
                "action": row["action"],
                "resource": row["resource"],
                "details": parse_json_strict(row["details"]),
                "prev_hash": prev,
            }
            digest = record_hash(body)
            conn.execute(
                text(
                    "UPDATE audit_records SET prev_hash = :p, record_hash = :h "
                    "WHERE tenant_id = :t AND seq = :s"
                ),
                {"p": prev, "h": digest, "t": tenant, "s": row["seq"]},
            )
            prev = digest
        conn.execute(
            text("UPDATE audit_chain_heads SET length = :n, head_hash = :h WHERE tenant_id = :t"),
            {"n": len(all_rows), "h": prev, "t": tenant},
        )
