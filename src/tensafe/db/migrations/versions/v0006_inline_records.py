"""Training API server: small request payloads and results sealed into the futures table.

Revision ID: 0006_inline_records
Revises: 0005_downloads
Create Date: 2026-11-29

A request's training data and a forward/backward result of up to
``tensafe.server.jobs.INLINE_MAX_BYTES`` are kept as TSAF v1 blobs (encrypted under the
tenant's DEK, bound to the tenant and the record id) in ``futures.payload_blob`` and
``futures.result_blob``, committed in the same transaction as the row, instead of as files
of the artifact store. Hand-written; ``tests/server/test_schema.py`` checks that it
matches ``tensafe.server.models`` on SQLite and PostgreSQL.
"""

from __future__ import annotations

from collections.abc import Sequence

import sqlalchemy as sa
from alembic import op

revision: str = "0006_inline_records"
down_revision: str | Sequence[str] | None = "0005_downloads"
branch_labels: str | Sequence[str] | None = None
depends_on: str | Sequence[str] | None = None


def upgrade() -> None:
    """Add ``payload_blob`` and ``result_blob`` to ``futures``."""
    op.add_column("futures", sa.Column("payload_blob", sa.LargeBinary(), nullable=True))
    op.add_column("futures", sa.Column("result_blob", sa.LargeBinary(), nullable=True))


def downgrade() -> None:
    """Drop the columns :func:`upgrade` added (inline records are lost: run it on a drained server)."""
    with op.batch_alter_table("futures") as batch:
        batch.drop_column("result_blob")
        batch.drop_column("payload_blob")
