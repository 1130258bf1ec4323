"""``/api/v1/tensafe/audit/{head,verify}`` and ``/artifacts``: the attacks, and bounded work.

* A database writer deletes checkpoints and rewrites the chain consistently: ``/audit/verify``
  reports it (the server's checkpoint interval applies).
* A database writer rolls the log back to an earlier valid state: plain verification says
  intact (documented), verification with the head the client kept says rolled back, on
  every call, even while the full verification is answered from the cache.
* A tenant calling ``/audit/verify`` in a loop gets at most one full verification per
  interval (counted with a patched verifier); concurrent calls share one; at most
  ``audit_verify_concurrency`` run at once; every answer is a 200.
* ``/artifacts`` pages in SQL: two statements per call whatever the number of artifacts
  (counted with an SQLAlchemy event listener), no store directory listing, the same order
  as a naive in-memory listing.

The app runs in process (uvicorn on loopback) on SQLite and PostgreSQL, with no worker
and no model: these endpoints need neither.
"""

from __future__ import annotations

import base64
import dataclasses
import datetime as dt
import json
import threading
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import httpx
import pytest
import rfc8785
from audit_helpers import rehash_from, sql
from sqlalchemy import Engine, event
from sqlalchemy.orm import Session, sessionmaker

import tensafe.client as ts
import tensafe.server.routers.tensafe as routes
from server.conftest import LiveServer
from tensafe.audit import CHECKPOINT_CONTEXT, append_record, load_head
from tensafe.crypto.kdf import Argon2idParams
from tensafe.crypto.signing import HybridVerifyingKey
from tensafe.db import create_engine_from_url, make_session_factory
from tensafe.keys import KeyManager, LocalKekProvider
from tensafe.server import ModelCatalog, ServerSettings, create_app
from tensafe.server.models import FutureRow, ServerSession, TrainingCheckpoint, TrainingModel
from tensafe.server.tenants import create_api_key, create_tenant
from tensafe.storage import EncryptedArtifactStore, LocalFilesystemBackend

EVERY = 4


@dataclasses.dataclass
class Env:
    url: str
    engine: Engine
    sessions: sessionmaker[Session]
    keys: KeyManager
    store: EncryptedArtifactStore
    settings: ServerSettings
    servers: list[LiveServer]

    def tenant(self, name: str) -> str:
        with self.sessions.begin() as session:
            create_tenant(session, name)
            key, _ = create_api_key(session, name)
        return key

    def append(self, tenant: str, n: int) -> None:
        signer = self.keys.deployment_signing_key()
        with self.sessions.begin() as session:
            for i in range(n):
                append_record(
                    session,
                    tenant=tenant,
                    actor="apikey:test",
                    action="api.sample",
                    details={"i": i},
                    signer=signer,
                    checkpoint_every=EVERY,
                )

    def serve(self, **changes: Any) -> LiveServer:
        app = create_app(
            dataclasses.replace(self.settings, **changes), store=self.store, key_manager=self.keys
        )
        server = LiveServer(app).start()
        self.servers.append(server)
        return server

    @property
    def public_key(self) -> HybridVerifyingKey:
        return self.keys.deployment_verifying_key()


@pytest.fixture
def env(migrated_database_url: str, tmp_path: Path) -> Iterator[Env]:
    engine = create_engine_from_url(migrated_database_url)
    provider = LocalKekProvider.create(
        tmp_path / "keys" / "kek.json",
        passphrase=b"audit endpoint tests 4711",
        params=Argon2idParams.minimum(),
    )
    keys = KeyManager(engine, provider)
    store = EncryptedArtifactStore(LocalFilesystemBackend(tmp_path / "artifacts"), keys)
    settings = ServerSettings(
        database_url=migrated_database_url,
        data_dir=tmp_path,
        catalog=ModelCatalog({}),
        run_worker=False,
        audit_checkpoint_every=EVERY,
        audit_verify_interval_seconds=3600.0,
    )
    made = Env(migrated_database_url, engine, make_session_factory(engine), keys, store, settings, [])
    yield made
    for server in made.servers:
        server.stop()
    keys.close()
    engine.dispose()


def _get(server: LiveServer, key: str, path: str, **params: Any) -> httpx.Response:
    return httpx.get(
        f"{server.url}/api/v1/tensafe/{path}", params=params, headers={"X-API-Key": key}, timeout=60
    )


# --------------------------------------------------------------------------- /audit/head


