"""``tensafe admin``: tenants and API keys of the training API server.

On the embedded default (a SQLite file in development mode) the schema is created or upgraded
first (:mod:`tensafe.cli._database`); any other database without the server's tables is
refused with a message that says to run ``tensafe db upgrade``.
"""

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

    policy = commands.add_parser(
        "set-privacy-policy",
        help="set a tenant's privacy policy (combined with the operator's TS_DP_* floor, stricter wins)",
    )
    _add_url(policy)
    policy.add_argument("--tenant", required=True, metavar="NAME")
    policy.add_argument(
        "--target-epsilon", type=float, required=True, metavar="E", help="ε budget of every run"
    )
    policy.add_argument("--delta", type=float, required=True, metavar="D", help="δ (below 1/N)")
    policy.add_argument("--clip-norm", type=float, required=True, metavar="C", help="per-example clip norm")
    policy.add_argument("--accountant", default="rdp", metavar="A", help="rdp (default), moments, pld or prv")
    policy.add_argument(
        "--allow-non-private",
        action="store_true",
        help="let this tenant's clients train without DP (only if the operator allows it too)",
    )
    policy.add_argument(
        "--dataset-size", type=int, default=None, metavar="N", help="largest N a run may claim"
    )
    policy.add_argument("--expected-batch-size", type=int, default=None, metavar="B")
    policy.add_argument("--max-steps", type=int, default=None, metavar="S")
    policy.set_defaults(handler=_set_policy)

    show = commands.add_parser("show-privacy-policy", help="show a tenant's privacy policy")
    _add_url(show)
    show.add_argument("--tenant", required=True, metavar="NAME")
    show.set_defaults(handler=_show_policy)

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


_SIGNER = "tensafe.audit_signer"


@contextmanager
def _session(args: argparse.Namespace, *, audited: bool = False) -> Iterator[Session]:
    """A transaction on the database; ``audited`` opens the deployment signer first (for :func:`_audit`)."""
    from sqlalchemy import inspect
    from sqlalchemy.exc import SQLAlchemyError

    from tensafe.cli._audit_signing import deployment_audit_signer
    from tensafe.cli._database import prepare_embedded_database
    from tensafe.db import (
        DatabaseError,
        create_engine_from_url,
        get_database_url,
        make_session_factory,
        safe_url,
    )
    from tensafe.server.errors import ServerConfigurationError

    url = args.database_url or get_database_url()
    prepare_embedded_database(url)
    engine = create_engine_from_url(url)
    try:
        try:
            if not inspect(engine).has_table("api_keys"):
                raise ServerConfigurationError(
                    f"{safe_url(url)} has no server tables; run 'tensafe db upgrade' first"
                )
            signing = deployment_audit_signer(engine, actor="admin:cli") if audited else None
            with make_session_factory(engine).begin() as session:
                session.info[_SIGNER] = signing
                yield session
        except SQLAlchemyError as exc:
            raise DatabaseError(f"database error on {safe_url(url)}: {type(exc).__name__}") from exc
    finally:
        engine.dispose()


def _audit(session: Session, tenant: str, action: str, resource: str, **details: str) -> None:
    """Append in the command's transaction, signing checkpoints like the server does."""
    from tensafe.audit import append_record

    signing = session.info.get(_SIGNER)
    if signing is None:  # pragma: no cover - a command that audits must open _session(audited=True)
        raise RuntimeError("an audited admin command must open its session with audited=True")
    signer, every = signing
    append_record(
        session,
        tenant=tenant,
        actor="admin:cli",
        action=action,
        resource=resource,
        details=details,
        signer=signer,
        checkpoint_every=every,
    )


def _create_tenant(args: argparse.Namespace) -> int:
    from tensafe.server.tenants import create_tenant

    with _session(args, audited=True) as session:
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
    with _session(args, audited=True) as session:
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

    with _session(args, audited=True) as session:
        info = revoke_api_key(session, args.key_id)
        _audit(session, info.tenant, "admin.revoke_api_key", info.key_id)
    print(f"revoked API key {info.key_id} of tenant {info.tenant}")
    return 0


def _set_policy(args: argparse.Namespace) -> int:
    from tensafe.server.privacy import set_tenant_policy

    with _session(args, audited=True) as session:
        row = set_tenant_policy(
            session,
            args.tenant,
            target_epsilon=args.target_epsilon,
            delta=args.delta,
            clip_norm=args.clip_norm,
            accountant=args.accountant,
            allow_non_private=args.allow_non_private,
            dataset_size=args.dataset_size,
            expected_batch_size=args.expected_batch_size,
            max_steps=args.max_steps,
        )
        summary = _policy_text(row)
        _audit(session, args.tenant, "admin.set_privacy_policy", args.tenant, policy=summary)
    print(f"privacy policy of tenant {args.tenant}: {summary}")
    return 0


def _show_policy(args: argparse.Namespace) -> int:
    from tensafe.server.privacy import tenant_row

    with _session(args) as session:
        row = tenant_row(session, args.tenant)
        text = "none (the operator's TS_DP_* defaults apply)" if row is None else _policy_text(row)
    print(f"privacy policy of tenant {args.tenant}: {text}")
    return 0


def _policy_text(row: object) -> str:
    fields = (
        "target_epsilon",
        "delta",
        "clip_norm",
        "accountant",
        "allow_non_private",
        "dataset_size",
        "expected_batch_size",
        "max_steps",
    )
    return " ".join(f"{name}={getattr(row, name)}" for name in fields)
