"""Training API server: sequences recorded at sampling for ``stable_reinforce``.

Revision ID: 0008_stability_records
Revises: 0007_privacy_ledger
Create Date: 2027-01-15

``stability_records`` holds, per sequence sampled with ``record_stability_info``, the prompt,
the sampled tokens and the sampler's log-probabilities, sealed under the tenant's DEK
(``blob``), bound to the tenant and the sampling session, with an expiry that each training
request using the sequence restarts (``tensafe.server.stability``). Hand-written;
``tests/server/test_stability_records.py`` checks that it matches the model on SQLite and
PostgreSQL.
"""

from __future__ import annotations

from collections.abc import Sequence

import sqlalchemy as sa
from alembic import op

revision: str = "0008_stability_records"
down_revision: str | Sequence[str] | None = "0007_privacy_ledger"
branch_labels: str | Sequence[str] | None = None
depends_on: str | Sequence[str] | None = None

_TZ = sa.DateTime(timezone=True)


def upgrade() -> None:
    """Create ``stability_records``."""
    op.create_table(
        "stability_records",
        sa.Column("id", sa.String(320), primary_key=True),
        sa.Column("tenant_id", sa.String(64), sa.ForeignKey("tenants.id"), nullable=False),
        sa.Column("sampling_session_id", sa.String(200), nullable=False),
        sa.Column("created_at", _TZ, nullable=False),
        sa.Column("expires_at", _TZ, nullable=False),
        sa.Column("blob", sa.LargeBinary(), nullable=False),
    )
    op.create_index("ix_stability_records_expires_at", "stability_records", ["expires_at"])


def downgrade() -> None:
    """Drop ``stability_records`` (recorded sequences are lost: later stable_reinforce requests fail)."""
    op.drop_index("ix_stability_records_expires_at", table_name="stability_records")
    op.drop_table("stability_records")
