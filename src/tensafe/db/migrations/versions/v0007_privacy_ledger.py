"""Training API server: privacy ledgers shared by the runs that train on the same data.

Revision ID: 0007_privacy_ledger
Revises: 0006_inline_records
Create Date: 2026-12-03

``privacy_ledgers`` (one per body of data) and ``privacy_spends`` (one row per DP-SGD step,
recorded before the step runs) keep the privacy spent outside the restorable session state,
so that loading an earlier checkpoint neither resets nor forks the budget;
``training_models.ledger_id`` names the ledger a run spends from. Hand-written;
``tests/server/test_schema.py`` checks that it matches ``tensafe.server.models`` on SQLite
and PostgreSQL.
"""

from __future__ import annotations

from collections.abc import Sequence

import sqlalchemy as sa
from alembic import op

revision: str = "0007_privacy_ledger"
down_revision: str | Sequence[str] | None = "0006_inline_records"
branch_labels: str | Sequence[str] | None = None
depends_on: str | Sequence[str] | None = None

_TZ = sa.DateTime(timezone=True)


def upgrade() -> None:
    """Create the ledger tables and ``training_models.ledger_id``."""
    op.create_table(
        "privacy_ledgers",
        sa.Column("id", sa.String(40), primary_key=True),
        sa.Column("tenant_id", sa.String(64), sa.ForeignKey("tenants.id"), nullable=False),
        sa.Column("dataset_key", sa.String(64), nullable=True),
        sa.Column("created_at", _TZ, nullable=False),
        sa.UniqueConstraint("tenant_id", "dataset_key"),
    )
    op.create_table(
        "privacy_spends",
        sa.Column("id", sa.Integer(), primary_key=True, autoincrement=True),
        sa.Column("ledger_id", sa.String(40), sa.ForeignKey("privacy_ledgers.id"), nullable=False),
        sa.Column("tenant_id", sa.String(64), sa.ForeignKey("tenants.id"), nullable=False),
        sa.Column("model_id", sa.String(200), nullable=False),
        sa.Column("step_index", sa.Integer(), nullable=False),
        sa.Column("noise_multiplier", sa.Float(), nullable=False),
        sa.Column("sample_rate", sa.Float(), nullable=False),
        sa.Column("created_at", _TZ, nullable=False),
        sa.Column("draw_blob", sa.LargeBinary(), nullable=True),
        sa.UniqueConstraint("model_id", "step_index"),
    )
    op.create_index("ix_privacy_spends_ledger_id", "privacy_spends", ["ledger_id"])
    op.add_column("training_models", sa.Column("ledger_id", sa.String(40), nullable=True))
    op.create_index("ix_training_models_ledger_id", "training_models", ["ledger_id"])


def downgrade() -> None:
    """Drop what :func:`upgrade` created (the privacy spent is lost: run it on a drained server)."""
    op.drop_index("ix_training_models_ledger_id", table_name="training_models")
    with op.batch_alter_table("training_models") as batch:
        batch.drop_column("ledger_id")
    op.drop_index("ix_privacy_spends_ledger_id", table_name="privacy_spends")
    op.drop_table("privacy_spends")
    op.drop_table("privacy_ledgers")
