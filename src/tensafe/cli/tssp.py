"""``tensafe tssp``: create, inspect, verify and unpack TSSP packages (docs/tssp.md)."""

from __future__ import annotations

import argparse
import json
import os
import sys
from datetime import timedelta
from pathlib import Path
from typing import Any

from tensafe.cli._paths import output_path
from tensafe.config import env_value

__all__ = ["register"]


def _passphrase(args: argparse.Namespace) -> bytes | None:
    from tensafe.package import PackageInputError

    var = getattr(args, "passphrase_env", None)
    if not var:
        return None
    value = env_value(var)
    if not value:
        raise PackageInputError(f"--passphrase-env {var}: the environment variable is not set or empty")
    return value.encode("utf-8")


def _read_key_file(path: str, *, what: str) -> bytes:
    from tensafe.package import PackageInputError

    try:
        with open(path, "rb") as fh:
            data = fh.read(1 << 20)
    except OSError as exc:
        raise PackageInputError(f"cannot read {what} {path}: {exc.strerror or exc}") from None
    return data


def _read_json_file(path: str, *, what: str) -> dict[str, Any]:
    from tensafe.package import PackageInputError

    try:
        doc = json.loads(_read_key_file(path, what=what))
    except ValueError:
        raise PackageInputError(f"{what} {path} is not valid JSON") from None
    if not isinstance(doc, dict):
        raise PackageInputError(f"{what} {path} must hold a JSON object")
    return doc


def _load(loader: Any, path: str, *, what: str, **kwargs: Any) -> Any:
    from tensafe.crypto import CryptoError, DecryptionError
    from tensafe.package import PackageInputError

    data = _read_key_file(path, what=what)
    try:
        return loader(data, **kwargs)
    except DecryptionError:
        raise PackageInputError(f"cannot open {what} {path}: wrong passphrase or corrupt file") from None
    except CryptoError as exc:
        raise PackageInputError(f"{what} {path} is not usable: {exc}") from None


def _signing_key(path: str, passphrase: bytes | None) -> Any:
    from tensafe.crypto.signing import HybridSigningKey

    return _load(HybridSigningKey.from_private_bytes, path, what="signing key", passphrase=passphrase)


def _verifying_key(path: str) -> Any:
    from tensafe.crypto.signing import HybridVerifyingKey

    return _load(HybridVerifyingKey.from_public_bytes, path, what="trusted signer key")


def _recipient_public(path: str) -> Any:
    from tensafe.crypto.kem import HybridKemPublicKey

    return _load(HybridKemPublicKey.from_public_bytes, path, what="recipient public key")


def _recipient_private(path: str, passphrase: bytes | None) -> Any:
    from tensafe.crypto.kem import HybridKemPrivateKey

    return _load(HybridKemPrivateKey.from_private_bytes, path, what="recipient key", passphrase=passphrase)


def _policy(path: str | None) -> Any:
    if path is None:
        return None
    from tensafe.package import POLICY_PACKAGE
    from tensafe.policy import Policy

    return Policy.from_file(path, package=POLICY_PACKAGE)


def _state(args: argparse.Namespace) -> Any:
    from tensafe.package import RollbackState

    return RollbackState(args.state) if args.state else RollbackState.default()


def _write_private(path: Path, data: bytes) -> None:
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
    with os.fdopen(fd, "wb") as fh:
        fh.write(data)
        fh.flush()
        os.fsync(fh.fileno())


def _write_public(path: Path, data: bytes) -> None:
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o644)
    with os.fdopen(fd, "wb") as fh:
        fh.write(data)


