"""``tensafe serve``: serve one tenant's verified TSSP packages over the OpenAI-compatible API.

Everything that can refuse happens before anything listens, each failure one line and a
non-zero exit (``tensafe: error: ...``): the database must be at the newest schema and the
tenant must exist (its API keys authenticate the callers); the audit log is opened with the
deployment signing key (``TS_KEK_PROVIDER`` and the key settings, as for ``tensafe server``);
every ``--package`` is verified against ``--trust`` (and ``--threshold``), checked for expiry
and rollback (``--state``), admitted by ``--policy``, decrypted in memory with
``--recipient-key`` and checked against the base model; then the engine starts and loads each
adapter. See docs/serving.md, "``tensafe serve``".

The base model is ``--base-model NAME[=SOURCE]``: ``NAME`` is what clients send as ``model``
and what every package's manifest must name; ``SOURCE`` (default ``NAME``) is a registered
model or a local Hugging Face directory. Without it, the first package's (unverified) manifest
names the model to load, and every package is then verified to name it.
"""

from __future__ import annotations

import argparse
import sys
from typing import Any

__all__ = ["register"]

_LOOPBACK = ("127.0.0.1", "::1", "localhost")


def register(subparsers: argparse._SubParsersAction) -> None:  # type: ignore[type-arg]
    """Add the ``serve`` command."""
    parser = subparsers.add_parser(
        "serve",
        help="serve verified TSSP packages over the OpenAI-compatible API (one tenant; DATABASE_URL)",
        description=(
            "Verify, policy-check and decrypt (in memory) each package, load its adapter on the base "
            "model and serve it under its manifest name and name@version at /v1, for the API keys of "
            "--tenant. A refused package stops the start."
        ),
    )
    parser.add_argument("--tenant", required=True, help="the tenant whose API keys may use the packages")
    parser.add_argument(
        "--package", action="append", required=True, metavar="FILE", help="a .tssp package (repeatable)"
    )
    parser.add_argument(
        "--recipient-key", required=True, metavar="KEY", help="this server's recipient private key"
    )
    parser.add_argument(
        "--passphrase-env",
        metavar="VAR",
        default=None,
        help="environment variable holding the key's passphrase",
    )
    parser.add_argument(
        "--trust",
        action="append",
        required=True,
        metavar="SIGNER.pub",
        help="a trusted signer key (repeatable)",
    )
    parser.add_argument("--threshold", type=int, default=1, help="trusted signers required (default 1)")
    parser.add_argument(
        "--policy", metavar="P.rego", default=None, help="Rego admission policy (package tensafe.tssp)"
    )
    parser.add_argument(
        "--state", metavar="FILE", default=None, help="TSSP rollback state file (default: as tensafe tssp)"
    )
    parser.add_argument(
        "--base-model",
        metavar="NAME[=SOURCE]",
        default=None,
        help="the served base model (default: the one the first package names)",
    )
    parser.add_argument("--engine", choices=("transformers", "vllm"), default="transformers")
    parser.add_argument(
        "--vllm-python",
        metavar="PATH",
        default=None,
        help="python of the vLLM environment (TENSAFE_VLLM_PYTHON)",
    )
    parser.add_argument(
        "--max-model-len", type=int, default=None, help="context length (default: the model's)"
    )
    parser.add_argument(
        "--max-num-seqs", type=int, default=16, help="sequences decoded together (default 16)"
    )
    parser.add_argument("--max-lora-rank", type=int, default=64, help="largest adapter rank (default 64)")
    parser.add_argument(
        "--admin-token-file",
        metavar="FILE",
        default=None,
        help="enable /admin/adapters for whoever presents this file's token (mode 0600)",
    )
    parser.add_argument(
        "--revocation-list",
        metavar="FILE",
        default=None,
        help="withdrawn packages and signers (package:<sha256>, signer:<key id>), re-read every check",
    )
    parser.add_argument(
        "--recheck-seconds",
        type=float,
        default=30.0,
        help="how often expired or revoked packages are unloaded (default 30)",
    )
    parser.add_argument("--host", default="127.0.0.1", help="address to listen on (default 127.0.0.1)")
    parser.add_argument("--port", type=int, default=8001, help="TCP port (default 8001)")
    parser.add_argument("--tls-cert", metavar="PATH", default=None, help="serve HTTPS with this PEM chain")
    parser.add_argument("--tls-key", metavar="PATH", default=None, help="the PEM private key of --tls-cert")
    parser.set_defaults(handler=_serve)


def _base_model(args: argparse.Namespace) -> tuple[str, str]:
    """``(name, source)`` of the served base model."""
    from tensafe.package import inspect

    if args.base_model:
        name, _, source = args.base_model.partition("=")
        if not name:
            from tensafe.serving import InvalidGenerationRequestError

            raise InvalidGenerationRequestError("--base-model must look like NAME or NAME=SOURCE")
        return name, source or name
    name = inspect(args.package[0]).base_model_id
    return name, name


def _read_policy(path: str) -> str:
    """The Rego source of ``--policy`` (compiled by the admission, which fails on a bad one)."""
    from tensafe.policy import MAX_POLICY_BYTES, PolicyLoadError

    try:
        with open(path, "rb") as fh:
            data = fh.read(MAX_POLICY_BYTES + 1)
    except OSError as exc:
        raise PolicyLoadError(f"--policy {path}: cannot read the file ({exc.strerror or exc})") from None
    if len(data) > MAX_POLICY_BYTES:
        raise PolicyLoadError(f"--policy {path}: larger than {MAX_POLICY_BYTES} bytes")
    try:
        return data.decode("utf-8")
    except UnicodeDecodeError:
        raise PolicyLoadError(f"--policy {path}: not UTF-8 text") from None


