"""Entry point of the ``tensafe`` command."""

from __future__ import annotations

import argparse
import importlib
import logging
import sys
from collections.abc import Sequence

from tensafe._version import __version__
from tensafe.errors import TenSafeError

__all__ = ["build_parser", "main"]

#: Command-group modules under ``tensafe.cli``; each exposes ``register(subparsers)``.
#: A module listed here but not importable (an optional extra missing) is skipped so
#: the rest of the CLI keeps working; running its command then says what to install.
_COMMAND_MODULES: tuple[str, ...] = (
    "demo",
    "train",
    "server",
    "admin",
    "data",
    "privacy",
    "model",
    "keys",
    "audit",
    "db",
    "tssp",
    "serve",
    "chat",
)


def build_parser() -> argparse.ArgumentParser:
    """Build the full argument parser with every registered command group."""
    parser = argparse.ArgumentParser(
        prog="tensafe",
        description="TenSafe: private LoRA fine-tuning, key custody, audit and secure packaging.",
    )
    parser.add_argument("--version", action="version", version=f"tensafe {__version__}")
    parser.add_argument("-v", "--verbose", action="count", default=0, help="more log output (-vv: debug)")
    subparsers = parser.add_subparsers(dest="command", metavar="COMMAND")
    for name in _COMMAND_MODULES:
        try:
            module = importlib.import_module(f"tensafe.cli.{name}")
        except ModuleNotFoundError as exc:
            if exc.name is not None and exc.name.startswith("tensafe.cli."):
                continue
            raise
        module.register(subparsers)
    return parser


def _configure_logging(verbosity: int) -> None:
    level = logging.WARNING
    if verbosity == 1:
        level = logging.INFO
    elif verbosity >= 2:
        level = logging.DEBUG
    logging.basicConfig(level=level, format="%(levelname)s %(name)s: %(message)s")
    if verbosity == 0:
        # dp_accounting logs every RDP order it excludes (which can only raise ε): noise for users.
        logging.getLogger("absl").setLevel(logging.ERROR)
        import warnings

        warnings.filterwarnings("ignore", category=FutureWarning, module=r"transformers\..*")


def main(argv: Sequence[str] | None = None) -> int:
    """Run the CLI; returns the process exit status."""
    from tensafe.config import set_offline_defaults

    set_offline_defaults()  # before any Hugging Face import; library code passes local_files_only=True
    parser = build_parser()
    args = parser.parse_args(argv)
    _configure_logging(args.verbose)
    handler = getattr(args, "handler", None)
    if handler is None:
        parser.print_help()
        return 2
    try:
        result = handler(args)
    except TenSafeError as exc:
        print(f"tensafe: error: {exc}", file=sys.stderr)
        return exc.exit_code
    except KeyboardInterrupt:
        print("tensafe: interrupted", file=sys.stderr)
        return 130
    return int(result or 0)


if __name__ == "__main__":  # pragma: no cover
    sys.exit(main())
