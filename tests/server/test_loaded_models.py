"""The worker's bounded table (:mod:`tensafe.server.cache`) under arbitrary load sequences.

Hypothesis drives random sequences of loads, uses and state changes by several tenants;
the test keeps its own record of when each entry was last used and checks each eviction
against the rules, not against a second implementation of them:

* no more than ``max_models`` entries, none of a tenant beyond ``max_per_tenant``;
* a tenant at its cap evicts only its own entries, so the other tenants keep theirs;
* a busy entry goes only when no idle one was left to take (in the scope of that step);
* an evicted idle entry was used less recently than every idle entry of its tenant that stays.
"""

from __future__ import annotations

from typing import Any

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from tensafe.server import ServerConfigurationError
from tensafe.server.cache import LoadedModels, check_caps, default_per_tenant_cap

TENANTS = ("a", "b", "c")
KEYS = tuple(f"m{i}" for i in range(9))


class Value:
    """A loaded session stand-in: ``busy`` plays a run with un-stepped gradients."""

    def __init__(self, key: str) -> None:
        self.key = key
        self.busy = False


#: Mostly loads (what evicts), with uses, state changes and removals in between.
operations = st.lists(
    st.tuples(
        st.sampled_from(("load", "load", "load", "load", "use", "busy", "pop")),
        st.sampled_from(TENANTS),
        st.sampled_from(KEYS),
        st.booleans(),  # a loaded entry starts busy (a run with un-stepped gradients) or idle
    ),
    max_size=60,
)
#: ``(max_models, max_per_tenant)`` with the per-tenant cap at most the global one.
caps = st.integers(min_value=1, max_value=6).flatmap(
    lambda n: st.tuples(st.just(n), st.integers(min_value=1, max_value=n))
)


@settings(max_examples=500, deadline=None)
@given(ops=operations, limits=caps)
def test_eviction_follows_the_rules(ops: list[tuple[str, str, str, bool]], limits: tuple[int, int]) -> None:
    max_models, per_tenant = limits
    table = LoadedModels(max_models=max_models, max_per_tenant=per_tenant, busy=lambda v: v.busy)
    owner: dict[str, str] = {}  # key -> tenant, for what is loaded
    values: dict[str, Value] = {}
    last_use: dict[str, int] = {}
    for clock, (op, tenant, key, busy_at_load) in enumerate(ops):
        if op == "use":
            if table.get(key, kind="training") is not None:
                last_use[key] = clock
            continue
        if op == "busy":
            if key in values:
                values[key].busy = not values[key].busy
            continue
        if op == "pop":
            value = table.pop(key, kind="training", tenant=tenant)
            if owner.get(key) == tenant:
                assert value is values[key]
                del owner[key], values[key], last_use[key]
            else:
                assert value is None  # another tenant's entry is never removed by this call
            continue
        if key in owner and owner[key] != tenant:
            continue  # ids are globally unique in the server: one key, one tenant
        before = dict(owner)
        snapshot = {k: (owner[k], values[k].busy, last_use[k]) for k in owner}
        at_cap = sum(1 for k, t in owner.items() if t == tenant and k != key) >= per_tenant
        value = Value(key)
        value.busy = busy_at_load
        removed = table.make_room(tenant=tenant, key=key)
        removed += table.put(key, value, tenant=tenant, kind="training")
        replaced = [e for e in removed if e.key == key]
        assert [e.value for e in replaced] == ([values[key]] if key in values else [])
        evicted = [e for e in removed if e.key != key]
        for e in evicted:
            assert e.busy == snapshot[e.key][1] and e.value is values[e.key]
            del owner[e.key], values[e.key], last_use[e.key]
        owner[key], values[key], last_use[key] = tenant, value, clock

        # The caps hold after every load, and the table agrees with the record.
        assert len(table) == len(owner) <= max_models
        for t in TENANTS:
            assert sum(1 for x in owner.values() if x == t) <= per_tenant
        assert {e.key: e.tenant for e in table.entries()} == owner
        assert table.entries()[-1].key == key  # the loaded entry is the most recently used
        # At its cap, a tenant evicts only its own entries.
        if at_cap:
            assert all(before[e.key] == tenant for e in evicted)
        survivors = {k: snapshot[k] for k in owner if k in snapshot and k != key}
        for e in evicted:
            e_tenant, busy, used = snapshot[e.key]
            if busy:
                # No idle entry that this step could have taken instead stayed ...
                idle = [
                    k for k, (t, b, _) in survivors.items() if not b and (t == tenant or e_tenant != tenant)
                ]
                assert not idle, (e, survivors)
                # ... and another tenant's busy entry goes only when the loader has none left.
                if e_tenant != tenant:
                    assert not [k for k, (t, _, _) in survivors.items() if t == tenant], (e, survivors)
            else:
                assert all(used < u for t, b, u in survivors.values() if not b and t == e_tenant)


def test_a_busy_entry_goes_last_and_the_loading_tenants_own_busy_one_first() -> None:
    table = LoadedModels(max_models=3, max_per_tenant=3, busy=lambda v: bool(v))
    assert not table.put("a1", True, tenant="a", kind="training")  # busy, least recently used
    assert not table.put("b1", True, tenant="b", kind="training")
    assert not table.put("b2", False, tenant="b", kind="sampling")
    # Full: the idle entry goes although two older ones exist.
    assert [e.key for e in table.make_room(tenant="b", key="b3")] == ["b2"]
    table.put("b3", True, tenant="b", kind="training")
    # Only busy entries: tenant b pays with its own (b1), not with a's older one.
    (gone,) = table.make_room(tenant="b", key="b4")
    assert (gone.key, gone.busy) == ("b1", True)
    assert table.stats().evictions == 2 and table.stats().busy_evictions == 1
    assert table.keys() == ["a1", "b3"]


def test_replacing_an_entry_needs_no_room_and_returns_the_old_value() -> None:
    table = LoadedModels(max_models=2, max_per_tenant=1)
    old, new = object(), object()
    table.put("k", old, tenant="a", kind="sampling")
    table.put("x", object(), tenant="b", kind="sampling")
    replaced = table.put("k", new, tenant="a", kind="sampling")
    assert [(e.key, e.value) for e in replaced] == [("k", old)]  # nothing else was evicted
    assert table.get("k", kind="sampling") is new and table.get("k", kind="training") is None
    assert table.keys() == ["x", "k"]
    assert [e.key for e in table.pop_tenant("a")] == ["k"] and table.keys() == ["x"]


@pytest.mark.parametrize(
    ("max_models", "per_tenant", "message"),
    [
        (0, None, "TS_SERVER_MAX_LOADED_MODELS"),
        (True, None, "TS_SERVER_MAX_LOADED_MODELS"),
        (2.0, None, "TS_SERVER_MAX_LOADED_MODELS"),
        (4, 0, "TS_SERVER_MAX_LOADED_PER_TENANT"),
        (4, "2", "TS_SERVER_MAX_LOADED_PER_TENANT"),
        (4, 5, "cannot exceed"),
    ],
)
def test_invalid_caps_are_configuration_errors(max_models: Any, per_tenant: Any, message: str) -> None:
    with pytest.raises(ServerConfigurationError, match=message):
        check_caps(max_models, per_tenant)
    with pytest.raises(ServerConfigurationError, match=message):
        LoadedModels(max_models=max_models, max_per_tenant=per_tenant)


def test_default_per_tenant_cap_is_half_at_least_one() -> None:
    assert [default_per_tenant_cap(n) for n in (1, 2, 3, 8, 9)] == [1, 1, 1, 4, 4]
    assert LoadedModels(max_models=8).max_per_tenant == 4
