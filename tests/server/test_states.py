"""The state tables of futures and training models (``tensafe.server.states``).

The legal moves are written out here a second time, as ``docs/server.md`` lists them, and
``transition`` is checked against that list for every pair of states (Hypothesis, and the
whole product). The HTTP test drives a failed model and a finished future through the API:
no route moves either to another state.
"""

from __future__ import annotations

import itertools
from typing import Any

import pytest
from hypothesis import given
from hypothesis import strategies as st
from sqlalchemy import select

from server.conftest import LiveServer, ServerEnv
from tensafe.server.errors import IllegalTransitionError
from tensafe.server.models import FutureRow, TrainingModel
from tensafe.server.states import FutureState, ModelState, transition

#: The documented moves (docs/server.md, "Durable futures" and "Model states").
LEGAL_FUTURE_MOVES = {
    ("queued", "running"),
    ("running", "complete"),
    ("running", "failed"),
    ("running", "queued"),
}
LEGAL_MODEL_MOVES = {("creating", "ready"), ("creating", "failed"), ("ready", "ready"), ("failed", "failed")}


def test_the_database_strings_are_unchanged() -> None:
    assert [s.value for s in FutureState] == ["queued", "running", "complete", "failed"]
    assert [s.value for s in ModelState] == ["creating", "ready", "failed", "uploaded"]


@given(current=st.sampled_from(list(FutureState)), target=st.sampled_from(list(FutureState)))
def test_every_future_move_is_checked(current: FutureState, target: FutureState) -> None:
    if (current.value, target.value) in LEGAL_FUTURE_MOVES:
        assert transition(current, target) is target
        assert transition(current.value, target) is target  # the plain string a row holds
    else:
        with pytest.raises(IllegalTransitionError, match="cannot move"):
            transition(current, target)


@given(current=st.sampled_from(list(ModelState)), target=st.sampled_from(list(ModelState)))
def test_every_model_move_is_checked(current: ModelState, target: ModelState) -> None:
    if (current.value, target.value) in LEGAL_MODEL_MOVES:
        assert transition(current.value, target) is target
    else:
        with pytest.raises(IllegalTransitionError, match="cannot move"):
            transition(current, target)


def test_the_whole_product_matches_the_documented_moves() -> None:
    for kind, legal in ((FutureState, LEGAL_FUTURE_MOVES), (ModelState, LEGAL_MODEL_MOVES)):
        accepted = set()
        for a, b in itertools.product(list(kind), repeat=2):
            try:
                transition(a, b)
            except IllegalTransitionError:
                continue
            accepted.add((a.value, b.value))
        assert accepted == legal


@pytest.mark.parametrize("current", ["done", "", "READY", "uploaded "])
def test_an_unknown_current_state_is_refused(current: str) -> None:
    with pytest.raises(IllegalTransitionError, match="is not a"):
        transition(current, ModelState.READY)
    with pytest.raises(IllegalTransitionError):
        transition(current, FutureState.RUNNING)


def test_a_route_cannot_revive_a_failed_model_or_rerun_a_finished_future(
    live_server: LiveServer, server_env: ServerEnv
) -> None:
    """A failed model refuses every request (400) and stays failed; re-submitting the
    ``(model_id, seq_id)`` of a finished future returns it unchanged, never re-queued."""
    from server.test_api import _client, _create_model, _result, _session

    with _client(live_server, server_env.tenant_key("acme")) as c:
        sid = _session(c)
        created = _create_model(c, sid)
        assert created.status_code == 200, created.text
        model_id, request_id = created.json()["model_id"], created.json()["request_id"]
        assert _result(c, request_id).status_code == 200
        with server_env.sessions() as s:
            done = s.get(FutureRow, request_id)
            assert done is not None and done.state == FutureState.COMPLETE
        again = _create_model(c, sid)  # same (model_id, seq_id 0): the same, finished future
        assert again.json()["request_id"] == request_id
        with server_env.sessions() as s:
            assert (
                s.execute(select(FutureRow.state).where(FutureRow.id == request_id)).scalar_one()
                == "complete"
            )

        with server_env.sessions.begin() as s:  # the model's creation failed
            row = s.get(TrainingModel, model_id)
            assert row is not None
            row.state, row.error = ModelState.FAILED, "the base model could not be loaded"
        body: dict[str, Any] = {"model_id": model_id, "seq_id": 1, "adam_params": {"learning_rate": 1e-3}}
        for path, payload in (
            ("/optim_step", body),
            ("/save_weights", {"model_id": model_id, "seq_id": 1, "path": "x"}),
            ("/get_info", {"model_id": model_id}),
        ):
            refused = c.post(path, json=payload)
            assert refused.status_code == 400, (path, refused.text)
            assert "could not be created" in refused.json()["detail"]
        with server_env.sessions() as s:
            row = s.get(TrainingModel, model_id)
            assert row is not None and row.state == "failed"
            queued = s.execute(
                select(FutureRow.id).where(FutureRow.model_id == model_id, FutureRow.seq_id == 1)
            )
            assert queued.first() is None
