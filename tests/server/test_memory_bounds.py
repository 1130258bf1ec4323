"""Bounded memory in the worker, and nothing served from memory that the database no longer allows.

Each test performs an attack against a live server on loopback, driven by the official
``tinker==0.38.0`` SDK:

* a tenant opens more sampling sessions than the server may keep loaded (memory
  exhaustion): the table stays within ``max_loaded_models``, evicts least recently used
  first, and evicted sessions are really freed;
* one tenant loads many models to push out another tenant's: at its own cap it evicts only
  its own;
* a run is evicted while it holds gradients since its last step: its next ``optim_step``
  reports them lost (no silent loss); an idle run is reloaded and continues bit for bit;
* a cached sampling session keeps answering after its checkpoint was deleted, expired or
  saved again, or after its tenant was crypto-shredded.

Oracles: a plain list that replays least-recently-used order; weak references to every
session the server loads (freed memory, not only a smaller table); a second tenant's run
that is never evicted (bit-exact continuation); the database rows the test changes.
"""

from __future__ import annotations

import datetime as _dt
import json
import logging
import os
import subprocess
import sys
import weakref
from collections.abc import Iterator
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import pytest
from sqlalchemy import select, update

from server.conftest import LOOSE, TINY_MODEL, LiveServer, ServerEnv
from tensafe.server import JobContext, JobFailedError, ServerConfigurationError, ServerSettings
from tensafe.server.privacy import set_tenant_policy

tinker = pytest.importorskip("tinker", reason="the official tinker SDK is a test dependency (tinker==0.38.0)")

PROMPT = [1, 17, 23, 42]
GREEDY = tinker.types.SamplingParams(max_tokens=3, temperature=0.0, stop=[])
ADAM = tinker.types.AdamParams(learning_rate=5e-2)
TOKENS = [[1, 17, 23, 42, 99, 7], [1, 5, 6, 7, 8, 9]]


def _datum(tokens: list[int]) -> Any:
    return tinker.types.Datum(
        model_input=tinker.types.ModelInput.from_ints(tokens[:-1]),
        loss_fn_inputs={"target_tokens": tokens[1:], "weights": [1.0] * (len(tokens) - 1)},
    )


BATCH = [_datum(t) for t in TOKENS]
SECOND_BATCH = [_datum([1, 300, 301, 302, 303, 304])]


def _sample(sampler: Any) -> list[int]:
    out = sampler.sample(tinker.types.ModelInput.from_ints(PROMPT), 1, GREEDY).result()
    return list(out.sequences[0].tokens)


def _probe(training: Any) -> np.ndarray:
    out = training.forward([_datum(TOKENS[0])], "cross_entropy").result()
    return np.asarray(out.loss_fn_outputs[0]["logprobs"].to_numpy())


def _loaded(server: LiveServer) -> list[tuple[str, str]]:
    """``(tenant, key)`` of every loaded session, least recently used first."""
    return [(e.tenant, e.key) for e in server.app.state.compute.loaded_sessions()]


@dataclass
class Loads:
    """Weak references to every session the server loaded (kind, key-less), in load order."""

    refs: list[tuple[str, weakref.ref[Any]]] = field(default_factory=list)

    def count(self, *names: str) -> int:
        return sum(1 for name, _ in self.refs if name in names)

    def alive(self) -> int:
        return sum(1 for _, ref in self.refs if ref() is not None)


@pytest.fixture
def loads(monkeypatch: pytest.MonkeyPatch) -> Iterator[Loads]:
    """Record every ``SamplingSession`` and ``LoraTrainingSession`` the worker creates."""
    from tensafe.training.runtime import LoraTrainingSession, SamplingSession

    record = Loads()
    for cls, name in (
        (SamplingSession, "for_base_model"),
        (SamplingSession, "from_adapter_files"),
        (LoraTrainingSession, "create"),
        (LoraTrainingSession, "from_state_bytes"),
    ):
        original = getattr(cls, name)

        def wrapped(_cls: type, *args: Any, _original: Any = original, _name: str = name, **kw: Any) -> Any:
            session = _original(*args, **kw)
            record.refs.append((_name, weakref.ref(session)))
            return session

        monkeypatch.setattr(cls, name, classmethod(wrapped))
    yield record


def _service(server: LiveServer, key: str) -> Any:
    return tinker.ServiceClient(base_url=server.url, api_key=key)


# --------------------------------------------------------------------------- the caps


