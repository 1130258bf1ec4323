"""The deployment signing key for the DP certificates of ``tensafe train`` and ``tensafe demo``.

A certificate is worth what its signature is worth: ``tensafe privacy certificate PATH
--verify --public-key PUB`` accepts only a certificate signed by the deployment's key. The
training commands therefore open the same key as the API server, through
:meth:`tensafe.keys.KeyManager.from_environment` (``TS_*`` settings and ``DATABASE_URL``;
docs/security/keys.md). On a new machine the embedded defaults apply: SQLite at
``sqlite:///./tensafe.db`` and, in development, a local KEK created under ``TS_DATA_DIR``.
The embedded default (a SQLite file in development mode) is migrated here, as by
``tensafe server`` and ``tensafe admin`` (:mod:`tensafe.cli._database`); any other database
must be migrated by its operator (``tensafe db upgrade``), and an unmigrated one fails closed.

When the key cannot be opened the command stops before training, with one line saying
what to configure; ``tensafe train --unsigned`` is the explicit, loudly reported way to
train without a signature.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

from tensafe.errors import ConfigurationError

if TYPE_CHECKING:
    from tensafe.crypto.signing import HybridSigningKey

__all__ = ["SigningUnavailableError", "deployment_certificate_signer"]


class SigningUnavailableError(ConfigurationError):
    """The deployment signing key cannot be opened, so a certificate could not be signed."""


def deployment_certificate_signer(*, actor: str, unsigned_flag: str | None = None) -> HybridSigningKey:
    """Open the deployment signing key, or fail closed.

    Args:
        actor: Who the key manager's audit records name (e.g. ``cli:train``), should it
            create the key.
        unsigned_flag: The command's flag for an unsigned run, named in the error (if any).

    Raises:
        SigningUnavailableError: The key manager cannot be opened or cannot produce the key
            (one line: the cause, and what to do).
    """
    from sqlalchemy.exc import SQLAlchemyError

    from tensafe.cli._database import prepare_embedded_database
    from tensafe.db import get_database_url
    from tensafe.errors import TenSafeError
    from tensafe.keys import KeyManager, KeySettings

    try:
        settings = KeySettings.from_environment()
        prepare_embedded_database(settings.get("DATABASE_URL") or get_database_url())
        manager = KeyManager.from_environment(actor=actor)
        try:
            return manager.deployment_signing_key()
        finally:
            manager.close()
    except (TenSafeError, SQLAlchemyError) as exc:
        orig = getattr(exc, "orig", None) if isinstance(exc, SQLAlchemyError) else None
        cause = orig if orig is not None else exc
        first = (str(cause).strip().splitlines() or [type(exc).__name__])[0]
        fallback = (
            f", or pass {unsigned_flag} to write a certificate nobody can verify" if unsigned_flag else ""
        )
        raise SigningUnavailableError(
            f"the DP certificate must be signed with the deployment signing key, but the key manager "
            f"cannot be opened ({first}); configure the key settings as for the server (TS_KEK_PROVIDER, "
            f"DATABASE_URL; docs/security/keys.md) and run 'tensafe keys init'{fallback}"
        ) from None
