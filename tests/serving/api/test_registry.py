"""The adapter registry (``tensafe.serving.registry``): resolution per tenant, LRU residency, audit.

The engine here is a recording double (only ``load_adapter``/``unload_adapter`` matter to the
registry); the API tests drive the same registry with the real engine. The audit log is the real
one on a migrated database (SQLite and PostgreSQL): every load, unload and refusal is read back
from ``audit_records``.
"""

from __future__ import annotations

import asyncio
import json
from collections.abc import AsyncIterator, Iterator, Sequence
from dataclasses import dataclass, field
from typing import Any

import pytest
from sqlalchemy import Engine as SqlEngine
from sqlalchemy import select

from tensafe import config
from tensafe.audit import AuditLog
from tensafe.audit.models import AuditRecordRow
from tensafe.db import create_engine_from_url, ensure_tenant, make_session_factory
from tensafe.serving import (
    AdapterRefusedError,
    GenerationChunk,
    GenerationRequest,
    LoraAdapter,
    ModelNotFoundError,
    ServingOverloadedError,
)
from tensafe.serving.registry import (
    SERVING_EVENTS,
    AdapterRef,
    AdapterRegistry,
    ModelEntry,
    ServingCaller,
)

BASE = "tensafe-test/tiny-llama"
ACME = ServingCaller(tenant="acme", actor="apikey:a1")
GLOBEX = ServingCaller(tenant="globex", actor="apikey:g1")


class RecordingEngine:
    """Records loads and unloads (the registry never generates)."""

    model_id = BASE
    max_model_len = 256
    max_lora_rank = 8

    def __init__(self) -> None:
        self.loaded: dict[str, LoraAdapter] = {}
        self.events: list[tuple[str, str]] = []

    def tokenizer(self) -> object:
        raise NotImplementedError

    async def load_adapter(self, adapter: LoraAdapter) -> None:
        self.loaded[adapter.adapter_id] = adapter
        self.events.append(("load", adapter.adapter_id))

    async def unload_adapter(self, adapter_id: str) -> None:
        del self.loaded[adapter_id]
        self.events.append(("unload", adapter_id))

    def resident_adapters(self) -> frozenset[str]:
        return frozenset(self.loaded)

    async def generate(self, request: GenerationRequest) -> AsyncIterator[GenerationChunk]:
        raise NotImplementedError
        yield  # pragma: no cover

    async def close(self) -> None:
        self.loaded.clear()


@dataclass
class DictSource:
    """Adapters by name: ``name -> (tenant, version)``; ``gone`` and ``refused`` simulate the store."""

    adapters: dict[str, tuple[str, str]]
    name: str = "test"
    gone: set[str] = field(default_factory=set)
    refused: set[str] = field(default_factory=set)
    fetched: list[str] = field(default_factory=list)

    def _ref(self, model: str) -> AdapterRef:
        tenant, version = self.adapters[model]
        return AdapterRef(source=self.name, name=model, tenant=tenant, base_model=BASE, version=version)

    def resolve(self, caller: ServingCaller, model: str) -> AdapterRef | None:
        if not model.startswith("ad/"):
            return None
        if model not in self.adapters or model in self.gone or self.adapters[model][0] != caller.tenant:
            raise ModelNotFoundError("not visible")
        return self._ref(model)

    def fetch(self, ref: AdapterRef) -> LoraAdapter:
        if ref.name in self.refused:
            raise AdapterRefusedError(f"adapter {ref.name} failed decryption")
        self.fetched.append(ref.name)
        return LoraAdapter(
            adapter_id=ref.adapter_id, base_model_id=BASE, files={"adapter_config.json": b"{}"}
        )

    def check(self, ref: AdapterRef) -> None:
        if ref.name in self.gone or self.adapters.get(ref.name, ("", ""))[1] != ref.version:
            raise ModelNotFoundError("gone")

    def list_models(self, caller: ServingCaller) -> Sequence[ModelEntry]:
        return [
            ModelEntry(id=name, owned_by=tenant, root=BASE)
            for name, (tenant, _) in sorted(self.adapters.items())
            if tenant == caller.tenant and name not in self.gone
        ]