def test_sampling_sessions_beyond_the_cap_stay_within_it_lru_first(
    start_server: Any, server_env: ServerEnv, loads: Loads
) -> None:
    server: LiveServer = start_server(privacy=LOOSE, max_loaded_models=3, max_loaded_per_tenant=3)
    service = _service(server, server_env.tenant_key("acme"))
    try:
        oracle: list[str] = []  # least recently used first, at most 3
        samplers, ids, first = [], [], []
        for _ in range(7):  # the attack: ever more sampling sessions
            sampler = service.create_sampling_client(base_model=TINY_MODEL).result()
            first.append(_sample(sampler))
            key = _loaded(server)[-1][1]  # the one just loaded is the most recently used
            samplers.append(sampler)
            ids.append(key)
            oracle = [*oracle, key][-3:]
            assert [k for _, k in _loaded(server)] == oracle
        assert len(set(ids)) == 7
        assert server.app.state.compute.memory_stats().evictions == 4
        # Evicted sessions are freed, not only forgotten: just the loaded three are alive.
        assert loads.count("for_base_model") == 7 and loads.alive() == 3

        # An evicted session reloads transparently on its next use, with the same answers.
        assert _sample(samplers[0]) == first[0]
        oracle = [*oracle, ids[0]][-3:]
        assert [k for _, k in _loaded(server)] == oracle
        assert loads.count("for_base_model") == 8 and loads.alive() == 3
        # A loaded one is used from memory (no load) and becomes the most recently used.
        assert _sample(samplers[5]) == first[5]
        assert loads.count("for_base_model") == 8
        assert [k for _, k in _loaded(server)] == [ids[6], ids[0], ids[5]]
    finally:
        service.close("success").result()


def test_a_tenant_at_its_cap_evicts_only_its_own_models(
    start_server: Any, server_env: ServerEnv, loads: Loads
) -> None:
    server: LiveServer = start_server(privacy=LOOSE, max_loaded_models=4, max_loaded_per_tenant=2)
    victim = _service(server, server_env.tenant_key("globex"))
    attacker = _service(server, server_env.tenant_key("acme"))
    try:
        run = victim.create_lora_training_client(base_model=TINY_MODEL, rank=2).result()
        run.forward_backward(BATCH, "cross_entropy").result()  # it even holds un-stepped gradients
        kept = victim.create_sampling_client(base_model=TINY_MODEL).result()
        before = _sample(kept)
        theirs = {k for t, k in _loaded(server) if t == "globex"}
        assert len(theirs) == 2

        attacker_run = attacker.create_lora_training_client(base_model=TINY_MODEL, rank=2).result()
        for _ in range(6):
            _sample(attacker.create_sampling_client(base_model=TINY_MODEL).result())
            loaded = _loaded(server)
            assert len(loaded) <= 4
            assert sum(1 for t, _ in loaded if t == "acme") <= 2
            assert {k for t, k in loaded if t == "globex"} == theirs
        assert attacker_run.model_id not in {k for _, k in _loaded(server)}  # it evicted its own

        # The victim's models were never reloaded: it carries on from memory.
        reloads = loads.count("from_state_bytes")
        assert _sample(kept) == before
        metrics = run.optim_step(ADAM).result().metrics
        assert metrics is not None and metrics["examples:sum"] == 2.0  # its gradients survived
        assert loads.count("from_state_bytes") == reloads
    finally:
        attacker.close("success").result()
        victim.close("success").result()


# --------------------------------------------------------------------------- training runs


