"""``tensafe server``: run the Tinker-compatible training API server."""

from __future__ import annotations

import argparse

__all__ = ["register"]


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
    parser.set_defaults(handler=_serve)


def _serve(args: argparse.Namespace) -> int:
    import dataclasses
    import logging

    import uvicorn

    from tensafe.db import current_revision, head_revision, safe_url
    from tensafe.server import ServerConfigurationError, ServerSettings, create_app

    if not 0 < args.port < 65536:
        raise ServerConfigurationError("--port must be between 1 and 65535")
    settings = ServerSettings.from_environment()
    if args.no_worker:
        settings = dataclasses.replace(settings, run_worker=False)
    current, head = current_revision(settings.database_url), head_revision()
    if current != head:
        raise ServerConfigurationError(
            f"{safe_url(settings.database_url)} is at schema {current or '(none)'}, not {head}: "
            "run 'tensafe db upgrade' first"
        )
    if args.host not in ("127.0.0.1", "::1", "localhost"):
        logging.getLogger("tensafe.server").warning(
            "listening on %s over plain HTTP: API keys cross the network in the clear unless a "
            "TLS-terminating proxy sits in front",
            args.host,
        )
    app = create_app(settings)
    uvicorn.run(app, host=args.host, port=args.port, log_level="info")
    return 0