def test_head_is_signed_by_the_deployment_key_and_is_a_head_file(env: Env) -> None:
    key = env.tenant("acme")
    other = env.tenant("globex")
    env.append("acme", 6)  # checkpoint at 4; 2 records after it
    server = env.serve()
    answer = _get(server, key, "audit/head")
    assert answer.status_code == 200, answer.text
    head = answer.json()
    assert (head["tenant"], head["length"], head["format"]) == ("acme", 6, "tensafe.audit.checkpoint/v1")
    assert head["key_id"] == env.public_key.key_id
    # Independent check: the hybrid signature over the RFC 8785 canonical body.
    body = {k: v for k, v in head.items() if k != "signature"}
    env.public_key.verify(
        base64.b64decode(head["signature"]), rfc8785.dumps(body), context=CHECKPOINT_CONTEXT
    )
    assert load_head(json.dumps(head).encode()).length == 6  # the response is a head file
    assert _get(server, key, "audit/head").json() == head  # no second checkpoint for the same length
    assert _get(server, other, "audit/head").json()["tenant"] == "globex"
    with ts.RestClient(base_url=server.url, api_key=key) as rest:
        kept = rest.get_audit_head().result()
    assert kept.head_hash == head["head_hash"]
    assert load_head(kept.to_json().encode()).signature == base64.b64decode(head["signature"])


# --------------------------------------------------------------------------- /audit/verify: attacks


def test_verify_detects_deleted_checkpoints_and_a_consistent_rewrite(env: Env) -> None:
    key = env.tenant("acme")
    env.append("acme", 11)  # checkpoints at 4 and 8; 3 records after
    before = _get(env.serve(), key, "audit/verify").json()
    assert before["verified"] is True and before["checkpoint_every"] == EVERY and before["unsigned_tail"] == 3
    sql(env.engine, "DELETE FROM audit_checkpoints WHERE tenant_id = 'acme'")
    sql(env.engine, "UPDATE audit_records SET actor = 'mallory' WHERE tenant_id = 'acme' AND seq = 5")
    rehash_from(env.engine, 5)  # records, links and the chain-head row all consistent
    after = _get(env.serve(), key, "audit/verify")
    assert after.status_code == 200
    verdict = after.json()
    assert verdict["verified"] is False
    assert "(11 records) follow the newest signed checkpoint, but at most 3 may" in verdict["reason"]


def test_rollback_is_caught_with_the_known_head_only(env: Env) -> None:
    key = env.tenant("acme")
    env.append("acme", 5)
    server = env.serve()
    with ts.RestClient(base_url=server.url, api_key=key) as rest:
        rest.get_audit_head().result()  # checkpoint at 5
        env.append("acme", 6)
        kept = rest.get_audit_head().result()  # the client keeps this one (length 11)
        first = rest.verify_audit(kept).result()
        assert first.verified and first.known_length == 11 and not first.cached
        # The operator restores the state of length 5 (records and checkpoints after it gone).
        sql(env.engine, "DELETE FROM audit_records WHERE tenant_id = 'acme' AND seq >= 5")
        sql(env.engine, "DELETE FROM audit_checkpoints WHERE tenant_id = 'acme' AND length > 5")
        rehash_from(env.engine, 5)
        # Same server: the chain verification is cached, the known head is compared anew.
        cached = rest.verify_audit(kept).result()
        assert cached.cached and not cached.verified
        assert "holds 5 records but your known head covers 11: the log was rolled back" in str(cached.reason)
    with ts.RestClient(base_url=env.serve().url, api_key=key) as rest:
        plain = rest.verify_audit().result()
        assert plain.verified and plain.length == 5  # documented: an earlier valid state verifies
        assert not rest.verify_audit(kept).result().verified
        forged = kept.model_copy(update={"head_hash": "ab" * 32, "length": 3})
        assert "does not contain your known head" in str(rest.verify_audit(forged).result().reason)


def test_known_head_parameters_are_validated(env: Env) -> None:
    key = env.tenant("acme")
    server = env.serve()
    alone = _get(server, key, "audit/verify", known_length=3)
    assert alone.status_code == 400 and "go together" in alone.json()["detail"]
    for params in (
        {"known_length": -1, "known_head_hash": "ab" * 32},
        {"known_length": 1, "known_head_hash": "XY"},
    ):
        bad = _get(server, key, "audit/verify", **params)
        assert 400 <= bad.status_code < 500 and bad.json()["error"]


# --------------------------------------------------------------------------- /audit/verify: bounds


@pytest.fixture
def counted(monkeypatch: pytest.MonkeyPatch) -> Callable[..., dict[str, Any]]:
    """Patch the route's verifier: count calls per tenant and the most running at once."""

    def install(delay: float = 0.0) -> dict[str, Any]:
        stats: dict[str, Any] = {"calls": {}, "active": 0, "max_active": 0}
        lock = threading.Lock()
        real = routes.verify_chain

        def verify(session: Session, **kw: Any) -> Any:
            with lock:
                stats["calls"][kw["tenant"]] = stats["calls"].get(kw["tenant"], 0) + 1
                stats["active"] += 1
                stats["max_active"] = max(stats["max_active"], stats["active"])
            try:
                time.sleep(delay)
                return real(session, **kw)
            finally:
                with lock:
                    stats["active"] -= 1

        monkeypatch.setattr(routes, "verify_chain", verify)
        return stats

    return install


