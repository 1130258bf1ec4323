"""The registered table of server audit events (``tensafe.server.events``).

* Appending an action that is not registered raises and appends nothing.
* Every action string in the server's source, and every event of every operation the
  server implements, is registered (the source is read as text, not trusted to import).
* ``docs/audit.md`` lists exactly the registered table, with the same severity and
  recoverability.
"""

from __future__ import annotations

import pathlib
import re

import pytest
from sqlalchemy import func, select

from server.conftest import ServerEnv
from tensafe.audit.models import AuditRecordRow
from tensafe.server.errors import UnregisteredEventError
from tensafe.server.events import (
    FIXED_EVENTS,
    OPERATIONS,
    SERVER_EVENTS,
    ServerEventSpec,
    event_spec,
    operation_events,
    register_event,
)
from tensafe.server.services import Services

ROOT = pathlib.Path(__file__).resolve().parents[2]
SERVER = ROOT / "src" / "tensafe" / "server"
#: A dotted server action in the source: "api.x", "system.x_y", "privacy.x", ...
_ACTION = re.compile(r"""["']((?:api|system|privacy)\.[a-z_]+(?:\.[a-z_]+)*)["']""")
#: A request type the routes submit (each is an operation: api.<type>[.complete|.failed]).
_REQUEST_TYPE = re.compile(r"""request_type=["']([a-z_]+)["']""")


def _source() -> str:
    return "\n".join(path.read_text() for path in sorted(SERVER.rglob("*.py")))


def test_an_unregistered_action_is_refused_and_nothing_is_appended(server_env: ServerEnv) -> None:
    services = Services(
        sessions=server_env.sessions, store=server_env.store, signer=None, checkpoint_every=None
    )
    server_env.tenant_key("acme")
    with pytest.raises(UnregisteredEventError, match=r"api\.drop_tables"):
        with server_env.sessions.begin() as s:
            services.audit(s, tenant="acme", actor="apikey:x", action="api.drop_tables", resource="r")
    with server_env.sessions() as s:
        assert s.execute(select(func.count()).select_from(AuditRecordRow)).scalar_one() == 0
    with server_env.sessions.begin() as s:  # a registered one goes through
        services.audit(s, tenant="acme", actor="apikey:x", action="api.create_session", resource="sess-1")
    with server_env.sessions() as s:
        assert s.execute(select(AuditRecordRow.action)).scalars().all() == ["api.create_session"]


def test_every_action_in_the_source_is_registered() -> None:
    found = set(_ACTION.findall(_source()))
    assert {"api.create_session", "system.checkpoint_expired", "privacy.step_charged"} <= found
    unregistered = sorted(a for a in found if a not in SERVER_EVENTS)
    assert not unregistered, f"register these in tensafe.server.events: {unregistered}"


def test_every_operation_has_its_three_events() -> None:
    from tensafe.server.ops import ComputeOps

    names = set(ComputeOps().registry().names()) | set(_REQUEST_TYPE.findall(_source()))
    assert {"create_model", "forward_backward", "sample", "train_step"} <= names
    for name in names:
        for action in (f"api.{name}", f"api.{name}.complete", f"api.{name}.failed"):
            assert event_spec(action).severity in ("info", "warning", "error", "critical"), action


def test_an_id_never_changes_meaning() -> None:
    spec = SERVER_EVENTS["api.download"]
    register_event("api.download", spec)  # the same spec again: accepted
    with pytest.raises(ValueError, match="already registered"):
        register_event("api.download", ServerEventSpec("info", not spec.recoverable, spec.description))
    assert SERVER_EVENTS["api.download"] == spec


def test_docs_audit_md_lists_the_table() -> None:
    from tensafe.server.ops import ComputeOps

    text = (ROOT / "docs" / "audit.md").read_text()
    section = text.split("**Training API**", 1)[1].split("## Canonical JSON", 1)[0]
    rows = re.findall(r"^\| `([^`]+)` \| (\w+) \| (true|false) \|", section, flags=re.M)
    documented = {action: (severity, recoverable == "true") for action, severity, recoverable in rows}
    expected = {a: (s.severity, s.recoverable) for a, s in FIXED_EVENTS.items()}
    expected |= {a: (s.severity, s.recoverable) for a, s in operation_events("<operation>").items()}
    assert documented == expected
    listed = re.search(r"The operations: (.*?)\.\s", section, flags=re.S)
    assert listed is not None
    assert (
        set(re.findall(r"`([a-z_]+)`", listed.group(1)))
        == set(OPERATIONS)
        == set(ComputeOps().registry().names())
    )