def _cmd_keygen(args: argparse.Namespace) -> int:
    from tensafe.crypto.kem import HybridKemPrivateKey
    from tensafe.crypto.signing import HybridSigningKey
    from tensafe.package import PackageInputError

    out = Path(args.out)
    names = ("signing.key", "signing.pub", "recipient.key", "recipient.pub")
    try:
        out.mkdir(parents=True, exist_ok=True, mode=0o700)
    except OSError as exc:
        raise PackageInputError(f"cannot create {out}: {exc.strerror or exc}") from None
    existing = [n for n in names if (out / n).exists()]
    if existing:
        raise PackageInputError(f"{out} already holds {', '.join(existing)}; keys are never overwritten")
    passphrase = _passphrase(args)
    sk = HybridSigningKey.generate()
    rk = HybridKemPrivateKey.generate()
    try:
        _write_private(out / "signing.key", sk.private_bytes(passphrase=passphrase))
        _write_public(out / "signing.pub", sk.verifying_key().public_bytes())
        _write_private(out / "recipient.key", rk.private_bytes(passphrase=passphrase))
        _write_public(out / "recipient.pub", rk.public_key().public_bytes())
    except OSError as exc:
        raise PackageInputError(f"cannot write keys into {out}: {exc.strerror or exc}") from None
    print(f"signing key    {out / 'signing.key'} (public: signing.pub, key id {sk.key_id})")
    print(f"recipient key  {out / 'recipient.key'} (public: recipient.pub, key id {rk.key_id})")
    return 0


def _evidence_from_flags(args: argparse.Namespace) -> dict[str, Any] | None:
    from tensafe.package import PackageInputError

    flags = {
        "training_run_id": args.run_id,
        "config_sha256": args.config_hash,
        "dataset_commitment": args.dataset_commitment,
        "audit_chain_head": args.audit_head,
    }
    if all(v is None for v in flags.values()):
        return None
    if (Path(args.adapter_dir) / "evidence.json").exists():
        raise PackageInputError(
            "the adapter directory already has evidence.json; drop --run-id/--config-hash/"
            "--dataset-commitment/--audit-head or remove the file"
        )
    from tensafe.package import build_evidence

    return build_evidence(
        training_run_id=args.run_id,
        config_sha256=args.config_hash,
        dataset_commitment=args.dataset_commitment,
        audit_chain_head=args.audit_head,
    )


def _cmd_pack(args: argparse.Namespace) -> int:
    from tensafe.package import PackageInputError, pack

    if not 0 < args.expires_in_days <= 3_000_000:
        raise PackageInputError("--expires-in-days must be a positive number of days (at most 3000000)")
    passphrase = _passphrase(args)
    signing_keys = [_signing_key(p, passphrase) for p in args.signing_key]
    recipients = [_recipient_public(p) for p in args.recipient]
    certificate = None
    if args.dp_certificate:
        certificate = _read_json_file(args.dp_certificate, what="DP certificate")
    header = pack(
        args.adapter_dir,
        output_path(args.out, flag="--out"),
        name=args.name,
        version=args.version,
        signing_keys=signing_keys,
        recipients=recipients,
        threshold=args.threshold,
        expires_in=timedelta(days=args.expires_in_days),
        base_model_id=args.base_model,
        base_model_sha256=args.base_model_sha256,
        evidence=_evidence_from_flags(args),
        dp_certificate=certificate,
    )
    print(f"packed {args.out} ({args.name} {args.version}, header sha256 {header})")
    return 0


def _describe(info: Any) -> list[str]:
    lines = [
        f"name            {info.name}",
        f"version         {info.version}",
        f"created         {info.manifest['created']}",
        f"expires         {info.manifest['expires']}",
        f"base model      {info.base_model_id}"
        + (f" (sha256 {info.base_model_sha256})" if info.base_model_sha256 else ""),
        f"header sha256   {info.header_sha256}",
        f"signers         {', '.join(info.signers)} (threshold {info.threshold})",
        f"recipients      {', '.join(info.recipients)}",
        "files:",
    ]
    lines += [f"  {f.sha256}  {f.size:>12}  {f.path}" for f in info.files]
    cert = info.dp_certificate
    if cert is None:
        lines.append("dp certificate  none")
    else:
        shown = {k: cert[k] for k in ("epsilon", "delta", "accountant") if k in cert}
        lines.append(f"dp certificate  {json.dumps(shown, sort_keys=True)}")
    lines.append(f"evidence        {json.dumps(info.evidence, sort_keys=True)}")
    return lines


