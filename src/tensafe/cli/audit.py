"""``tensafe audit``: verify, export, inspect and checkpoint the audit log; export and check signed heads."""

from __future__ import annotations

import argparse
import json
import sys
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from sqlalchemy.orm import Session

__all__ = ["register"]


def register(subparsers: argparse._SubParsersAction) -> None:  # type: ignore[type-arg]
    """Add the ``audit`` command group."""
    parser = subparsers.add_parser("audit", help="tamper-evident audit log: verify, export, log, checkpoint")
    commands = parser.add_subparsers(dest="audit_command", metavar="SUBCOMMAND", required=True)

    verify = commands.add_parser(
        "verify", help="verify the hash chains and signed checkpoints in the database"
    )
    _add_url(verify)
    verify.add_argument(
        "--tenant", help="verify only this tenant (default: the known head's, else every tenant)"
    )
    _add_keys(verify)
    _add_rules(verify)
    verify.set_defaults(handler=_verify)

    export = commands.add_parser("export", help="write a tenant's log to a bundle verifiable offline")
    _add_url(export)
    export.add_argument("--tenant", required=True)
    export.add_argument("--out", required=True, metavar="BUNDLE.json", help="bundle file to write")
    export.add_argument("--force", action="store_true", help="replace an existing file")
    export.set_defaults(handler=_export)

    bundle = commands.add_parser("verify-bundle", help="verify an export bundle offline with the public key")
    bundle.add_argument("bundle", metavar="BUNDLE.json")
    _add_keys(bundle)
    _add_rules(bundle)
    bundle.set_defaults(handler=_verify_bundle)

    head = commands.add_parser(
        "head",
        help="write a tenant's signed newest checkpoint (its head) to a file to keep off-box",
    )
    _add_url(head)
    head.add_argument("--tenant", required=True)
    head.add_argument("--out", required=True, metavar="HEAD.json", help="head file to write")
    head.add_argument("--force", action="store_true", help="replace an existing file")
    signing = head.add_mutually_exclusive_group()
    signing.add_argument(
        "--signing-key",
        metavar="KEY",
        help="sign with this hybrid signing key file (default: the deployment key of the key manager)",
    )
    signing.add_argument(
        "--no-sign",
        action="store_true",
        help="do not sign: write the newest existing checkpoint even if records follow it",
    )
    head.add_argument(
        "--passphrase-env",
        metavar="VAR",
        help="environment variable holding the --signing-key file's passphrase (if it is sealed)",
    )
    head.set_defaults(handler=_head)

    verify_head = commands.add_parser(
        "verify-head", help="check a head file's signature with the deployment's public key"
    )
    verify_head.add_argument("head", metavar="HEAD.json")
    verify_head.add_argument("--tenant", help="also require the head to be this tenant's")
    verify_head.add_argument(
        "--public-key",
        action="append",
        default=[],
        metavar="PUB",
        help="the deployment's signing public key file (repeat for rotated keys); required",
    )
    verify_head.set_defaults(handler=_verify_head)

    log = commands.add_parser("log", help="list a tenant's newest records")
    _add_url(log)
    log.add_argument("--tenant", required=True)
    log.add_argument("--limit", type=int, default=20, metavar="N", help="how many records (default 20)")
    log.add_argument("--json", action="store_true", help="one JSON object per line")
    log.set_defaults(handler=_log)

    checkpoint = commands.add_parser("checkpoint", help="sign a checkpoint of a tenant's chain now")
    _add_url(checkpoint)
    checkpoint.add_argument("--tenant", required=True)
    checkpoint.add_argument(
        "--signing-key", required=True, metavar="KEY", help="the deployment's hybrid signing key file"
    )
    checkpoint.add_argument(
        "--passphrase-env",
        metavar="VAR",
        help="environment variable holding the key file's passphrase (if it is sealed)",
    )
    checkpoint.set_defaults(handler=_checkpoint)


def _add_url(parser: argparse.ArgumentParser) -> None:
    parser.add_argument(
        "--database-url",
        metavar="URL",
        default=None,
        help="database URL (default: $DATABASE_URL, else sqlite:///./tensafe.db)",
    )


def _add_keys(parser: argparse.ArgumentParser) -> None:
    parser.add_argument(
        "--public-key",
        action="append",
        default=[],
        metavar="PUB",
        help="the deployment's signing public key file (repeat for rotated keys); required",
    )
    parser.add_argument(
        "--allow-unsigned-tail",
        action="store_true",
        help="accept fewer than --checkpoint-every records after the newest signed checkpoint "
        "(hash-chained only)",
    )


def _add_rules(parser: argparse.ArgumentParser) -> None:
    parser.add_argument(
        "--checkpoint-every",
        type=int,
        default=None,
        metavar="N",
        help="the deployment's checkpoint interval: at most N records between signed checkpoints "
        "(default: $TS_AUDIT_CHECKPOINT_EVERY, else 1000)",
    )
    parser.add_argument(
        "--known-head",
        metavar="HEAD.json",
        help="a head kept off-box (tensafe audit head): fail if the chain is shorter (rollback) "
        "or does not contain it (rewrite)",
    )


