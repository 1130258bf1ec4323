"""The asynchronous operations the worker executes (today: ``create_model``).

Compute operations (``forward_backward``, ``optim_step``, ``save_weights`` ...) are
registered here once the training runtime (:mod:`tensafe.training.runtime`) exposes
them; see ``docs/server.md`` for the status of each Tinker endpoint.
"""

from __future__ import annotations

from sqlalchemy.orm import Session

from tensafe.db import utcnow
from tensafe.server.jobs import JobContext, JobFailedError, JobResult, Operation, OperationRegistry
from tensafe.server.models import TrainingModel

__all__ = ["default_registry"]


def _create_model(ctx: JobContext) -> JobResult:
    """Check that the base model is available (preparing a registered one once)."""
    base_model = str(ctx.payload.get("base_model", ""))
    entry = ctx.services.catalog.get(base_model)
    directory = entry.directory()
    if not (directory / "config.json").is_file():
        raise JobFailedError(
            f"base model {base_model!r} has no config.json on this server", category="server"
        )
    model_id = ctx.model_id
    assert model_id is not None

    def apply(session: Session) -> None:
        row = session.get(TrainingModel, model_id)
        if row is not None:
            row.state, row.last_request_time = "ready", utcnow()

    return JobResult(
        json={"model_id": model_id, "type": "create_model"},
        apply=apply,
        details={"base_model": base_model},
    )


def _create_model_failed(session: Session, ctx: JobContext, message: str) -> None:
    if ctx.model_id is None:
        return
    row = session.get(TrainingModel, ctx.model_id)
    if row is not None:
        row.state, row.error = "failed", message[:4000]


def default_registry() -> OperationRegistry:
    """Return a registry with every operation this server version implements."""
    registry = OperationRegistry()
    registry.register(
        Operation(
            name="create_model", handler=_create_model, idempotent=True, on_failure=_create_model_failed
        )
    )
    return registry