def test_a_run_evicted_with_pending_gradients_reports_them_lost(
    start_server: Any, server_env: ServerEnv, caplog: pytest.LogCaptureFixture
) -> None:
    from tensafe.server.models import FutureRow

    server: LiveServer = start_server(privacy=LOOSE, max_loaded_models=2, max_loaded_per_tenant=2)
    service = _service(server, server_env.tenant_key("acme"))
    caplog.set_level(logging.WARNING, logger="tensafe.server.ops")
    try:
        busy = service.create_lora_training_client(base_model=TINY_MODEL, rank=2).result()
        idle = service.create_lora_training_client(base_model=TINY_MODEL, rank=2).result()
        busy.forward_backward(BATCH, "cross_entropy").result()  # busy is now the older one, idle the LRU
        idle.forward_backward(BATCH, "cross_entropy").result()
        idle.optim_step(ADAM).result()
        _probe(busy)  # busy is the most recently used
        _probe(idle)  # now idle is, and busy is the least recently used
        states = {e.key: e.busy for e in server.app.state.compute.loaded_sessions()}
        assert states == {busy.model_id: True, idle.model_id: False}

        # A new load must evict one: the idle run goes, although the busy one is older.
        sampler = service.create_sampling_client(base_model=TINY_MODEL).result()
        _sample(sampler)
        assert busy.model_id in {k for _, k in _loaded(server)}
        assert idle.model_id not in {k for _, k in _loaded(server)}
        metrics = busy.optim_step(ADAM).result().metrics
        assert metrics is not None and metrics["examples:sum"] == 2.0
        assert not [r for r in caplog.records if "unloaded training model" in r.getMessage()]

        # Both runs hold gradients: a new load has to take one of them, the least recently used.
        busy.forward_backward(BATCH, "cross_entropy").result()
        busy.forward_backward(SECOND_BATCH, "cross_entropy").result()  # DP: each datum once per step
        idle.forward_backward(BATCH, "cross_entropy").result()  # reloaded, in place of the sampler
        states = {e.key: e.busy for e in server.app.state.compute.loaded_sessions()}
        assert states == {busy.model_id: True, idle.model_id: True}
        _sample(service.create_sampling_client(base_model=TINY_MODEL).result())
        assert {k for _, k in _loaded(server)} == {idle.model_id, _loaded(server)[-1][1]}
        assert server.app.state.compute.memory_stats().busy_evictions == 1
        assert any("unloaded training model" in r.getMessage() for r in caplog.records)

        # Not silently: the next step fails as after a restart, naming the requests to resubmit.
        with pytest.raises(tinker.RequestFailedError, match="lost their accumulated gradients"):
            busy.optim_step(ADAM).result()
        with server_env.sessions() as s:
            futures = list(
                s.execute(
                    select(FutureRow).where(FutureRow.model_id == busy.model_id).order_by(FutureRow.seq_id)
                ).scalars()
            )
        *before, failed = futures
        stepped = max(f.seq_id or 0 for f in before if f.request_type == "optim_step")
        lost = [
            f.seq_id for f in before if f.request_type == "forward_backward" and (f.seq_id or 0) > stepped
        ]
        assert len(lost) == 2
        assert failed.request_type == "optim_step" and failed.state == "failed"
        assert failed.error_category == "server" and failed.error is not None
        assert f"seq_id {lost[0]}, {lost[1]} and lost" in failed.error and "memory" in failed.error
        # The client resubmits and the run continues: one step from exactly one batch.
        busy.forward_backward(BATCH, "cross_entropy").result()
        metrics = busy.optim_step(ADAM).result().metrics
        assert metrics is not None and metrics["examples:sum"] == 2.0
        # The other busy run kept its gradients.
        metrics = idle.optim_step(ADAM).result().metrics
        assert metrics is not None and metrics["examples:sum"] == 2.0
    finally:
        service.close("success").result()


def test_an_idle_run_reloads_transparently_and_continues_bit_exactly(
    start_server: Any, server_env: ServerEnv, loads: Loads
) -> None:
    server: LiveServer = start_server(privacy=LOOSE, max_loaded_models=3, max_loaded_per_tenant=1)
    keys = {t: server_env.tenant_key(t) for t in ("evicted", "reference")}
    with server_env.sessions.begin() as s:
        for tenant in keys:  # non-private runs: without DP noise two runs are comparable bit for bit
            set_tenant_policy(
                s,
                tenant,
                target_epsilon=50.0,
                delta=1e-3,
                clip_norm=10.0,
                allow_non_private=True,
                dataset_size=64,
                expected_batch_size=8,
                max_steps=40,
            )
    services = {t: _service(server, k) for t, k in keys.items()}
    try:
        runs = {
            t: svc.create_lora_training_client(
                base_model=TINY_MODEL, rank=2, seed=11, user_metadata={"tensafe.dp.enabled": "false"}
            ).result()
            for t, svc in services.items()
        }
        sampler = services["evicted"].create_sampling_client(base_model=TINY_MODEL).result()
        for _ in range(3):
            got = {}
            for tenant, run in runs.items():
                run.forward_backward(BATCH, "cross_entropy").result()
                metrics = run.optim_step(ADAM).result().metrics
                got[tenant] = (metrics, _probe(run))
            # Its own sampler pushes the evicted tenant's idle run out (per-tenant cap 1).
            _sample(sampler)
            assert runs["evicted"].model_id not in {k for _, k in _loaded(server)}
            assert runs["reference"].model_id in {k for _, k in _loaded(server)}
            assert got["evicted"][0] == got["reference"][0]
            np.testing.assert_array_equal(got["evicted"][1], got["reference"][1])
        # The evicted run was reloaded from its auto-checkpoint before each step, the other never.
        assert loads.count("from_state_bytes") == 2
        before = _probe(runs["evicted"])  # reloads once more
        np.testing.assert_array_equal(before, _probe(runs["reference"]))
        assert loads.count("from_state_bytes") == 3
    finally:
        for svc in services.values():
            svc.close("success").result()


