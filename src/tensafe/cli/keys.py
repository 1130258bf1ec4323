"""``tensafe keys``: create, inspect, rotate, rebind and shred keys.

Configuration comes from the environment (``TS_ENVIRONMENT``, ``TS_KEK_PROVIDER``,
``DATABASE_URL``, ``TS_AUDIT_CHECKPOINT_EVERY``, ...; see docs/security/keys.md). No command
ever prints key material. ``shred`` exits 3 when the keys are destroyed logically but the
database could not yet drop their bytes (``shred --finish`` completes it); ``status`` and
``export-public-key`` exit 1 when the stored deployment key does not match its sealed
private key.
"""

from __future__ import annotations

import argparse
import json
from typing import Any

__all__ = ["register"]


def register(subparsers: argparse._SubParsersAction) -> None:  # type: ignore[type-arg]
    """Add the ``keys`` command group."""
    parser = subparsers.add_parser(
        "keys",
        help="manage the KEK, tenant DEKs and the deployment signing key",
        description="Key custody: KEK provider (local, vault, pkcs11), per-tenant DEKs, signing key.",
    )
    sub = parser.add_subparsers(dest="keys_command", metavar="ACTION")
    parser.set_defaults(handler=lambda args: _help(parser))

    init = sub.add_parser(
        "init",
        help="migrate the database, create the KEK (if missing) and the deployment signing key",
    )
    init.set_defaults(handler=_init)

    status = sub.add_parser("status", help="show providers, versions and counts (no secrets)")
    status.add_argument("--json", action="store_true", help="print JSON")
    status.set_defaults(handler=_status)

    export = sub.add_parser(
        "export-public-key",
        help="write the deployment signing PUBLIC key (for audit and package verification)",
    )
    export.add_argument("--out", required=True, help="output file (refuses to overwrite)")
    export.set_defaults(handler=_export_public_key)

    rotate_kek = sub.add_parser("rotate-kek", help="create a new KEK version and re-wrap every stored key")
    rotate_kek.set_defaults(handler=_rotate_kek)

    rebind = sub.add_parser(
        "rebind",
        help="re-wrap keys stored in the legacy unbound format, bound to their tenant and version "
        "(once, after upgrading)",
    )
    rebind.set_defaults(handler=_rebind)

    rotate_dek = sub.add_parser("rotate-dek", help="create a new DEK version for a tenant's new data")
    rotate_dek.add_argument("--tenant", required=True, help="tenant id")
    rotate_dek.set_defaults(handler=_rotate_dek)

    shred = sub.add_parser(
        "shred", help="destroy a tenant's DEKs (crypto-shredding): its data becomes unreadable forever"
    )
    shred.add_argument("--tenant", help="tenant id")
    shred.add_argument("--yes", action="store_true", help="confirm: this cannot be undone")
    shred.add_argument(
        "--delete-artifacts",
        action="store_true",
        help="also delete the tenant's artifact files under TS_ARTIFACT_DIR (default $TS_DATA_DIR/artifacts)",
    )
    shred.add_argument(
        "--finish",
        action="store_true",
        help="only purge the bytes of earlier shreds from the database files (after exit status 3)",
    )
    shred.add_argument(
        "--timeout",
        type=float,
        default=None,
        metavar="SECONDS",
        help="how long to wait for database readers that block the purge (default 30)",
    )
    shred.set_defaults(handler=_shred)


def _help(parser: argparse.ArgumentParser) -> int:
    parser.print_help()
    return 2


def _manager(*, create: bool | None = None) -> Any:
    import getpass

    from tensafe.keys import KeyManager

    try:
        actor = f"cli:{getpass.getuser()}"  # named in the audit record of every key change
    except (KeyError, OSError):
        actor = "cli:unknown"
    return KeyManager.from_environment(create=create, actor=actor)


def _init(args: argparse.Namespace) -> int:
    from tensafe.db import get_database_url, safe_url, upgrade
    from tensafe.keys import KeySettings

    settings = KeySettings.from_environment()
    url = settings.get("DATABASE_URL") or get_database_url()
    revision = upgrade(url)
    manager = _manager(create=True)
    try:
        key = manager.deployment_signing_key()
        kek = manager.provider.describe()
        print(f"database: {safe_url(url)} (revision {revision})")
        print(f"KEK provider: {kek['provider']} (current version {kek['current_version']})")
        print(f"deployment signing key: {key.key_id} ({key.algorithm})")
    finally:
        manager.close()
    return 0