def test_one_full_verification_per_tenant_per_interval(
    env: Env, counted: Callable[..., dict[str, Any]]
) -> None:
    stats = counted()
    acme, globex = env.tenant("acme"), env.tenant("globex")
    env.append("acme", 9)
    server = env.serve()
    answers = [_get(server, acme, "audit/verify") for _ in range(15)]
    assert {a.status_code for a in answers} == {200}
    verdicts = [a.json() for a in answers]
    assert stats["calls"] == {"acme": 1}
    assert [v["cached"] for v in verdicts] == [False] + [True] * 14
    assert len({v["verified_at"] for v in verdicts}) == 1 and all(v["verified"] for v in verdicts)
    _get(server, globex, "audit/verify")
    assert stats["calls"] == {"acme": 1, "globex": 1}  # per tenant, not global


def test_the_interval_expires(env: Env, counted: Callable[..., dict[str, Any]]) -> None:
    stats = counted()
    key = env.tenant("acme")
    server = env.serve(audit_verify_interval_seconds=60)
    _get(server, key, "audit/verify")  # creates the application's verification cache
    now = [time.monotonic()]  # from here on a controlled clock, not sleep (load-proof)
    server.app.state.audit_verifications._clock = lambda: now[0]
    _get(server, key, "audit/verify")
    assert stats["calls"] == {"acme": 1}
    now[0] += 30.0
    assert _get(server, key, "audit/verify").json()["cached"] is True
    assert stats["calls"] == {"acme": 1}
    now[0] += 31.0
    assert _get(server, key, "audit/verify").json()["cached"] is False
    assert stats["calls"] == {"acme": 2}


