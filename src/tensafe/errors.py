"""Root of TenSafe's exception trees.

Every domain (privacy, training, crypto, keys, store, audit, package, ...) defines one
small, flat tree of its own rooted at a single class that derives from
:class:`TenSafeError`. The CLI prints any :class:`TenSafeError` as one line and exits
non-zero; anything else is a bug and shows a traceback.

Messages MUST NOT contain secrets (key material, passphrases, API keys, raw training
records). They SHOULD say what to do next.
"""

from __future__ import annotations

__all__ = ["ConfigurationError", "TenSafeError"]


class TenSafeError(Exception):
    """Base class of every error TenSafe raises on purpose."""

    #: Process exit status the CLI uses for this error.
    exit_code: int = 1


class ConfigurationError(TenSafeError, ValueError):
    """The configuration (file, environment variable or flag) is missing or invalid."""

    exit_code = 2
