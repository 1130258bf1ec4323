"""The registered table of the training server's audit events.

Every record the server appends to a tenant's audit chain goes through
:meth:`tensafe.server.services.Services.audit`, which looks its ``action`` up in
:data:`SERVER_EVENTS` first: an action that is not registered raises
:class:`~tensafe.server.errors.UnregisteredEventError` and nothing is appended. The table
says, once per action, how severe the event is and whether what it records can be undone
(``recoverable``), as the key-custody table does (``tensafe.keys._audit.KEY_EVENTS``).
An id is never removed or given a new meaning; new ids may be added.

Unlike the key-custody events, the server's records keep the details they have always
had: severity and recoverability live in this table (and in ``docs/audit.md``, which a
test keeps equal to it), not in each record, so existing chains and verifiers see the
same records as before.

Each asynchronous operation (a *job type*, :class:`tensafe.server.jobs.Operation`) has
three events: ``api.<name>`` when a request is accepted, ``api.<name>.complete`` and
``api.<name>.failed`` when its future finishes. :func:`register_operation` registers
them; :class:`tensafe.server.jobs.OperationRegistry` calls it for every operation it is
given, so a new job type needs no edit here.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass
from types import MappingProxyType
from typing import Final, Literal

from tensafe.server.errors import UnregisteredEventError

__all__ = [
    "FIXED_EVENTS",
    "OPERATIONS",
    "SERVER_EVENTS",
    "ServerEventSpec",
    "Severity",
    "event_spec",
    "operation_events",
    "register_event",
    "register_operation",
]

Severity = Literal["info", "warning", "error", "critical"]


@dataclass(frozen=True)
class ServerEventSpec:
    """The fixed severity and recoverability of one server audit action."""

    severity: Severity
    recoverable: bool
    description: str


#: The asynchronous operations this server version implements (``ComputeOps.registry()``).
OPERATIONS: Final = (
    "create_model",
    "load_weights",
    "forward_backward",
    "forward",
    "optim_step",
    "save_weights",
    "save_weights_for_sampler",
    "save_weights_external",
    "sample",
    "register_dataset",
    "train_step",
)

#: The events that belong to no operation (``docs/audit.md`` lists them in one table).
_FIXED: dict[str, ServerEventSpec] = {
    "api.create_session": ServerEventSpec("info", True, "a client opened a session"),
    "api.finish_session": ServerEventSpec("info", True, "a client closed its session"),
    "api.create_sampling_session": ServerEventSpec(
        "info", True, "a sampling session was opened on a base model or on sampler weights"
    ),
    "api.delete_checkpoint": ServerEventSpec(
        "warning", False, "a checkpoint and its encrypted files were deleted by the tenant"
    ),
    "api.external_weights_urls": ServerEventSpec(
        "warning", True, "short-lived bearer download URLs were issued for an exported adapter"
    ),
    "api.download": ServerEventSpec("warning", True, "an exported file was downloaded with a token"),
    "api.publish_checkpoint": ServerEventSpec("warning", True, "a checkpoint was marked public"),
    "api.unpublish_checkpoint": ServerEventSpec("info", True, "a checkpoint's public flag was cleared"),
    "api.set_checkpoint_ttl": ServerEventSpec("info", True, "a checkpoint's expiry was set or cleared"),
    "system.checkpoint_expired": ServerEventSpec(
        "info", False, "the expiry sweeper deleted a checkpoint whose TTL had passed"
    ),
    "system.results_expired": ServerEventSpec(
        "info", False, "the retention sweep deleted the results of futures past the result TTL"
    ),
    "privacy.step_charged": ServerEventSpec(
        "info", False, "a DP-SGD step was charged to a privacy ledger before it ran"
    ),
    "api.external_weights_upload_start": ServerEventSpec(
        "info", True, "an upload of LoRA weights trained elsewhere was started"
    ),
    "api.external_weights_upload_file": ServerEventSpec(
        "info", True, "a file of an external weights upload was received"
    ),
    "api.external_weights_upload_finish": ServerEventSpec(
        "warning", True, "uploaded LoRA weights were verified and stored as a non-private checkpoint"
    ),
    "api.external_weights_upload_refused": ServerEventSpec(
        "warning", True, "an external weights upload or one of its files was refused"
    ),
}

#: The events that belong to no operation, read-only.
FIXED_EVENTS: Final[Mapping[str, ServerEventSpec]] = MappingProxyType(_FIXED)

_EVENTS: dict[str, ServerEventSpec] = dict(_FIXED)

#: Every server audit action, read-only (add with :func:`register_event`).
SERVER_EVENTS: Final[Mapping[str, ServerEventSpec]] = MappingProxyType(_EVENTS)


def operation_events(name: str) -> dict[str, ServerEventSpec]:
    """The three events of the operation ``name``: accepted, complete and failed."""
    return {
        f"api.{name}": ServerEventSpec("info", True, f"a {name} request was accepted"),
        f"api.{name}.complete": ServerEventSpec("info", True, f"a {name} request completed"),
        f"api.{name}.failed": ServerEventSpec(
            "warning", True, f"a {name} request failed (the client may submit it again)"
        ),
    }


def register_event(action: str, spec: ServerEventSpec) -> None:
    """Add ``action`` to :data:`SERVER_EVENTS`.

    Registering the same action again with the same spec is a no-op.

    Raises:
        ValueError: ``action`` is registered with another spec (an id never changes meaning).
    """
    known = _EVENTS.get(action)
    if known is not None and known != spec:
        raise ValueError(f"audit action {action!r} is already registered as {known}")
    _EVENTS[action] = spec


def register_operation(name: str) -> None:
    """Register the events of the operation ``name`` (see :func:`operation_events`)."""
    for action, spec in operation_events(name).items():
        register_event(action, spec)


def event_spec(action: str) -> ServerEventSpec:
    """The registered spec of ``action``.

    Raises:
        UnregisteredEventError: ``action`` is not registered.
    """
    spec = _EVENTS.get(action)
    if spec is None:
        raise UnregisteredEventError(
            f"audit action {action!r} is not registered in tensafe.server.events.SERVER_EVENTS; "
            "register it (with its severity and recoverability) before appending it"
        )
    return spec


for _name in OPERATIONS:
    register_operation(_name)