def _open_database(tenant: str) -> tuple[Any, Any]:
    """The engine and session factory of ``DATABASE_URL``; the schema is current and the tenant live."""
    from tensafe.cli._database import prepare_embedded_database
    from tensafe.db import (
        Tenant,
        create_engine_from_url,
        current_revision,
        get_database_url,
        head_revision,
        make_session_factory,
        safe_url,
    )
    from tensafe.errors import ConfigurationError

    url = get_database_url()
    prepare_embedded_database(url)
    current, head = current_revision(url), head_revision()
    if current != head:
        raise ConfigurationError(
            f"{safe_url(url)} is at schema {current or '(none)'}, not {head}: run 'tensafe db upgrade' first"
        )
    engine = create_engine_from_url(url)
    sessions = make_session_factory(engine)
    with sessions() as session:
        row = session.get(Tenant, tenant)
        if row is None or row.deleted_at is not None:
            engine.dispose()
            raise ConfigurationError(
                f"unknown tenant {tenant!r} in {safe_url(url)}: create it with 'tensafe admin create-tenant'"
            )
    return engine, sessions


def _engine_starter(args: argparse.Namespace, name: str, source: str, max_resident: int) -> Any:
    async def start() -> Any:
        if args.engine == "vllm":
            from tensafe.serving.engines.vllm import VllmEngine

            return await VllmEngine.start(
                source,
                vllm_python=args.vllm_python,
                max_loras=min(max_resident, 16),
                max_lora_rank=args.max_lora_rank,
                max_num_seqs=args.max_num_seqs,
                max_model_len=args.max_model_len,
                max_resident_adapters=max_resident,
                model_name=name,
                aliases=(source,),
            )
        from tensafe.serving.engines.transformers import TransformersEngine

        return await TransformersEngine.start(
            source,
            model_name=name,
            aliases=(source,),
            max_loras=min(max_resident, 16),
            max_lora_rank=args.max_lora_rank,
            max_num_seqs=args.max_num_seqs,
            max_model_len=args.max_model_len,
        )

    return start


def _serve(args: argparse.Namespace) -> int:
    import asyncio

    from tensafe.audit import AuditLog
    from tensafe.cli._audit_signing import deployment_audit_signer
    from tensafe.cli.server import tls_server_context
    from tensafe.cli.tssp import _passphrase, _recipient_private, _state, _verifying_key
    from tensafe.config import serve_max_resident_adapters
    from tensafe.errors import ConfigurationError
    from tensafe.serving.packages import PackageAdmission
    from tensafe.serving.standalone import SERVICE_ACTOR, AdminToken, StandaloneServer, run_standalone
    from tensafe.training.models import resolve_model

    if not 0 < args.port < 65536:
        raise ConfigurationError("--port must be between 1 and 65535")
    if args.threshold < 1:
        raise ConfigurationError("--threshold must be at least 1")
    if args.recheck_seconds <= 0:
        raise ConfigurationError("--recheck-seconds must be positive")
    if (args.tls_cert is None) != (args.tls_key is None):
        raise ConfigurationError("--tls-cert and --tls-key go together: give both, or neither")
    tls = None if args.tls_cert is None else tls_server_context(args.tls_cert, args.tls_key)
    admin_token = None if args.admin_token_file is None else AdminToken.from_file(args.admin_token_file)
    trust = [_verifying_key(p) for p in args.trust]
    recipient = _recipient_private(args.recipient_key, _passphrase(args))
    policy = None if args.policy is None else _read_policy(args.policy)
    max_resident = serve_max_resident_adapters()
    name, source = _base_model(args)
    db_engine, sessions = _open_database(args.tenant)
    try:
        signer, every = deployment_audit_signer(db_engine, actor=SERVICE_ACTOR)
        audit_log = AuditLog(sessions, signer=signer, checkpoint_every=every)
        spec = resolve_model(source)
        admission = PackageAdmission(
            trust=trust,
            recipient_key=recipient,
            policy=policy,
            policy_origin=str(args.policy),
            threshold=args.threshold,
            state=_state(args),
            audit=None,
            base_model=name,
            base_model_sha256=spec.revision,
        )
        if tls is None and args.host not in _LOOPBACK:
            print(
                f"tensafe: warning: listening on {args.host} over plain HTTP: API keys and prompts cross the "
                "network in the clear; give --tls-cert and --tls-key",
                file=sys.stderr,
            )

        async def main() -> None:
            server = await StandaloneServer.start(
                tenant=args.tenant,
                start_engine=_engine_starter(args, name, source, max_resident),
                admission=admission,
                packages=args.package,
                audit_log=audit_log,
                sessions=sessions,
                admin_token=admin_token,
                max_resident=max_resident,
                recheck_seconds=args.recheck_seconds,
                revocation_list=args.revocation_list,
            )
            scheme = "https" if tls is not None else "http"
            host = f"[{args.host}]" if ":" in args.host else args.host

            def started() -> None:
                for package in server.source.packages():
                    print(
                        f"tensafe serve: {package.name} ({package.model}) on {name}, expires "
                        f"{package.info.manifest['expires']}",
                        file=sys.stderr,
                    )
                print(
                    f"tensafe serve: listening on {scheme}://{host}:{args.port}/v1",
                    file=sys.stderr,
                    flush=True,
                )

            await run_standalone(server, host=args.host, port=args.port, ssl_context=tls, started=started)

        asyncio.run(main())
    finally:
        db_engine.dispose()
    return 0
