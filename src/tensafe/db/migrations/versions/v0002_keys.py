"""Key management: wrapped tenant DEKs and sealed deployment keys.

Revision ID: 0002_keys
Revises: 0001_audit
Create Date: 2026-11-29

Hand-written (no autogenerate); ``tests/keys/test_schema.py`` checks that it matches
``tensafe.keys.models`` exactly on SQLite and PostgreSQL.
"""

from __future__ import annotations

from collections.abc import Sequence

import sqlalchemy as sa
from alembic import op

revision: str = "0002_keys"
down_revision: str | Sequence[str] | None = "0001_audit"
branch_labels: str | Sequence[str] | None = None
depends_on: str | Sequence[str] | None = None


def upgrade() -> None:
    """Create ``tenant_deks`` and ``deployment_keys``."""
    op.create_table(
        "tenant_deks",
        sa.Column("tenant_id", sa.String(64), nullable=False),
        sa.Column("version", sa.Integer(), autoincrement=False, nullable=False),
        sa.Column("kek_provider", sa.String(32), nullable=False),
        sa.Column("kek_version", sa.Integer(), nullable=False),
        sa.Column("wrapped_dek", sa.LargeBinary(), nullable=True),
        sa.Column("created_at", sa.DateTime(timezone=True), nullable=False),
        sa.Column("destroyed_at", sa.DateTime(timezone=True), nullable=True),
        sa.Column("state", sa.String(16), nullable=False),
        sa.ForeignKeyConstraint(["tenant_id"], ["tenants.id"], name="fk_tenant_deks_tenant_id_tenants"),
        sa.PrimaryKeyConstraint("tenant_id", "version", name="pk_tenant_deks"),
    )
    op.create_table(
        "deployment_keys",
        sa.Column("name", sa.String(64), nullable=False),
        sa.Column("kind", sa.String(64), nullable=False),
        sa.Column("key_id", sa.String(64), nullable=False),
        sa.Column("public_key", sa.LargeBinary(), nullable=False),
        sa.Column("kek_provider", sa.String(32), nullable=False),
        sa.Column("kek_version", sa.Integer(), nullable=False),
        sa.Column("wrapped_key", sa.LargeBinary(), nullable=False),
        sa.Column("sealed_private", sa.LargeBinary(), nullable=False),
        sa.Column("created_at", sa.DateTime(timezone=True), nullable=False),
        sa.PrimaryKeyConstraint("name", name="pk_deployment_keys"),
    )


def downgrade() -> None:
    """Drop the tables created by :func:`upgrade`."""
    op.drop_table("deployment_keys")
    op.drop_table("tenant_deks")
