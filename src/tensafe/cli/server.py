"""``tensafe server``: run the Tinker-compatible training API server.

On the embedded default (a SQLite file in development mode) the schema is created or
upgraded on start (:mod:`tensafe.cli._database`); any other database must be at the newest
revision already (``tensafe db upgrade``), or the command refuses to start.

With ``--tls-cert PATH --tls-key PATH`` the server terminates TLS itself: uvicorn serves
HTTPS with an :class:`ssl.SSLContext` whose minimum version is TLS 1.3 (clients offering
only TLS 1.2 or older fail the handshake). The context is built here, so that unreadable or
mismatched files stop the command with one line before anything listens, and handed to
uvicorn through its ``ssl_context_factory`` hook (its file-path options cannot set a
minimum version).
"""

from __future__ import annotations

import argparse
import ssl
from pathlib import Path

from tensafe.errors import ConfigurationError

__all__ = ["register", "tls_server_context"]

_LOOPBACK = ("127.0.0.1", "::1", "localhost")


def register(subparsers: argparse._SubParsersAction) -> None:  # type: ignore[type-arg]
    """Add the ``server`` command."""
    parser = subparsers.add_parser(
        "server",
        help="run the training API server (Tinker-compatible; DATABASE_URL, TS_DATA_DIR, TS_SERVER_MODELS)",
    )
    parser.add_argument("--host", default="127.0.0.1", help="address to listen on (default 127.0.0.1)")
    parser.add_argument("--port", type=int, default=8000, help="TCP port (default 8000)")
    parser.add_argument(
        "--no-worker", action="store_true", help="serve the API only; run no job worker in this process"
    )
    parser.add_argument(
        "--tls-cert",
        metavar="PATH",
        default=None,
        help="serve HTTPS (TLS 1.3 minimum) with this PEM certificate chain; needs --tls-key",
    )
    parser.add_argument(
        "--tls-key", metavar="PATH", default=None, help="the PEM private key of --tls-cert (unencrypted)"
    )
    parser.set_defaults(handler=_serve)


def tls_server_context(cert: str | Path, key: str | Path) -> ssl.SSLContext:
    """Build the server's TLS context: TLS 1.3 minimum, the certificate chain and its key.

    Args:
        cert: PEM file with the server certificate (then any intermediates).
        key: PEM file with the certificate's private key (not passphrase-protected).

    Raises:
        ConfigurationError: A file cannot be read, is not PEM, or the key does not match
            the certificate (one line; the message names the file, never its content).
    """
    for flag, path in (("--tls-cert", cert), ("--tls-key", key)):
        try:
            with open(path, "rb") as fh:
                fh.read(1)
        except OSError as exc:
            raise ConfigurationError(f"{flag} {path}: cannot read the file ({exc.strerror or exc})") from None
    context = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
    context.minimum_version = ssl.TLSVersion.TLSv1_3
    try:
        context.load_cert_chain(certfile=str(cert), keyfile=str(key), password=_no_password)
    except (ssl.SSLError, ValueError, TypeError, OSError) as exc:
        raise ConfigurationError(
            f"--tls-cert {cert} / --tls-key {key}: not a PEM certificate chain and its matching, "
            f"unencrypted private key ({type(exc).__name__}: {_first_line(exc)})"
        ) from None
    return context


def _no_password() -> bytes:
    # An encrypted key would otherwise make OpenSSL prompt on the terminal.
    raise ValueError("the private key is encrypted; give an unencrypted key file (mode 0600)")


def _first_line(exc: BaseException) -> str:
    text = str(exc).strip().splitlines()
    return text[0][:200] if text else ""


def _serve(args: argparse.Namespace) -> int:
    import dataclasses
    import logging

    import uvicorn

    from tensafe.cli._database import prepare_embedded_database
    from tensafe.db import current_revision, head_revision, safe_url
    from tensafe.server import ServerConfigurationError, ServerSettings, create_app

    if not 0 < args.port < 65536:
        raise ServerConfigurationError("--port must be between 1 and 65535")
    if (args.tls_cert is None) != (args.tls_key is None):
        raise ServerConfigurationError("--tls-cert and --tls-key go together: give both, or neither")
    tls = None if args.tls_cert is None else tls_server_context(args.tls_cert, args.tls_key)
    settings = ServerSettings.from_environment()
    if args.no_worker:
        settings = dataclasses.replace(settings, run_worker=False)
    prepare_embedded_database(settings.database_url)
    current, head = current_revision(settings.database_url), head_revision()
    if current != head:
        raise ServerConfigurationError(
            f"{safe_url(settings.database_url)} is at schema {current or '(none)'}, not {head}: "
            "run 'tensafe db upgrade' first"
        )
    if tls is None and args.host not in _LOOPBACK:
        logging.getLogger("tensafe.server").warning(
            "listening on %s over plain HTTP: API keys cross the network in the clear; give "
            "--tls-cert and --tls-key, or put a TLS-terminating proxy in front",
            args.host,
        )
    app = create_app(settings)
    if tls is None:
        uvicorn.run(app, host=args.host, port=args.port, log_level="info")
    else:
        context = tls
        uvicorn.run(
            app,
            host=args.host,
            port=args.port,
            log_level="info",
            ssl_context_factory=lambda _config, _default: context,
        )
    return 0