def _interval(args: argparse.Namespace) -> int:
    from tensafe.audit import AuditError, checkpoint_every_from_environment

    if args.checkpoint_every is None:
        return checkpoint_every_from_environment()
    if args.checkpoint_every < 1:
        raise AuditError("--checkpoint-every must be a positive integer")
    return int(args.checkpoint_every)


def _known_head(path: str | None) -> Any:
    from tensafe.audit import AuditError, load_head
    from tensafe.audit.head import MAX_HEAD_BYTES

    if path is None:
        return None
    try:
        return load_head(_read(path, "known head", MAX_HEAD_BYTES))
    except AuditError as exc:
        if str(exc).startswith(f"cannot read known head {path}"):
            raise
        raise AuditError(f"{path}: {exc}") from None


def _public_keys(paths: list[str]) -> list[Any]:
    from tensafe.audit import AuditVerificationError
    from tensafe.crypto import CryptoError
    from tensafe.crypto.signing import HybridVerifyingKey

    if not paths:
        raise AuditVerificationError(
            "checkpoint signatures cannot be verified without the deployment's signing public key: "
            "pass --public-key PUB"
        )
    keys = []
    for path in paths:
        data = _read(path, "public key")
        try:
            keys.append(HybridVerifyingKey.from_public_bytes(data))
        except CryptoError as exc:
            raise type(exc)(f"{path}: {exc}") from None
    return keys


def _read(path: str, what: str, limit: int | None = None) -> bytes:
    from tensafe.audit import AuditError

    try:
        with open(path, "rb") as handle:
            data = handle.read(limit + 1 if limit is not None else -1)
    except OSError as exc:
        raise AuditError(f"cannot read {what} {path}: {exc.strerror}") from None
    if limit is not None and len(data) > limit:
        raise AuditError(f"{what} {path} is larger than {limit} bytes")
    return data


@contextmanager
def _session(url_arg: str | None, *, must_exist: bool = True) -> Iterator[Session]:
    from sqlalchemy import inspect
    from sqlalchemy.engine import make_url
    from sqlalchemy.exc import SQLAlchemyError

    from tensafe.db import (
        DatabaseError,
        create_engine_from_url,
        get_database_url,
        make_session_factory,
        safe_url,
    )

    url = url_arg or get_database_url()
    engine = create_engine_from_url(url)
    try:
        parsed = make_url(url)
        if (
            must_exist
            and parsed.get_backend_name() == "sqlite"
            and parsed.database not in (None, "", ":memory:")
        ):
            if not Path(parsed.database).exists():  # SQLite would silently create an empty file
                raise DatabaseError(f"no database file at {parsed.database}: check --database-url")
        try:
            if not inspect(engine).has_table("audit_records"):
                raise DatabaseError(
                    f"{safe_url(url)} has no audit tables: run `tensafe db upgrade --database-url URL`"
                )
            factory = make_session_factory(engine)
            with factory.begin() as session:
                yield session
        except SQLAlchemyError as exc:
            orig = getattr(exc, "orig", None) or exc
            first = (str(orig).strip().splitlines() or [type(exc).__name__])[0]
            raise DatabaseError(f"database error on {safe_url(url)}: {first}") from None
    finally:
        engine.dispose()


def _verify(args: argparse.Namespace) -> int:
    from tensafe.audit import AuditError, audited_tenants, verify_chain

    keys = _public_keys(args.public_key)
    every = _interval(args)
    known = _known_head(args.known_head)
    tenant_arg = args.tenant
    if known is not None:
        if tenant_arg is not None and tenant_arg != known.tenant:
            raise AuditError(f"{args.known_head} is the head of tenant {known.tenant!r}, not {tenant_arg!r}")
        tenant_arg = known.tenant
    with _session(args.database_url) as session:
        tenants = [tenant_arg] if tenant_arg else audited_tenants(session)
        if tenant_arg and tenant_arg not in audited_tenants(session):
            if known is not None and known.length > 0:  # the whole log was deleted: a rollback
                verify_chain(
                    session, tenant=tenant_arg, verifying_key=keys, checkpoint_every=every, known_head=known
                )
            raise AuditError(f"tenant {tenant_arg!r} has no audit log")
        if not tenants:
            print("no audit records")
            return 0
        for tenant in tenants:
            report = verify_chain(
                session,
                tenant=tenant,
                verifying_key=keys,
                checkpoint_every=every,
                allow_unsigned_tail=args.allow_unsigned_tail,
                known_head=known,
            )
            print(f"ok: {report.summary()}")
    return 0


