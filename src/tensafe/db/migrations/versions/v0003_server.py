"""Training API server: API keys, sessions, training models, durable futures, checkpoints.

Revision ID: 0003_server
Revises: 0002_keys
Create Date: 2026-11-29

Hand-written (no autogenerate); ``tests/server/test_schema.py`` checks that it matches
``tensafe.server.models`` exactly on SQLite and PostgreSQL.
"""

from __future__ import annotations

from collections.abc import Sequence

import sqlalchemy as sa
from alembic import op

revision: str = "0003_server"
down_revision: str | Sequence[str] | None = "0002_keys"
branch_labels: str | Sequence[str] | None = None
depends_on: str | Sequence[str] | None = None

_TZ = sa.DateTime(timezone=True)


def _tenant_fk(table: str) -> sa.ForeignKeyConstraint:
    return sa.ForeignKeyConstraint(["tenant_id"], ["tenants.id"], name=f"fk_{table}_tenant_id_tenants")


def upgrade() -> None:
    """Create the server tables."""
    op.create_table(
        "api_keys",
        sa.Column("id", sa.String(32), nullable=False),
        sa.Column("tenant_id", sa.String(64), nullable=False),
        sa.Column("key_hash", sa.String(64), nullable=False),
        sa.Column("name", sa.String(200), nullable=False),
        sa.Column("created_at", _TZ, nullable=False),
        sa.Column("expires_at", _TZ, nullable=True),
        sa.Column("revoked_at", _TZ, nullable=True),
        _tenant_fk("api_keys"),
        sa.PrimaryKeyConstraint("id", name="pk_api_keys"),
        sa.UniqueConstraint("key_hash", name="uq_api_keys_key_hash"),
    )
    op.create_table(
        "server_sessions",
        sa.Column("id", sa.String(64), nullable=False),
        sa.Column("tenant_id", sa.String(64), nullable=False),
        sa.Column("created_at", _TZ, nullable=False),
        sa.Column("last_heartbeat_at", _TZ, nullable=False),
        sa.Column("finished_at", _TZ, nullable=True),
        sa.Column("finish_reason", sa.String(16), nullable=True),
        sa.Column("user_metadata", sa.Text(), nullable=False),
        sa.Column("tags", sa.Text(), nullable=False),
        sa.Column("project_id", sa.String(200), nullable=True),
        sa.Column("display_name", sa.String(200), nullable=True),
        sa.Column("sdk_version", sa.String(200), nullable=True),
        _tenant_fk("server_sessions"),
        sa.PrimaryKeyConstraint("id", name="pk_server_sessions"),
    )
    op.create_table(
        "training_models",
        sa.Column("id", sa.String(200), nullable=False),
        sa.Column("tenant_id", sa.String(64), nullable=False),
        sa.Column("session_id", sa.String(64), nullable=False),
        sa.Column("model_seq_id", sa.Integer(), nullable=False),
        sa.Column("base_model", sa.String(500), nullable=False),
        sa.Column("lora_rank", sa.Integer(), nullable=True),
        sa.Column("lora_config", sa.Text(), nullable=False),
        sa.Column("optimizer_config", sa.Text(), nullable=False),
        sa.Column("user_metadata", sa.Text(), nullable=False),
        sa.Column("state", sa.String(16), nullable=False),
        sa.Column("error", sa.Text(), nullable=True),
        sa.Column("created_at", _TZ, nullable=False),
        sa.Column("last_request_time", _TZ, nullable=False),
        sa.Column("worker_id", sa.String(64), nullable=True),
        sa.Column("lease_until", _TZ, nullable=True),
        _tenant_fk("training_models"),
        sa.ForeignKeyConstraint(
            ["session_id"], ["server_sessions.id"], name="fk_training_models_session_id_server_sessions"
        ),
        sa.PrimaryKeyConstraint("id", name="pk_training_models"),
        sa.UniqueConstraint("session_id", "model_seq_id", name="uq_training_models_session_id"),
    )
    op.create_table(
        "futures",
        sa.Column("id", sa.String(64), nullable=False),
        sa.Column("tenant_id", sa.String(64), nullable=False),
        sa.Column("model_id", sa.String(200), nullable=True),
        sa.Column("seq_id", sa.Integer(), nullable=True),
        sa.Column("request_type", sa.String(32), nullable=False),
        sa.Column("state", sa.String(16), nullable=False),
        sa.Column("actor", sa.String(64), nullable=False),
        sa.Column("request_sha256", sa.String(64), nullable=False),
        sa.Column("payload_json", sa.Text(), nullable=True),
        sa.Column("payload_ref", sa.String(128), nullable=True),
        sa.Column("result_json", sa.Text(), nullable=True),
        sa.Column("result_ref", sa.String(128), nullable=True),
        sa.Column("result_content_type", sa.String(64), nullable=True),
        sa.Column("error", sa.Text(), nullable=True),
        sa.Column("error_category", sa.String(16), nullable=True),
        sa.Column("worker_id", sa.String(64), nullable=True),
        sa.Column("attempts", sa.Integer(), nullable=False),
        sa.Column("created_at", _TZ, nullable=False),
        sa.Column("updated_at", _TZ, nullable=False),
        sa.Column("started_at", _TZ, nullable=True),
        sa.Column("finished_at", _TZ, nullable=True),
        _tenant_fk("futures"),
        sa.PrimaryKeyConstraint("id", name="pk_futures"),
        sa.UniqueConstraint("model_id", "seq_id", name="uq_futures_model_id"),
    )
    op.create_index("ix_futures_state", "futures", ["state"])
    op.create_table(
        "training_checkpoints",
        sa.Column("id", sa.String(64), nullable=False),
        sa.Column("tenant_id", sa.String(64), nullable=False),
        sa.Column("model_id", sa.String(200), nullable=False),
        sa.Column("kind", sa.String(32), nullable=False),
        sa.Column("name", sa.String(200), nullable=False),
        sa.Column("artifact_id", sa.String(128), nullable=True),
        sa.Column("size_bytes", sa.BigInteger(), nullable=True),
        sa.Column("public", sa.Boolean(), nullable=False),
        sa.Column("user_metadata", sa.Text(), nullable=False),
        sa.Column("created_at", _TZ, nullable=False),
        sa.Column("expires_at", _TZ, nullable=True),
        _tenant_fk("training_checkpoints"),
        sa.ForeignKeyConstraint(
            ["model_id"], ["training_models.id"], name="fk_training_checkpoints_model_id_training_models"
        ),
        sa.PrimaryKeyConstraint("id", name="pk_training_checkpoints"),
        sa.UniqueConstraint("model_id", "kind", "name", name="uq_training_checkpoints_model_id"),
    )


def downgrade() -> None:
    """Drop the tables created by :func:`upgrade`."""
    op.drop_table("training_checkpoints")
    op.drop_index("ix_futures_state", table_name="futures")
    op.drop_table("futures")
    op.drop_table("training_models")
    op.drop_table("server_sessions")
    op.drop_table("api_keys")