def test_concurrent_calls_share_one_verification_and_respect_the_global_limit(
    env: Env, counted: Callable[..., dict[str, Any]]
) -> None:
    stats = counted(delay=0.4)
    keys = {name: env.tenant(name) for name in ("t1", "t2", "t3", "t4")}
    for name in keys:
        env.append(name, 3)
    server = env.serve(audit_verify_concurrency=2)
    results: list[httpx.Response] = []
    lock = threading.Lock()

    def call(key: str) -> None:
        answer = _get(server, key, "audit/verify")
        with lock:
            results.append(answer)

    threads = [threading.Thread(target=call, args=(k,)) for k in keys.values() for _ in range(4)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(60)
    assert len(results) == 16 and {r.status_code for r in results} == {200}
    assert all(r.json()["verified"] for r in results)
    assert stats["calls"] == {name: 1 for name in keys}  # one per tenant, shared by its 4 calls
    assert stats["max_active"] == 2  # the limit binds: four tenants, two at a time


# --------------------------------------------------------------------------- /artifacts


def _artifacts(env: Env, tenant: str, n: int) -> None:
    """``n`` artifacts of each kind for ``tenant``, with distinct and tied creation times."""
    base = dt.datetime(2026, 1, 1, tzinfo=dt.UTC)
    with env.sessions.begin() as s:
        s.add(
            ServerSession(
                id=f"sess-{tenant}",
                tenant_id=tenant,
                created_at=base,
                last_heartbeat_at=base,
                user_metadata="{}",
                tags="[]",
            )
        )
        s.flush()
        for i in range(n):
            when = base + dt.timedelta(minutes=i // 2)  # pairs share a timestamp: ties break on the id
            model = f"sess-{tenant}:train:{i}"
            s.add(
                TrainingModel(
                    id=model,
                    tenant_id=tenant,
                    session_id=f"sess-{tenant}",
                    model_seq_id=i,
                    base_model="m",
                    lora_config="{}",
                    optimizer_config="{}",
                    user_metadata="{}",
                    state="ready",
                    created_at=when,
                    last_request_time=when + dt.timedelta(seconds=7),
                    state_ref=f"state-{tenant}-{i:04d}",
                )
            )
            s.flush()
            s.add(
                TrainingCheckpoint(
                    id=f"ck-{tenant}-{i}",
                    tenant_id=tenant,
                    model_id=model,
                    kind="weights",
                    name=f"w{i}",
                    artifact_id=f"ckpt-{tenant}-{i:04d}",
                    size_bytes=100 + i,
                    public=False,
                    user_metadata="{}",
                    created_at=when + dt.timedelta(seconds=3),
                )
            )
            s.add(
                FutureRow(
                    id=f"fut-{tenant}-{i:04d}",
                    tenant_id=tenant,
                    model_id=model,
                    seq_id=0,
                    request_type="forward_backward",
                    state="completed",
                    actor="apikey:x",
                    request_sha256="00" * 32,
                    payload_ref=f"payload-{tenant}-{i:04d}" if i % 3 == 0 else None,
                    result_ref=f"fut-{tenant}-{i:04d}.result",
                    attempts=1,
                    created_at=when + dt.timedelta(seconds=1),
                    updated_at=when,
                )
            )


def _naive_listing(env: Env, tenant: str) -> list[tuple[str, str]]:
    """The old in-memory algorithm: every reference, sorted newest first, then by id descending."""
    found: list[tuple[dt.datetime, str, str]] = []
    with env.sessions() as s:
        for ck in s.query(TrainingCheckpoint).filter_by(tenant_id=tenant):
            found.append((ck.created_at, ck.artifact_id or "", "checkpoint"))
        for m in s.query(TrainingModel).filter_by(tenant_id=tenant):
            found.append((m.last_request_time, m.state_ref or "", "training_state"))
        for f in s.query(FutureRow).filter_by(tenant_id=tenant):
            if f.payload_ref:
                found.append((f.created_at, f.payload_ref, "request_payload"))
            if f.result_ref:
                found.append((f.created_at, f.result_ref, "result"))
    return [(a, r) for _, a, r in sorted(found, reverse=True)]


@pytest.fixture
def statements() -> Iterator[list[str]]:
    seen: list[str] = []

    def listen(_conn: Any, _cursor: Any, statement: str, *_args: Any) -> None:
        seen.append(statement)

    event.listen(Engine, "before_cursor_execute", listen)
    yield seen
    event.remove(Engine, "before_cursor_execute", listen)


def test_artifacts_are_paged_in_sql_with_bounded_work(
    env: Env, statements: list[str], monkeypatch: pytest.MonkeyPatch
) -> None:
    key = env.tenant("acme")
    other = env.tenant("globex")
    _artifacts(env, "acme", 40)
    _artifacts(env, "globex", 3)

    def no_listing(*_a: Any, **_k: Any) -> None:
        raise AssertionError("the store directory must not be listed per request")

    monkeypatch.setattr(env.store, "list", no_listing)
    server = env.serve()
    expected = _naive_listing(env, "acme")
    assert len(expected) == 40 * 3 + 14

    listed: list[tuple[str, str]] = []
    per_call: list[int] = []
    offset = 0
    while True:
        statements.clear()
        page = _get(server, key, "artifacts", limit=17, offset=offset)
        assert page.status_code == 200, page.text
        body = page.json()
        per_call.append(sum("training_checkpoints" in s for s in statements))
        assert body["total_count"] == len(expected) and len(body["artifacts"]) <= 17
        listed += [(a["artifact_id"], a["role"]) for a in body["artifacts"]]
        if not body["artifacts"]:
            break
        offset += 17
    assert listed == expected
    assert set(per_call) == {2}  # the page and the count, whatever the tenant holds
    first = _get(server, key, "artifacts", limit=1000).json()["artifacts"]
    checkpoint = next(a for a in first if a["role"] == "checkpoint")
    assert (
        checkpoint["tinker_path"].startswith("tinker://sess-acme:train:") and checkpoint["size_bytes"] >= 100
    )
    assert next(a for a in first if a["role"] == "result")["request_id"].startswith("fut-acme-")
    theirs = _get(server, other, "artifacts").json()
    assert theirs["total_count"] == 3 * 3 + 1 and all(
        "globex" in a["artifact_id"] for a in theirs["artifacts"]
    )
    huge = _get(server, key, "artifacts", offset=2**31)
    assert huge.status_code == 422 and huge.json()["error"]


def test_artifact_listing_work_does_not_grow_with_the_tenant(env: Env, statements: list[str]) -> None:
    key = env.tenant("acme")
    server = env.serve()
    _artifacts(env, "acme", 2)
    counts = []
    for grow in (0, 60):
        _more(env, grow)
        statements.clear()
        body = _get(server, key, "artifacts", limit=5).json()
        assert len(body["artifacts"]) == 5
        union = [s for s in statements if "training_checkpoints" in s]
        counts.append(len(union))
        assert all("LIMIT" in s.upper() for s in union if "count(" not in s.lower())
    assert counts == [2, 2]


def _more(env: Env, n: int) -> None:
    base = dt.datetime(2026, 2, 1, tzinfo=dt.UTC)
    with env.sessions.begin() as s:
        for i in range(n):
            s.add(
                FutureRow(
                    id=f"more-{i:04d}",
                    tenant_id="acme",
                    model_id=None,
                    seq_id=None,
                    request_type="sample",
                    state="completed",
                    actor="apikey:x",
                    request_sha256="00" * 32,
                    result_ref=f"more-{i:04d}.result",
                    attempts=1,
                    created_at=base + dt.timedelta(seconds=i),
                    updated_at=base,
                )
            )