def _cmd_inspect(args: argparse.Namespace) -> int:
    from tensafe.package import inspect

    info = inspect(args.package)
    if args.json:
        doc = {
            "verified": False,
            "header_sha256": info.header_sha256,
            "manifest": info.manifest,
            "evidence": info.evidence,
            "dp_certificate": info.dp_certificate,
            "recipients": list(info.recipients),
        }
        print(json.dumps(doc, sort_keys=True))
        return 0
    print("UNVERIFIED: signatures, trust, expiry and policy were NOT checked; use 'tensafe tssp verify'.")
    for line in _describe(info):
        print(line)
    print("UNVERIFIED")
    return 0


def _audit_sink(args: argparse.Namespace) -> Any:
    """An AuditLogSink for ``--audit-db``/``--audit-tenant``, or None when not asked for."""
    if args.audit_db is None and args.audit_tenant is None:
        return None
    from tensafe.package import PackageInputError

    if args.audit_db is None or args.audit_tenant is None:
        raise PackageInputError("--audit-db and --audit-tenant must be given together")
    import getpass

    from sqlalchemy import inspect as sa_inspect
    from sqlalchemy.exc import SQLAlchemyError

    from tensafe.audit import AuditLog
    from tensafe.db import create_engine_from_url, make_session_factory
    from tensafe.errors import TenSafeError
    from tensafe.package import AuditLogSink

    try:
        engine = create_engine_from_url(args.audit_db)
        has_tables = sa_inspect(engine).has_table("audit_records")
    except (SQLAlchemyError, TenSafeError) as exc:
        first = (str(exc).strip().splitlines() or [type(exc).__name__])[0]
        raise PackageInputError(f"cannot open the audit database: {first}") from None
    if not has_tables:
        raise PackageInputError("the audit database has no audit tables; run 'tensafe db upgrade' first")
    actor = args.audit_actor
    if actor is None:
        try:
            actor = f"cli:{getpass.getuser()}"
        except (KeyError, OSError):
            actor = "cli:unknown"
    from tensafe.cli._audit_signing import deployment_audit_signer

    try:  # every appender signs checkpoints with the deployment key, at the deployment's interval
        signer, every = deployment_audit_signer(engine, actor=actor)
    except TenSafeError as exc:
        raise PackageInputError(str(exc)) from None
    log = AuditLog(make_session_factory(engine), signer=signer, checkpoint_every=every)
    return AuditLogSink(log, tenant=args.audit_tenant, actor=actor)


def _cmd_verify(args: argparse.Namespace) -> int:
    from tensafe.package import verify

    sink = _audit_sink(args)
    trust = [_verifying_key(p) for p in args.trust]
    info = verify(
        args.package,
        trust=trust,
        state=_state(args),
        policy=_policy(args.policy),
        threshold=args.threshold,
        audit=sink,
    )
    print(
        f"OK {info.name} {info.version}: signed by {', '.join(info.trusted_signers)} (trusted), "
        f"expires {info.manifest['expires']}" + (", policy passed" if args.policy else "")
    )
    return 0


def _cmd_unpack(args: argparse.Namespace) -> int:
    from tensafe.package import unpack

    sink = _audit_sink(args)
    trust = [_verifying_key(p) for p in args.trust]
    key = _recipient_private(args.key, _passphrase(args))
    info = unpack(
        args.package,
        output_path(args.out, flag="--out"),
        recipient_key=key,
        trust=trust,
        state=_state(args),
        policy=_policy(args.policy),
        threshold=args.threshold,
        audit=sink,
    )
    print(f"unpacked {info.name} {info.version} into {args.out} ({len(info.files)} files)")
    return 0


