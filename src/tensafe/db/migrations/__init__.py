"""Alembic migrations of the TenSafe database (hand-written; see docs/database.md)."""
