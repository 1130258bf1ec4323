"""What the server's routes and jobs share: database sessions, the encrypted store, the audit signer.

:class:`Services` is built once per application by :func:`tensafe.server.app.create_app`
and passed to the worker and every job; routers reach it through the ``Svc`` dependency
(:mod:`tensafe.server.deps`). This module imports no router and no job module, so every
layer can depend on it without an import cycle.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any

from sqlalchemy.orm import Session, sessionmaker

from tensafe.audit import append_record
from tensafe.audit.signer import CheckpointSigner
from tensafe.db import make_read_session_factory
from tensafe.server.events import event_spec
from tensafe.server.settings import DEFAULT_RESULT_TTL_SECONDS, ModelCatalog
from tensafe.storage import EncryptedArtifactStore

__all__ = ["Services"]


@dataclass(frozen=True)
class Services:
    """What API handlers and job handlers share."""

    sessions: sessionmaker[Session]
    store: EncryptedArtifactStore
    signer: CheckpointSigner | None
    checkpoint_every: int | None
    catalog: ModelCatalog = field(default_factory=ModelCatalog)
    #: Read-only sessions (on SQLite they never wait for the write lock); default: on
    #: the engine of ``sessions``.
    reads: sessionmaker[Session] = field(default=None)  # type: ignore[arg-type]
    #: How long a finished future's result is kept before the sweeper deletes it (seconds;
    #: :mod:`tensafe.server.retention`).
    result_ttl_seconds: float = DEFAULT_RESULT_TTL_SECONDS

    def __post_init__(self) -> None:
        """Derive the read-only session factory from ``sessions`` when none is given."""
        if self.reads is None:
            object.__setattr__(self, "reads", make_read_session_factory(self.sessions.kw["bind"]))

    def audit(
        self,
        session: Session,
        *,
        tenant: str,
        actor: str,
        action: str,
        resource: str = "",
        details: Mapping[str, Any] | None = None,
    ) -> None:
        """Append an audit record inside ``session``'s transaction.

        Raises:
            UnregisteredEventError: ``action`` is not in
                :data:`tensafe.server.events.SERVER_EVENTS` (nothing is appended).
        """
        event_spec(action)
        append_record(
            session,
            tenant=tenant,
            actor=actor,
            action=action,
            resource=resource,
            details=details,
            signer=self.signer,
            checkpoint_every=self.checkpoint_every,
        )
