"""Command-line interface: ``tensafe <command> ...``.

Each command group lives in its own module exposing ``register(subparsers)``; heavy
imports (torch, database drivers) happen inside the handlers so ``tensafe --help`` and
the pure-maths commands stay fast.
"""

__all__: list[str] = []