# --------------------------------------------------------------------------- stale sessions


def _sampler_id(server_env: ServerEnv, model_path: str) -> str:
    from tensafe.server.models import SamplingSessionRow

    with server_env.sessions() as s:
        return str(
            s.execute(
                select(SamplingSessionRow.id).where(SamplingSessionRow.model_path == model_path)
            ).scalar_one()
        )


def test_a_deleted_expired_or_resaved_checkpoint_is_not_sampled_from_memory(
    start_server: Any, server_env: ServerEnv
) -> None:
    from tensafe.server.models import TrainingCheckpoint

    server: LiveServer = start_server(privacy=LOOSE)
    key = server_env.tenant_key("acme")
    service = _service(server, key)
    rest = tinker.RestClient(base_url=server.url, api_key=key)
    gone = "deleted, has expired or was saved again"
    try:
        training = service.create_lora_training_client(base_model=TINY_MODEL, rank=2, seed=3).result()
        training.forward_backward(BATCH, "cross_entropy").result()
        training.optim_step(ADAM).result()
        names = ("deleted", "expired", "resaved", "cold")
        paths = {n: training.save_weights_for_sampler(n).result().path for n in names}
        samplers = {n: service.create_sampling_client(model_path=p).result() for n, p in paths.items()}
        ephemeral = training.save_weights_and_get_sampling_client().result()
        for name in ("deleted", "expired", "resaved"):
            _sample(samplers[name])  # now cached in the worker
        ids = {n: _sampler_id(server_env, p) for n, p in paths.items()}
        assert {ids["deleted"], ids["expired"], ids["resaved"]} <= {k for _, k in _loaded(server)}

        # 1. Deleted through the API: its artifacts are gone, so must its cached weights be.
        rest.delete_checkpoint_from_tinker_path(paths["deleted"]).result()
        with pytest.raises(tinker.RequestFailedError, match=gone):
            _sample(samplers["deleted"])
        # 2. Expired (TTL passed; the sweeper has not run yet): invisible at once.
        past = _dt.datetime.now(_dt.UTC) - _dt.timedelta(seconds=1)
        with server_env.sessions.begin() as s:
            s.execute(
                update(TrainingCheckpoint)
                .where(TrainingCheckpoint.name.in_(("expired", "cold")))
                .values(expires_at=past)
            )
        with pytest.raises(tinker.RequestFailedError, match=gone):
            _sample(samplers["expired"])
        # ... also for a session never loaded before (its artifacts still exist until the sweep).
        with pytest.raises(tinker.RequestFailedError, match=gone):
            _sample(samplers["cold"])
        # 3. Deleted and saved again under the same name after another step: new weights, so
        #    the session created from the old ones must not answer with them.
        rest.delete_checkpoint_from_tinker_path(paths["resaved"]).result()
        training.forward_backward(BATCH, "cross_entropy").result()
        training.optim_step(ADAM).result()
        assert training.save_weights_for_sampler("resaved").result().path == paths["resaved"]
        with pytest.raises(tinker.RequestFailedError, match=gone):
            _sample(samplers["resaved"])

        loaded = {k for _, k in _loaded(server)}
        assert not loaded & set(ids.values())  # every refused session left memory
        # Untouched sessions still answer, and a new session on the re-saved checkpoint works.
        _sample(ephemeral)
        _sample(service.create_sampling_client(model_path=paths["resaved"]).result())
    finally:
        service.close("success").result()


