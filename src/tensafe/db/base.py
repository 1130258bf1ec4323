"""Declarative base and column types shared by every TenSafe table."""

from __future__ import annotations

import datetime as _dt
from typing import Any

from sqlalchemy import DateTime, MetaData
from sqlalchemy.engine import Dialect
from sqlalchemy.orm import DeclarativeBase
from sqlalchemy.types import TypeDecorator

__all__ = ["NAMING_CONVENTION", "Base", "UTCDateTime", "utcnow"]

#: Constraint naming convention. Hand-written migrations MUST use the same names so that
#: ``alembic check``/``compare_metadata`` sees no difference between models and schema.
NAMING_CONVENTION: dict[str, str] = {
    "ix": "ix_%(column_0_label)s",
    "uq": "uq_%(table_name)s_%(column_0_name)s",
    "ck": "ck_%(table_name)s_%(constraint_name)s",
    "fk": "fk_%(table_name)s_%(column_0_name)s_%(referred_table_name)s",
    "pk": "pk_%(table_name)s",
}


class Base(DeclarativeBase):
    """Declarative base of every TenSafe ORM model (one shared ``MetaData``)."""

    metadata = MetaData(naming_convention=NAMING_CONVENTION)


def utcnow() -> _dt.datetime:
    """Return the current time as a timezone-aware UTC datetime."""
    return _dt.datetime.now(_dt.UTC)


class UTCDateTime(TypeDecorator[_dt.datetime]):
    """A timestamp stored in UTC and always returned timezone-aware.

    SQLite has no time zone support and hands back naive datetimes; this type normalises
    both directions so that code never compares naive and aware values. Naive input is
    refused rather than guessed.
    """

    impl = DateTime(timezone=True)
    cache_ok = True

    def process_bind_param(self, value: Any, dialect: Dialect) -> _dt.datetime | None:
        if value is None:
            return None
        if not isinstance(value, _dt.datetime) or value.tzinfo is None:
            raise ValueError("UTCDateTime needs a timezone-aware datetime")
        utc: _dt.datetime = value.astimezone(_dt.UTC)
        if dialect.name == "sqlite":
            return utc.replace(tzinfo=None)
        return utc

    def process_result_value(self, value: Any, dialect: Dialect) -> _dt.datetime | None:
        if value is None:
            return None
        assert isinstance(value, _dt.datetime)
        result: _dt.datetime = value
        if result.tzinfo is None:
            return result.replace(tzinfo=_dt.UTC)
        return result.astimezone(_dt.UTC)
