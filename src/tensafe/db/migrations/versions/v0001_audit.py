"""Tenants and the tamper-evident audit log.

Revision ID: 0001_audit
Revises:
Create Date: 2026-11-29

Hand-written (no autogenerate) so that this file never needs the model modules of higher
layers; ``tests/db`` checks that it matches the models exactly.
"""

from __future__ import annotations

from collections.abc import Sequence

import sqlalchemy as sa
from alembic import op

revision: str = "0001_audit"
down_revision: str | Sequence[str] | None = None
branch_labels: str | Sequence[str] | None = None
depends_on: str | Sequence[str] | None = None


def upgrade() -> None:
    """Create ``tenants``, ``audit_chain_heads``, ``audit_records`` and ``audit_checkpoints``."""
    op.create_table(
        "tenants",
        sa.Column("id", sa.String(64), nullable=False),
        sa.Column("name", sa.String(200), nullable=False),
        sa.Column("created_at", sa.DateTime(timezone=True), nullable=False),
        sa.Column("deleted_at", sa.DateTime(timezone=True), nullable=True),
        sa.PrimaryKeyConstraint("id", name="pk_tenants"),
        sa.UniqueConstraint("name", name="uq_tenants_name"),
    )
    op.create_table(
        "audit_chain_heads",
        sa.Column("tenant_id", sa.String(64), nullable=False),
        sa.Column("length", sa.BigInteger(), nullable=False),
        sa.Column("head_hash", sa.String(64), nullable=False),
        sa.Column("updated_at", sa.DateTime(timezone=True), nullable=False),
        sa.ForeignKeyConstraint(["tenant_id"], ["tenants.id"], name="fk_audit_chain_heads_tenant_id_tenants"),
        sa.PrimaryKeyConstraint("tenant_id", name="pk_audit_chain_heads"),
    )
    op.create_table(
        "audit_records",
        sa.Column("tenant_id", sa.String(64), nullable=False),
        sa.Column("seq", sa.BigInteger(), autoincrement=False, nullable=False),
        sa.Column("format", sa.String(32), nullable=False),
        sa.Column("timestamp", sa.String(32), nullable=False),
        sa.Column("actor", sa.String(256), nullable=False),
        sa.Column("action", sa.String(128), nullable=False),
        sa.Column("resource", sa.String(512), nullable=False),
        sa.Column("details", sa.Text(), nullable=False),
        sa.Column("prev_hash", sa.String(64), nullable=False),
        sa.Column("record_hash", sa.String(64), nullable=False),
        sa.ForeignKeyConstraint(["tenant_id"], ["tenants.id"], name="fk_audit_records_tenant_id_tenants"),
        sa.PrimaryKeyConstraint("tenant_id", "seq", name="pk_audit_records"),
    )
    op.create_table(
        "audit_checkpoints",
        sa.Column("id", sa.Integer(), autoincrement=True, nullable=False),
        sa.Column("tenant_id", sa.String(64), nullable=False),
        sa.Column("format", sa.String(48), nullable=False),
        sa.Column("length", sa.BigInteger(), nullable=False),
        sa.Column("head_hash", sa.String(64), nullable=False),
        sa.Column("timestamp", sa.String(32), nullable=False),
        sa.Column("key_id", sa.String(64), nullable=False),
        sa.Column("signature", sa.LargeBinary(), nullable=False),
        sa.ForeignKeyConstraint(["tenant_id"], ["tenants.id"], name="fk_audit_checkpoints_tenant_id_tenants"),
        sa.PrimaryKeyConstraint("id", name="pk_audit_checkpoints"),
    )
    op.create_index("ix_audit_checkpoints_tenant_length", "audit_checkpoints", ["tenant_id", "length"])


def downgrade() -> None:
    """Drop the tables created by :func:`upgrade`."""
    op.drop_index("ix_audit_checkpoints_tenant_length", table_name="audit_checkpoints")
    op.drop_table("audit_checkpoints")
    op.drop_table("audit_records")
    op.drop_table("audit_chain_heads")
    op.drop_table("tenants")
