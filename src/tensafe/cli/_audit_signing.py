"""The deployment's checkpoint signer and interval, for CLI commands that append to the audit log.

Every appender of a deployment signs checkpoints with the deployment signing key at the
deployment's interval, so that the chains keep the interval rule verification enforces
(docs/audit.md, "The checkpoint interval"). The API server gets both from its settings;
``tensafe admin``, ``tensafe tssp ... --audit-db`` and ``tensafe audit head`` get them
here: the key from :meth:`tensafe.keys.KeyManager.from_environment` (the same ``TS_*``
settings as the server), the interval from ``TS_AUDIT_CHECKPOINT_EVERY``.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from sqlalchemy import Engine

    from tensafe.audit import CheckpointSigner

__all__ = ["deployment_audit_signer"]


def deployment_audit_signer(engine: Engine, *, actor: str) -> tuple[CheckpointSigner, int]:
    """Return the deployment signing key and the checkpoint interval, or fail closed.

    Args:
        engine: The deployment database (the key manager keeps the sealed key there).
        actor: Who the key manager's own audit records name (e.g. ``admin:cli``).

    Raises:
        AuditError: The interval is malformed, or the key manager cannot be opened or
            cannot produce the key (one line saying what to configure).
    """
    from sqlalchemy.exc import SQLAlchemyError

    from tensafe.audit import AuditError, checkpoint_every_from_environment
    from tensafe.errors import TenSafeError
    from tensafe.keys import KeyManager

    every = checkpoint_every_from_environment()
    try:
        manager = KeyManager.from_environment(engine=engine, actor=actor)
        try:
            signer = manager.deployment_signing_key()
        finally:
            manager.close()
    except (TenSafeError, SQLAlchemyError) as exc:
        first = (str(exc).strip().splitlines() or [type(exc).__name__])[0]
        raise AuditError(
            f"the audit log must be signed with the deployment signing key, but the key manager "
            f"cannot be opened ({first}); configure TS_KEK_PROVIDER and the key settings as for the "
            "server (docs/security/keys.md)"
        ) from None
    return signer, every