def _add_verify_options(p: argparse.ArgumentParser) -> None:
    p.add_argument("--trust", action="append", required=True, metavar="PUB", help="trusted signer public key")
    p.add_argument("--policy", metavar="P.rego", help="Rego admission policy (package tensafe.tssp)")
    p.add_argument("--threshold", type=int, default=1, help="minimum distinct trusted signers (default 1)")
    p.add_argument(
        "--state",
        metavar="FILE",
        help="rollback state file (default $TS_DATA_DIR/tssp-state.json or ~/.local/state/tensafe/)",
    )
    p.add_argument(
        "--audit-db",
        metavar="URL",
        help="append the decision (accepted or refused) to the audit log in this database",
    )
    p.add_argument("--audit-tenant", metavar="T", help="tenant whose audit chain records the decision")
    p.add_argument("--audit-actor", metavar="ID", help="actor named in the audit record (default cli:$USER)")


def register(subparsers: argparse._SubParsersAction) -> None:  # type: ignore[type-arg]
    """Add ``tensafe tssp`` and its subcommands."""
    parser = subparsers.add_parser("tssp", help="signed, encrypted adapter packages (TSSP)")
    parser.set_defaults(handler=lambda _args: (parser.print_help(sys.stderr), 2)[1])
    sub = parser.add_subparsers(dest="tssp_command", metavar="SUBCOMMAND")

    p = sub.add_parser("keygen", help="create a signing key pair and a recipient key pair")
    p.add_argument("--out", required=True, metavar="DIR")
    p.add_argument(
        "--passphrase-env", metavar="VAR", help="seal the private keys with the passphrase in $VAR"
    )
    p.set_defaults(handler=_cmd_keygen)

    p = sub.add_parser("pack", help="pack an adapter directory into a .tssp package")
    p.add_argument("adapter_dir", metavar="ADAPTER_DIR")
    p.add_argument("--name", required=True)
    p.add_argument("--version", required=True, help="semantic version, e.g. 1.0.0")
    p.add_argument("--signing-key", action="append", required=True, metavar="KEY")
    p.add_argument("--recipient", action="append", required=True, metavar="PUB")
    p.add_argument("--out", required=True, metavar="FILE.tssp")
    p.add_argument("--threshold", type=int, default=None, help="signers a verifier must trust (default all)")
    p.add_argument("--expires-in-days", type=int, default=365, metavar="D")
    p.add_argument("--base-model", metavar="ID", help="default: adapter_config.json base_model_name_or_path")
    p.add_argument("--base-model-sha256", metavar="HEX")
    p.add_argument("--dp-certificate", metavar="FILE", help="default: ADAPTER_DIR/dp_certificate.json")
    p.add_argument("--run-id", help="evidence: training run id")
    p.add_argument("--config-hash", help="evidence: SHA-256 of the training config")
    p.add_argument(
        "--dataset-commitment",
        metavar="HEX",
        help="evidence: KEYED dataset commitment (hmac-sha256/v2, from 'tensafe data commitment DATA "
        "--key KEYFILE'), never a plain hash of the data: recipients could confirm guesses about it",
    )
    p.add_argument("--audit-head", help="evidence: audit chain head")
    p.add_argument("--passphrase-env", metavar="VAR", help="passphrase of sealed signing keys in $VAR")
    p.set_defaults(handler=_cmd_pack)

    p = sub.add_parser("inspect", help="show a package's contents (UNVERIFIED)")
    p.add_argument("package", metavar="FILE.tssp")
    p.add_argument("--json", action="store_true", help="print one JSON object")
    p.set_defaults(handler=_cmd_inspect)

    p = sub.add_parser("verify", help="verify signatures, trust, expiry, rollback and policy")
    p.add_argument("package", metavar="FILE.tssp")
    _add_verify_options(p)
    p.set_defaults(handler=_cmd_verify)

    p = sub.add_parser("unpack", help="verify, then decrypt into a new directory (all or nothing)")
    p.add_argument("package", metavar="FILE.tssp")
    p.add_argument("--key", required=True, metavar="RECIPIENT_KEY")
    p.add_argument("--out", required=True, metavar="DIR")
    p.add_argument("--passphrase-env", metavar="VAR", help="passphrase of a sealed recipient key in $VAR")
    _add_verify_options(p)
    p.set_defaults(handler=_cmd_unpack)