def _export(args: argparse.Namespace) -> int:
    from tensafe.audit import AuditError, export_bundle
    from tensafe.cli._paths import output_path

    out = Path(args.out)
    if out.exists() and not args.force:
        raise AuditError(f"{out} exists: pass --force to replace it")
    output_path(out, flag="--out")
    with _session(args.database_url) as session:
        count = export_bundle(session, tenant=args.tenant, out=out)
    print(f"wrote {count} records of tenant {args.tenant!r} to {out}")
    return 0


def _verify_bundle(args: argparse.Namespace) -> int:
    from tensafe.audit import AuditError, AuditVerificationError, verify_bundle
    from tensafe.audit.bundle import MAX_BUNDLE_BYTES

    keys = _public_keys(args.public_key)
    every = _interval(args)
    known = _known_head(args.known_head)
    data = _read(args.bundle, "bundle", MAX_BUNDLE_BYTES)
    try:
        report = verify_bundle(
            data,
            verifying_key=keys,
            checkpoint_every=every,
            allow_unsigned_tail=args.allow_unsigned_tail,
            known_head=known,
        )
    except AuditVerificationError:
        raise
    except AuditError as exc:
        raise AuditError(f"{args.bundle}: {exc}") from None
    print(f"ok: {report.summary()}")
    return 0


def _head(args: argparse.Namespace) -> int:
    from tensafe.audit import AuditError, signed_head, write_head
    from tensafe.cli._paths import output_path
    from tensafe.db import Tenant

    out = Path(args.out)
    if out.exists() and not args.force:
        raise AuditError(f"{out} exists: pass --force to replace it")
    if args.passphrase_env and not args.signing_key:
        raise AuditError("--passphrase-env goes with --signing-key")
    signer = _signing_key(args.signing_key, args.passphrase_env) if args.signing_key else None
    with _session(args.database_url) as session:
        if signer is None and not args.no_sign:
            from tensafe.cli._audit_signing import deployment_audit_signer

            # Before this session's first statement: on SQLite the key manager needs the write lock.
            signer, _ = deployment_audit_signer(session.get_bind(), actor="cli:audit")  # type: ignore[arg-type]
        if session.get(Tenant, args.tenant) is None:
            raise AuditError(f"unknown tenant {args.tenant!r}")
        head = signed_head(session, tenant=args.tenant, signer=signer)
        write_head(head.checkpoint, output_path(out, flag="--out"))
    checkpoint = head.checkpoint
    made = "signed now" if head.created else f"signed {checkpoint.timestamp}"
    print(
        f"wrote the head of tenant {args.tenant!r} to {out}: length {checkpoint.length}, head "
        f"{checkpoint.head_hash}, key {checkpoint.key_id} ({made})"
    )
    if head.unsigned:
        print(
            f"note: {head.unsigned} records follow it and are not covered; run without --no-sign to sign "
            "them first"
        )
    return 0


def _verify_head(args: argparse.Namespace) -> int:
    from tensafe.audit import verify_head

    keys = _public_keys(args.public_key)
    head = _known_head(args.head)
    verify_head(head, verifying_key=keys, tenant=args.tenant)
    print(
        f"ok: signed head of tenant {head.tenant!r}: length {head.length}, head {head.head_hash}, "
        f"signed {head.timestamp} by key {head.key_id}"
    )
    return 0


def _log(args: argparse.Namespace) -> int:
    from tensafe.audit import AuditError, latest_records

    if args.limit < 1:
        raise AuditError("--limit must be at least 1")
    with _session(args.database_url) as session:
        records = latest_records(session, tenant=args.tenant, limit=args.limit)
    write: Callable[[str], Any] = sys.stdout.write
    for record in records:
        if args.json:
            write(json.dumps(record.to_json(), ensure_ascii=False, sort_keys=True) + "\n")
        else:
            details = json.dumps(dict(record.details), ensure_ascii=False, sort_keys=True)
            write(
                f"{record.seq:>6} {record.timestamp} {record.actor} {record.action} "
                f"{record.resource or '-'} {details}\n"
            )
    return 0


def _signing_key(path: str, passphrase_env: str | None) -> Any:
    from tensafe.audit import AuditError
    from tensafe.config import env_value
    from tensafe.crypto.signing import HybridSigningKey

    passphrase: bytes | None = None
    if passphrase_env:
        value = env_value(passphrase_env)
        if not value:
            raise AuditError(f"environment variable {passphrase_env} is not set or empty")
        passphrase = value.encode("utf-8")
    return HybridSigningKey.from_private_bytes(_read(path, "signing key", 1 << 20), passphrase=passphrase)


def _checkpoint(args: argparse.Namespace) -> int:
    from tensafe.audit import create_checkpoint

    key = _signing_key(args.signing_key, args.passphrase_env)
    with _session(args.database_url) as session:
        checkpoint = create_checkpoint(session, tenant=args.tenant, signer=key)
    print(
        f"signed checkpoint of tenant {args.tenant!r}: length {checkpoint.length}, "
        f"head {checkpoint.head_hash}, key {checkpoint.key_id}"
    )
    return 0
