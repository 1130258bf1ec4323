"""Training API server: short-lived download tokens of exported (external) weights.

Revision ID: 0005_downloads
Revises: 0004_privacy
Create Date: 2026-11-29

Hand-written (no autogenerate); ``tests/server/test_schema.py`` checks that it matches
``tensafe.server.models`` exactly on SQLite and PostgreSQL. Only a SHA-256 of each bearer
token is stored.
"""

from __future__ import annotations

from collections.abc import Sequence

import sqlalchemy as sa
from alembic import op

revision: str = "0005_downloads"
down_revision: str | Sequence[str] | None = "0004_privacy"
branch_labels: str | Sequence[str] | None = None
depends_on: str | Sequence[str] | None = None

_TZ = sa.DateTime(timezone=True)


def upgrade() -> None:
    """Create the ``download_tokens`` table."""
    op.create_table(
        "download_tokens",
        sa.Column("id", sa.String(32), nullable=False),
        sa.Column("token_hash", sa.String(64), nullable=False),
        sa.Column("tenant_id", sa.String(64), nullable=False),
        sa.Column("checkpoint_id", sa.String(64), nullable=False),
        sa.Column("artifact_id", sa.String(128), nullable=False),
        sa.Column("file_name", sa.String(300), nullable=False),
        sa.Column("size_bytes", sa.BigInteger(), nullable=False),
        sa.Column("created_by", sa.String(64), nullable=False),
        sa.Column("created_at", _TZ, nullable=False),
        sa.Column("expires_at", _TZ, nullable=False),
        sa.ForeignKeyConstraint(["tenant_id"], ["tenants.id"], name="fk_download_tokens_tenant_id_tenants"),
        sa.PrimaryKeyConstraint("id", name="pk_download_tokens"),
        sa.UniqueConstraint("token_hash", name="uq_download_tokens_token_hash"),
    )


def downgrade() -> None:
    """Drop what :func:`upgrade` created."""
    op.drop_table("download_tokens")