@dataclass
class Setup:
    engine: RecordingEngine
    source: DictSource
    registry: AdapterRegistry
    db: SqlEngine


@pytest.fixture
def setup(migrated_database_url: str) -> Iterator[Setup]:
    db = create_engine_from_url(migrated_database_url)
    sessions = make_session_factory(db)
    with sessions.begin() as session:
        ensure_tenant(session, "acme", name="ACME")
        ensure_tenant(session, "globex", name="Globex")
    engine = RecordingEngine()
    source = DictSource(
        {
            "ad/a": ("acme", "v1"),
            "ad/b": ("acme", "v1"),
            "ad/c": ("acme", "v1"),
            "ad/g": ("globex", "v1"),
        }
    )

    async def engine_for(name: str) -> RecordingEngine:
        assert name == BASE
        return engine

    registry = AdapterRegistry(
        sources=[source],
        engine_for=engine_for,
        base_models=[BASE],
        max_resident=2,
        audit=AuditLog(sessions, signer=None, checkpoint_every=None),
        recheck_seconds=3600,
    )
    try:
        yield Setup(engine, source, registry, db)
    finally:
        db.dispose()


def records(db: SqlEngine, tenant: str) -> list[tuple[str, str, dict[str, Any]]]:
    with db.connect() as conn:
        rows = conn.execute(
            select(AuditRecordRow.action, AuditRecordRow.resource, AuditRecordRow.details)
            .where(AuditRecordRow.tenant_id == tenant)
            .order_by(AuditRecordRow.seq)
        ).all()
    return [(a, r, d if isinstance(d, dict) else json.loads(d)) for a, r, d in rows]


def use(registry: AdapterRegistry, caller: ServingCaller, model: str) -> Any:
    """Acquire and release at once (one finished request)."""

    async def run() -> Any:
        target = await registry.acquire(caller, model)
        registry.release(target)
        return target

    return asyncio.run(run())


def test_lru_unloads_the_least_recently_used_idle_adapter_and_records_each_step(setup: Setup) -> None:
    a = use(setup.registry, ACME, "ad/a")
    b = use(setup.registry, ACME, "ad/b")
    use(setup.registry, ACME, "ad/a")  # a is now more recent than b
    c = use(setup.registry, ACME, "ad/c")
    assert setup.engine.events == [
        ("load", a.adapter_id),
        ("load", b.adapter_id),
        ("unload", b.adapter_id),
        ("load", c.adapter_id),
    ]
    assert set(setup.engine.loaded) == {a.adapter_id, c.adapter_id}
    assert [r.name for r in setup.registry.resident()] == ["ad/a", "ad/c"]
    # A resident adapter is not fetched (decrypted) again.
    assert setup.source.fetched == ["ad/a", "ad/b", "ad/c"]
    got = [(action, resource, d.get("reason")) for action, resource, d in records(setup.db, "acme")]
    assert got == [
        ("serving.adapter.loaded", "adapter/ad/a", None),
        ("serving.adapter.loaded", "adapter/ad/b", None),
        ("serving.adapter.unloaded", "adapter/ad/b", "lru"),
        ("serving.adapter.loaded", "adapter/ad/c", None),
    ]
    for action, _, details in records(setup.db, "acme"):
        spec = SERVING_EVENTS[action]
        assert (details["severity"], details["recoverable"]) == (spec.severity, spec.recoverable)


def test_adapters_in_use_are_never_evicted_a_new_one_gets_429(setup: Setup) -> None:
    async def run() -> None:
        ta = await setup.registry.acquire(ACME, "ad/a")
        tb = await setup.registry.acquire(ACME, "ad/b")
        with pytest.raises(ServingOverloadedError, match="adapter slots"):
            await setup.registry.acquire(ACME, "ad/c")
        assert set(setup.engine.loaded) == {ta.adapter_id, tb.adapter_id}
        setup.registry.release(tb)
        tc = await setup.registry.acquire(ACME, "ad/c")  # b is idle now: it goes
        assert set(setup.engine.loaded) == {ta.adapter_id, tc.adapter_id}

    asyncio.run(run())
    refused = [d for a, _, d in records(setup.db, "acme") if a == "serving.adapter.refused"]
    assert [d["reason"] for d in refused] == ["no_free_slot"]