def _status(args: argparse.Namespace) -> int:
    manager = _manager(create=False)
    try:
        status = manager.status()
    finally:
        manager.close()
    error = status["signing_key_error"]
    if args.json:
        print(json.dumps(status, indent=2, sort_keys=True, default=str))
        return _signing_key_verdict(error)
    kek = status["kek"]
    print(f"environment: {status['environment']}")
    print(f"KEK provider: {kek['provider']}")
    for key, value in kek.items():
        if key != "provider":
            print(f"  {key}: {value}")
    print(f"tenants with DEKs: {status['tenants_with_deks']}")
    print(f"DEKs by state: {json.dumps(status['deks_by_state'], sort_keys=True)}")
    print(f"live DEKs by KEK version: {json.dumps(status['live_deks_by_kek_version'], sort_keys=True)}")
    print(f"audit checkpoint interval: {status['audit_checkpoint_every']}")
    print(f"legacy (unbound) wrapped keys: {status['legacy_wrapped_keys']}")
    none = "(invalid, see the error below)" if error else "(none; run tensafe keys init)"
    print(f"deployment signing key: {status['signing_key_id'] or none}")
    return _signing_key_verdict(error)


def _signing_key_verdict(error: str | None) -> int:
    """Exit 0, or raise the signing key's error (one line, non-zero) after the status was printed."""
    if error:
        from tensafe.keys import KeyManagementError

        raise KeyManagementError(error)
    return 0


def _export_public_key(args: argparse.Namespace) -> int:
    from pathlib import Path

    from tensafe._fsutil import atomic_write_bytes
    from tensafe.cli._paths import output_path
    from tensafe.keys import KeyManagementError

    out = Path(args.out)
    if out.exists():
        raise KeyManagementError(f"{out} already exists; choose another path")
    manager = _manager(create=False)
    try:
        # Derived from the unwrapped private key; raises if the stored public key differs.
        public = manager.deployment_verifying_key()
    finally:
        manager.close()
    atomic_write_bytes(output_path(out, flag="--out"), public.public_bytes(), mode=0o644)
    print(f"deployment signing public key {public.key_id} written to {out}")
    return 0


def _rotate_kek(args: argparse.Namespace) -> int:
    manager = _manager(create=False)
    try:
        result = manager.rotate_kek()
    finally:
        manager.close()
    print(
        f"KEK rotated from version {result.previous_version} to {result.new_version}; "
        f"{result.rewrapped} key(s) re-wrapped"
    )
    return 0


def _rebind(args: argparse.Namespace) -> int:
    manager = _manager(create=False)
    try:
        count = manager.rebind_all()
    finally:
        manager.close()
    if count:
        print(f"{count} legacy wrapped key(s) rebound to their tenant and version")
    else:
        print("every stored key is already bound to its tenant and version")
    return 0


def _rotate_dek(args: argparse.Namespace) -> int:
    manager = _manager(create=False)
    try:
        version = manager.rotate_dek(args.tenant)
    finally:
        manager.close()
    print(f"tenant {args.tenant}: new data is now encrypted under DEK version {version}")
    return 0


def _shred(args: argparse.Namespace) -> int:
    from pathlib import Path

    from tensafe.keys import KeyManagementError, KeySettings

    if args.finish:
        if args.tenant or args.delete_artifacts:
            raise KeyManagementError("--finish takes no --tenant or --delete-artifacts")
        manager = _manager(create=False)
        try:
            manager.finish_shred(purge_timeout_s=args.timeout)
        finally:
            manager.close()
        print("the erased keys of every shredded tenant are purged from the database files")
        return 0
    if not args.tenant:
        raise KeyManagementError("tensafe keys shred needs --tenant T (or --finish)")
    if not args.yes:
        raise KeyManagementError(
            f"refusing to shred tenant {args.tenant!r} without --yes: its data becomes unreadable forever"
        )
    store = None
    if args.delete_artifacts:
        from tensafe.storage import EncryptedArtifactStore, LocalFilesystemBackend

        settings = KeySettings.from_environment()
        root = Path(settings.get("TS_ARTIFACT_DIR") or settings.data_dir / "artifacts")
        manager = _manager(create=False)
        store = EncryptedArtifactStore(LocalFilesystemBackend(root), manager)
    else:
        manager = _manager(create=False)
    try:
        count = manager.shred_tenant(args.tenant, store=store, purge_timeout_s=args.timeout)
    finally:
        manager.close()
    print(f"tenant {args.tenant}: {count} DEK version(s) destroyed; its data can no longer be decrypted")
    return 0
