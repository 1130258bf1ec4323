"""``tensafe admin``: tenants and API keys of the training API server."""

from __future__ import annotations

import argparse
from collections.abc import Iterator
from contextlib import contextmanager
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from sqlalchemy.orm import Session

__all__ = ["register"]


def register(subparsers: argparse._SubParsersAction) -> None:  # type: ignore[type-arg]
    """Add the ``admin`` command group."""
    parser = subparsers.add_parser("admin", help="tenants and API keys of the training API server")
    commands = parser.add_subparsers(dest="admin_command", metavar="SUBCOMMAND", required=True)

    tenant = commands.add_parser("create-tenant", help="create a tenant")
    _add_url(tenant)
    tenant.add_argument("name", metavar="NAME", help="tenant name (a-z, 0-9, '_', '.', '-')")
    tenant.set_defaults(handler=_create_tenant)

    key = commands.add_parser(
        "create-api-key", help="create an API key for a tenant (printed once, as the last line)"
    )
    _add_url(key)
    key.add_argument("--tenant", required=True, metavar="NAME")
    key.add_argument("--name", default="", metavar="LABEL", help="label shown in listings")
    key.add_argument(
        "--expires-in-days", type=float, default=None, metavar="D", help="lifetime (default: no expiry)"
    )
    key.set_defaults(handler=_create_key)

    tenants = commands.add_parser("list-tenants", help="list tenants and their usable key counts")
    _add_url(tenants)
    tenants.set_defaults(handler=_list_tenants)

    keys = commands.add_parser("list-api-keys", help="list a tenant's API keys (ids, never secrets)")
    _add_url(keys)
    keys.add_argument("--tenant", required=True, metavar="NAME")
    keys.set_defaults(handler=_list_keys)

    revoke = commands.add_parser("revoke-api-key", help="revoke an API key by its id (key_...)")
    _add_url(revoke)
    revoke.add_argument("key_id", metavar="KEY_ID")
    revoke.set_defaults(handler=_revoke_key)


def _add_url(parser: argparse.ArgumentParser) -> None:
    parser.add_argument(
        "--database-url",
        metavar="URL",
        default=None,
        help="database URL (default: $DATABASE_URL, else sqlite:///./tensafe.db)",
    )


@contextmanager
def _session(args: argparse.Namespace) -> Iterator[Session]:
    from sqlalchemy import inspect
    from sqlalchemy.exc import SQLAlchemyError

    from tensafe.db import (
        DatabaseError,
        create_engine_from_url,
        get_database_url,
        make_session_factory,
        safe_url,
    )
    from tensafe.server.errors import ServerConfigurationError

    url = args.database_url or get_database_url()
    engine = create_engine_from_url(url)
    try:
        try:
            if not inspect(engine).has_table("api_keys"):
                raise ServerConfigurationError(
                    f"{safe_url(url)} has no server tables; run 'tensafe db upgrade' first"
                )
            with make_session_factory(engine).begin() as session:
                yield session
        except SQLAlchemyError as exc:
            raise DatabaseError(f"database error on {safe_url(url)}: {type(exc).__name__}") from exc
    finally:
        engine.dispose()


def _audit(session: Session, tenant: str, action: str, resource: str, **details: str) -> None:
    from tensafe.audit import append_record

    append_record(
        session, tenant=tenant, actor="admin:cli", action=action, resource=resource, details=details
    )


def _create_tenant(args: argparse.Namespace) -> int:
    from tensafe.server.tenants import create_tenant

    with _session(args) as session:
        tenant = create_tenant(session, args.name)
        _audit(session, tenant.id, "admin.create_tenant", tenant.id)
    print(f"created tenant {tenant.id}")
    return 0


def _create_key(args: argparse.Namespace) -> int:
    import datetime as dt

    from tensafe.server.errors import TenantAdminError
    from tensafe.server.tenants import create_api_key

    expires = None
    if args.expires_in_days is not None:
        if not args.expires_in_days > 0:
            raise TenantAdminError("--expires-in-days must be a positive number")
        expires = dt.timedelta(days=args.expires_in_days)
    with _session(args) as session:
        key, info = create_api_key(session, args.tenant, name=args.name, expires_in=expires)
        _audit(session, info.tenant, "admin.create_api_key", info.key_id)
    until = info.expires_at.isoformat() if info.expires_at else "never"
    print(
        f"created API key {info.key_id} for tenant {info.tenant} (expires: {until}); it is shown only once:"
    )
    print(key)
    return 0


def _list_tenants(args: argparse.Namespace) -> int:
    from tensafe.server.tenants import list_tenants

    with _session(args) as session:
        rows = list_tenants(session)
    for tenant, usable in rows:
        print(f"{tenant.id}\tcreated {tenant.created_at.isoformat()}\t{usable} usable API key(s)")
    if not rows:
        print("no tenants; create one with 'tensafe admin create-tenant NAME'")
    return 0


def _list_keys(args: argparse.Namespace) -> int:
    from tensafe.db import utcnow
    from tensafe.server.tenants import list_api_keys

    with _session(args) as session:
        keys = list_api_keys(session, args.tenant)
    now = utcnow()
    for k in keys:
        if k.revoked_at is not None:
            state = f"revoked {k.revoked_at.isoformat()}"
        elif k.expires_at is not None and k.expires_at <= now:
            state = f"expired {k.expires_at.isoformat()}"
        else:
            state = "active" + (f" until {k.expires_at.isoformat()}" if k.expires_at else "")
        print(f"{k.key_id}\t{state}\t{k.name}")
    return 0


def _revoke_key(args: argparse.Namespace) -> int:
    from tensafe.server.tenants import revoke_api_key

    with _session(args) as session:
        info = revoke_api_key(session, args.key_id)
        _audit(session, info.tenant, "admin.revoke_api_key", info.key_id)
    print(f"revoked API key {info.key_id} of tenant {info.tenant}")
    return 0
