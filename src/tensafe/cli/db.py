"""``tensafe db``: database migrations."""

from __future__ import annotations

import argparse

__all__ = ["register"]


def register(subparsers: argparse._SubParsersAction) -> None:  # type: ignore[type-arg]
    """Add the ``db`` command group."""
    parser = subparsers.add_parser("db", help="database schema: upgrade, current revision")
    commands = parser.add_subparsers(dest="db_command", metavar="SUBCOMMAND", required=True)

    upgrade = commands.add_parser("upgrade", help="apply the packaged migrations (default: to the newest)")
    _add_url(upgrade)
    upgrade.add_argument("--revision", default="head", help="target revision id (default: head)")
    upgrade.set_defaults(handler=_upgrade)

    current = commands.add_parser("current", help="print the database's revision and the newest one")
    _add_url(current)
    current.set_defaults(handler=_current)


def _add_url(parser: argparse.ArgumentParser) -> None:
    parser.add_argument(
        "--database-url",
        metavar="URL",
        default=None,
        help="database URL (default: $DATABASE_URL, else sqlite:///./tensafe.db)",
    )


def _upgrade(args: argparse.Namespace) -> int:
    from tensafe.db import get_database_url, safe_url, upgrade

    url = args.database_url or get_database_url()
    revision = upgrade(url, args.revision)
    print(f"{safe_url(url)}: at revision {revision}")
    return 0


def _current(args: argparse.Namespace) -> int:
    from tensafe.db import current_revision, get_database_url, head_revision, safe_url

    url = args.database_url or get_database_url()
    revision = current_revision(url)
    head = head_revision()
    state = "up to date" if revision == head else "needs `tensafe db upgrade`"
    print(f"{safe_url(url)}: revision {revision or '(none)'}; newest {head}; {state}")
    return 0