@pytest.mark.parametrize("first", ["sample", "forward"])
def test_a_shredded_tenants_sessions_are_not_served_from_memory(
    start_server: Any, server_env: ServerEnv, loads: Loads, first: str
) -> None:
    """``first``: the attack made while both sessions are still loaded (the other follows)."""
    from tinker.proto import request_conv

    server: LiveServer = start_server(privacy=LOOSE)
    compute = server.app.state.compute
    acme = _service(server, server_env.tenant_key("acme"))
    globex = _service(server, server_env.tenant_key("globex"))
    try:
        run = acme.create_lora_training_client(base_model=TINY_MODEL, rank=2).result()
        run.forward_backward(BATCH, "cross_entropy").result()
        run.optim_step(ADAM).result()
        _sample(acme.create_sampling_client(base_model=TINY_MODEL).result())
        neighbour = globex.create_sampling_client(base_model=TINY_MODEL).result()
        expected = _sample(neighbour)
        acme_keys = [k for t, k in _loaded(server) if t == "acme"]
        (sampler_id,) = [k for k in acme_keys if ":sample:" in k]
        assert run.model_id in acme_keys
        assert loads.alive() == 3
        acme.close("success").result()  # closing the session leaves its models loaded

        server_env.keys.shred_tenant("acme")

        # The attack: jobs whose payload the worker opened before the shred committed (the
        # worker cannot exclude that race) reach the sessions still loaded in memory.
        services = server.app.state.services

        def ctx(
            request_type: str, *, model_id: str | None, payload: dict[str, Any], data: bytes
        ) -> JobContext:
            return JobContext(
                future_id="req-raced-the-shred",
                tenant="acme",
                actor="key_raced",
                model_id=model_id,
                seq_id=None if model_id is None else 1000,
                request_type=request_type,
                payload=payload,
                payload_bytes=data,
                services=services,
            )

        sample = ctx(
            "sample",
            model_id=None,
            payload={
                "sampling_session_id": sampler_id,
                "num_samples": 1,
                "sampling_params": {"max_tokens": 2},
            },
            data=json.dumps(PROMPT).encode(),
        )
        request = tinker.types.ForwardBackwardRequest(
            forward_backward_input=tinker.types.ForwardBackwardInput(data=BATCH, loss_fn="cross_entropy"),
            model_id=run.model_id,
            seq_id=1000,
        )
        forward = ctx(
            "forward",
            model_id=run.model_id,
            payload={},
            data=request_conv.forward_backward_request_to_proto(request).SerializeToString(),
        )
        attacks = [
            (compute.sample, sample, "unknown sampling session"),
            (compute.forward, forward, "unknown model"),
        ]
        for handler, job, refusal in attacks if first == "sample" else attacks[::-1]:
            with pytest.raises(JobFailedError, match=refusal) as refused:
                handler(job)
            assert refused.value.category == "user"
            del refused  # its traceback would keep the handler's frames alive

        # Everything of the shredded tenant left memory (freed), the neighbour's did not.
        assert [t for t, _ in _loaded(server)] == ["globex"]
        assert loads.alive() == 1
        assert _sample(neighbour) == expected
    finally:
        globex.close("success").result()


# --------------------------------------------------------------------------- configuration


def test_caps_from_the_environment() -> None:
    env = {"DATABASE_URL": "sqlite:///unused.db", "TS_SERVER_MODELS": "m=/models/m"}
    default = ServerSettings.from_environment(env)
    assert (default.max_loaded_models, default.max_loaded_per_tenant) == (8, None)
    both = ServerSettings.from_environment(
        env | {"TS_SERVER_MAX_LOADED_MODELS": "5", "TS_SERVER_MAX_LOADED_PER_TENANT": "5"}
    )
    assert (both.max_loaded_models, both.max_loaded_per_tenant) == (5, 5)
    for name in ("TS_SERVER_MAX_LOADED_MODELS", "TS_SERVER_MAX_LOADED_PER_TENANT"):
        for bad in ("0", "-1", "1.5", "lots", "٣", " 2 2"):
            with pytest.raises(ServerConfigurationError, match=name):
                ServerSettings.from_environment(env | {name: bad})
    with pytest.raises(ServerConfigurationError, match="cannot exceed"):
        ServerSettings.from_environment(
            env | {"TS_SERVER_MAX_LOADED_MODELS": "2", "TS_SERVER_MAX_LOADED_PER_TENANT": "3"}
        )
    with pytest.raises(ServerConfigurationError, match="positive integer"):
        ServerSettings(database_url="sqlite://", data_dir=default.data_dir, max_loaded_models=True)


@pytest.mark.parametrize(
    "variables",
    [
        {"TS_SERVER_MAX_LOADED_MODELS": "many"},
        {"TS_SERVER_MAX_LOADED_MODELS": "1", "TS_SERVER_MAX_LOADED_PER_TENANT": "2"},
    ],
)
def test_malformed_caps_stop_the_server_at_start_up(tmp_path: Any, variables: dict[str, str]) -> None:
    env = (
        os.environ
        | {"DATABASE_URL": f"sqlite:///{tmp_path / 't.db'}", "TS_DATA_DIR": str(tmp_path)}
        | variables
    )
    argv = [sys.executable, "-c", "import sys; from tensafe.cli.main import main; sys.exit(main())", "server"]
    out = subprocess.run(argv, env=env, capture_output=True, text=True, timeout=120)
    assert out.returncode == 2
    lines = out.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("tensafe: error: TS_SERVER_MAX_LOADED_"), out.stderr
