"""Database layer shared by the whole platform (SQLAlchemy 2, Alembic; SQLite or PostgreSQL).

Typical use::

    from tensafe.db import create_engine_from_url, get_database_url, make_session_factory, upgrade

    url = get_database_url()          # DATABASE_URL, default sqlite:///./tensafe.db
    upgrade(url)                      # apply the packaged migrations
    Session = make_session_factory(create_engine_from_url(url))
    with Session.begin() as session:
        ...

See docs/database.md.
"""

from __future__ import annotations

from tensafe.db._engine import (
    DEFAULT_DATABASE_URL,
    create_engine_from_url,
    get_database_url,
    make_read_session_factory,
    make_session_factory,
    safe_url,
)
from tensafe.db._migrate import (
    current_revision,
    head_revision,
    is_embedded_default,
    prepare_embedded_schema,
    upgrade,
)
from tensafe.db.base import Base, UTCDateTime, utcnow
from tensafe.db.errors import DatabaseError
from tensafe.db.models import Tenant, ensure_tenant

__all__ = [
    "DEFAULT_DATABASE_URL",
    "Base",
    "DatabaseError",
    "Tenant",
    "UTCDateTime",
    "create_engine_from_url",
    "current_revision",
    "ensure_tenant",
    "get_database_url",
    "head_revision",
    "is_embedded_default",
    "make_read_session_factory",
    "make_session_factory",
    "prepare_embedded_schema",
    "safe_url",
    "upgrade",
    "utcnow",
]
