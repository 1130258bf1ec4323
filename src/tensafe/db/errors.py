"""Errors of the database layer."""

from __future__ import annotations

from tensafe.errors import TenSafeError

__all__ = ["DatabaseError"]


class DatabaseError(TenSafeError):
    """The database is unreachable, misconfigured, or its schema is not what TenSafe expects.

    Messages never contain the password part of a database URL.
    """
