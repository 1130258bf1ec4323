"""Training API server: tenant privacy policies, sampling sessions, durable training state.

Revision ID: 0004_privacy
Revises: 0003_server
Create Date: 2026-11-29

Hand-written (no autogenerate); ``tests/server/test_schema.py`` checks that it matches
``tensafe.server.models`` exactly on SQLite and PostgreSQL.
"""

from __future__ import annotations

from collections.abc import Sequence

import sqlalchemy as sa
from alembic import op

revision: str = "0004_privacy"
down_revision: str | Sequence[str] | None = "0003_server"
branch_labels: str | Sequence[str] | None = None
depends_on: str | Sequence[str] | None = None

_TZ = sa.DateTime(timezone=True)

#: Columns added to ``training_models`` (all nullable: rows of 0003 stay valid).
_MODEL_COLUMNS = (
    ("dp_policy", sa.Text()),
    ("step", sa.Integer()),
    ("state_ref", sa.String(128)),
    ("state_seq_id", sa.Integer()),
    ("privacy_spent", sa.Text()),
)


def upgrade() -> None:
    """Create the privacy and sampling tables and the training-state columns."""
    op.create_table(
        "privacy_policies",
        sa.Column("tenant_id", sa.String(64), nullable=False),
        sa.Column("target_epsilon", sa.Float(), nullable=False),
        sa.Column("delta", sa.Float(), nullable=False),
        sa.Column("clip_norm", sa.Float(), nullable=False),
        sa.Column("accountant", sa.String(32), nullable=False),
        sa.Column("allow_non_private", sa.Boolean(), nullable=False),
        sa.Column("dataset_size", sa.Integer(), nullable=True),
        sa.Column("expected_batch_size", sa.Integer(), nullable=True),
        sa.Column("max_steps", sa.Integer(), nullable=True),
        sa.Column("updated_at", _TZ, nullable=False),
        sa.ForeignKeyConstraint(["tenant_id"], ["tenants.id"], name="fk_privacy_policies_tenant_id_tenants"),
        sa.PrimaryKeyConstraint("tenant_id", name="pk_privacy_policies"),
    )
    op.create_table(
        "sampling_sessions",
        sa.Column("id", sa.String(200), nullable=False),
        sa.Column("tenant_id", sa.String(64), nullable=False),
        sa.Column("session_id", sa.String(64), nullable=False),
        sa.Column("seq_id", sa.Integer(), nullable=False),
        sa.Column("base_model", sa.String(500), nullable=False),
        sa.Column("model_path", sa.String(700), nullable=True),
        sa.Column("weights_ref", sa.String(128), nullable=True),
        sa.Column("created_at", _TZ, nullable=False),
        sa.ForeignKeyConstraint(["tenant_id"], ["tenants.id"], name="fk_sampling_sessions_tenant_id_tenants"),
        sa.ForeignKeyConstraint(
            ["session_id"], ["server_sessions.id"], name="fk_sampling_sessions_session_id_server_sessions"
        ),
        sa.PrimaryKeyConstraint("id", name="pk_sampling_sessions"),
        sa.UniqueConstraint("session_id", "seq_id", name="uq_sampling_sessions_session_id"),
    )
    for name, type_ in _MODEL_COLUMNS:
        op.add_column("training_models", sa.Column(name, type_, nullable=True))


def downgrade() -> None:
    """Drop what :func:`upgrade` created."""
    with op.batch_alter_table("training_models") as batch:
        for name, _ in reversed(_MODEL_COLUMNS):
            batch.drop_column(name)
    op.drop_table("sampling_sessions")
    op.drop_table("privacy_policies")