def test_another_tenants_adapter_is_the_same_404_as_an_unknown_one(setup: Setup) -> None:
    use(setup.registry, GLOBEX, "ad/g")
    messages = []
    for name in ("ad/g", "ad/nope"):
        with pytest.raises(ModelNotFoundError) as info:
            use(setup.registry, ACME, name)
        messages.append(str(info.value).replace(name, "NAME"))
    assert messages[0] == messages[1]
    # The refusals are in the caller's chain; the owner's chain only has its own load.
    assert [(a, r) for a, r, _ in records(setup.db, "acme")] == [
        ("serving.adapter.refused", "adapter/ad/g"),
        ("serving.adapter.refused", "adapter/ad/nope"),
    ]
    assert [a for a, _, _ in records(setup.db, "globex")] == ["serving.adapter.loaded"]


def test_a_name_no_source_knows_is_404_and_a_base_model_needs_no_adapter(setup: Setup) -> None:
    with pytest.raises(ModelNotFoundError, match="does not exist"):
        use(setup.registry, ACME, "gpt-4o")
    target = use(setup.registry, ACME, BASE)
    assert target.adapter_id is None and target.engine is setup.engine


def test_the_same_name_of_two_tenants_or_two_versions_gets_different_engine_ids() -> None:
    ref = AdapterRef(source="checkpoint", name="n", tenant="acme", base_model=BASE, version="v1")
    other_tenant = AdapterRef(source="checkpoint", name="n", tenant="globex", base_model=BASE, version="v1")
    other_version = AdapterRef(source="checkpoint", name="n", tenant="acme", base_model=BASE, version="v2")
    ids = {ref.adapter_id, other_tenant.adapter_id, other_version.adapter_id}
    assert len(ids) == 3
    assert all(i.startswith("lora-") and "acme" not in i for i in ids)


def test_sweep_unloads_what_the_source_no_longer_allows_and_requests_get_404(setup: Setup) -> None:
    a = use(setup.registry, ACME, "ad/a")
    use(setup.registry, ACME, "ad/b")
    setup.source.gone.add("ad/a")
    with pytest.raises(ModelNotFoundError):
        use(setup.registry, ACME, "ad/a")  # resolved again on every request, even while resident
    assert asyncio.run(setup.registry.sweep()) == ["ad/a"]
    assert a.adapter_id not in setup.engine.loaded
    unloaded = [d for act, _, d in records(setup.db, "acme") if act == "serving.adapter.unloaded"]
    assert [d["reason"] for d in unloaded] == ["invalid"]


def test_a_resaved_adapter_is_a_new_id_and_the_old_weights_are_swept(setup: Setup) -> None:
    old = use(setup.registry, ACME, "ad/a")
    setup.source.adapters["ad/a"] = ("acme", "v2")
    new = use(setup.registry, ACME, "ad/a")
    assert new.adapter_id != old.adapter_id
    asyncio.run(setup.registry.sweep())
    assert set(setup.engine.loaded) == {new.adapter_id}


def test_acquire_sweeps_when_the_recheck_interval_has_passed(setup: Setup) -> None:
    now = [0.0]
    registry = AdapterRegistry(
        sources=[setup.source],
        engine_for=lambda _name: _ready(setup.engine),
        base_models=[BASE],
        max_resident=2,
        audit=AuditLog(make_session_factory(setup.db), signer=None, checkpoint_every=None),
        recheck_seconds=10,
        clock=lambda: now[0],
    )
    a = use(registry, ACME, "ad/a")
    setup.source.gone.add("ad/a")
    now[0] = 5.0
    use(registry, ACME, "ad/b")
    assert a.adapter_id in setup.engine.loaded  # not due yet
    now[0] = 11.0
    use(registry, ACME, "ad/b")
    assert a.adapter_id not in setup.engine.loaded


