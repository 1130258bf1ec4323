"""The states of a future and of a training model, and the moves between them.

The database stores each state as its string value (``futures.state``,
``training_models.state``; unchanged since migration ``0003_server``). Code never writes a
state literal: it names a member and moves a row with :func:`transition`, which refuses a
move its table does not list with :class:`~tensafe.server.errors.IllegalTransitionError`.

Futures (:data:`FUTURE_TRANSITIONS`)::

    queued -> running                    a worker claims it
    running -> complete | failed         its job finished
    running -> queued                    crash recovery re-queues an idempotent job

``complete`` and ``failed`` are terminal: a finished future is never run again (a
re-submission of its ``(model_id, seq_id)`` returns it as it is).

Training models (:data:`MODEL_TRANSITIONS`)::

    creating -> ready | failed           create_model / create-via-load_weights finished
    ready -> ready                       a reload (load_weights into the model) succeeded
    failed -> failed                     a late failure of its creation is recorded again
    uploaded                             (terminal) the run of an uploaded adapter, created in this
                                         state by ``external_weights_upload_finish``

A ``failed`` model never becomes ``ready``, and a ``ready`` one never ``failed``: a
request to a failed model is refused before it is queued.
"""

from __future__ import annotations

import enum
from collections.abc import Mapping
from typing import Final, TypeVar

from tensafe.server.errors import IllegalTransitionError

__all__ = [
    "FUTURE_TRANSITIONS",
    "MODEL_TRANSITIONS",
    "FutureState",
    "ModelState",
    "transition",
]


class FutureState(enum.StrEnum):
    """The state of a durable future (``futures.state``)."""

    QUEUED = "queued"
    RUNNING = "running"
    COMPLETE = "complete"
    FAILED = "failed"


class ModelState(enum.StrEnum):
    """The state of a training model (``training_models.state``)."""

    CREATING = "creating"
    READY = "ready"
    FAILED = "failed"
    UPLOADED = "uploaded"


#: The legal moves of a future: state -> the states it may move to.
FUTURE_TRANSITIONS: Final[Mapping[FutureState, frozenset[FutureState]]] = {
    FutureState.QUEUED: frozenset({FutureState.RUNNING}),
    FutureState.RUNNING: frozenset({FutureState.COMPLETE, FutureState.FAILED, FutureState.QUEUED}),
    FutureState.COMPLETE: frozenset(),
    FutureState.FAILED: frozenset(),
}

#: The legal moves of a training model: state -> the states it may move to.
MODEL_TRANSITIONS: Final[Mapping[ModelState, frozenset[ModelState]]] = {
    ModelState.CREATING: frozenset({ModelState.READY, ModelState.FAILED}),
    ModelState.READY: frozenset({ModelState.READY}),
    ModelState.FAILED: frozenset({ModelState.FAILED}),
    ModelState.UPLOADED: frozenset(),
}

S = TypeVar("S", FutureState, ModelState)


def transition(current: S | str, target: S) -> S:
    """Check the move from ``current`` (a member, or the string a row holds) to ``target``.

    Returns:
        ``target``, to assign to the row or to use in an ``UPDATE ... WHERE state = current``.

    Raises:
        IllegalTransitionError: The table of ``target``'s type does not list the move, or
            ``current`` is not a state of that type.
    """
    kind = type(target)
    table: Mapping[S, frozenset[S]] = FUTURE_TRANSITIONS if kind is FutureState else MODEL_TRANSITIONS  # type: ignore[assignment]
    try:
        source = kind(current)
    except ValueError:
        raise IllegalTransitionError(f"{current!r} is not a {kind.__name__}") from None
    if target not in table[source]:
        raise IllegalTransitionError(
            f"a {kind.__name__} cannot move from {source.value!r} to {target.value!r}"
        )
    return target