async def _ready(engine: RecordingEngine) -> RecordingEngine:
    return engine


def test_a_refused_adapter_is_not_loaded_and_the_refusal_is_recorded(setup: Setup) -> None:
    setup.source.refused.add("ad/a")
    with pytest.raises(AdapterRefusedError, match="decryption"):
        use(setup.registry, ACME, "ad/a")
    assert setup.engine.loaded == {}
    ((action, _, details),) = records(setup.db, "acme")
    assert action == "serving.adapter.refused"
    assert details["reason"] == "refused" and "decryption" in details["why"]


def test_a_failing_audit_log_fails_the_load_and_leaves_nothing_resident(setup: Setup) -> None:
    class Broken:
        def append(self, **_: Any) -> None:
            raise RuntimeError("audit database is down")

    registry = AdapterRegistry(
        sources=[setup.source],
        engine_for=lambda _name: _ready(setup.engine),
        base_models=[BASE],
        max_resident=2,
        audit=Broken(),
    )
    with pytest.raises(RuntimeError, match="audit database"):
        use(registry, ACME, "ad/a")
    assert setup.engine.loaded == {} and registry.resident() == []


def test_list_models_shows_base_models_and_only_the_callers_adapters(setup: Setup) -> None:
    ids = [m.id for m in asyncio.run(setup.registry.list_models(ACME))]
    assert ids == [BASE, "ad/a", "ad/b", "ad/c"]
    assert [m.id for m in asyncio.run(setup.registry.list_models(GLOBEX))] == [BASE, "ad/g"]


def test_admin_load_and_unload(setup: Setup) -> None:
    info = asyncio.run(setup.registry.load(ACME, "ad/a"))
    assert info.adapter_id in setup.engine.loaded and info.in_use == 0
    assert asyncio.run(setup.registry.unload(ACME, "ad/a")) is True
    assert asyncio.run(setup.registry.unload(ACME, "ad/a")) is False
    with pytest.raises(ModelNotFoundError):
        asyncio.run(setup.registry.unload(ACME, "ad/g"))  # another tenant's: 404, nothing unloaded
    reasons = [d.get("reason") for a, _, d in records(setup.db, "acme") if a == "serving.adapter.unloaded"]
    assert reasons == ["admin"]


def test_close_unloads_everything(setup: Setup) -> None:
    use(setup.registry, ACME, "ad/a")
    use(setup.registry, GLOBEX, "ad/g")
    asyncio.run(setup.registry.close())
    assert setup.engine.loaded == {}
    assert records(setup.db, "globex")[-1][2]["reason"] == "shutdown"


@pytest.mark.parametrize(
    ("raw", "expected"),
    [("", config.DEFAULT_SERVE_MAX_RESIDENT_ADAPTERS), ("1", 1), ("1024", 1024), (" 16 ", 16)],
)
def test_the_resident_cap_from_the_environment(raw: str, expected: int) -> None:
    assert config.serve_max_resident_adapters({"TS_SERVE_MAX_RESIDENT_ADAPTERS": raw}) == expected


@pytest.mark.parametrize("raw", ["0", "-1", "1025", "eight", "1.5", "٣"])
def test_a_bad_resident_cap_is_refused_naming_the_variable(raw: str) -> None:
    with pytest.raises(config.EnvironmentVariableError, match="TS_SERVE_MAX_RESIDENT_ADAPTERS"):
        config.serve_max_resident_adapters({"TS_SERVE_MAX_RESIDENT_ADAPTERS": raw})


def test_docs_audit_md_lists_the_serving_events() -> None:
    import pathlib
    import re

    text = (pathlib.Path(__file__).resolve().parents[3] / "docs" / "audit.md").read_text()
    section = text.split("**Serving**", 1)[1].split("**Training API**", 1)[0]
    rows = re.findall(r"^\| `([^`]+)` \| (\w+) \| (true|false) \|", section, flags=re.M)
    documented = {action: (severity, recoverable == "true") for action, severity, recoverable in rows}
    assert documented == {a: (s.severity, s.recoverable) for a, s in SERVING_EVENTS.items()}
