"""The lifecycle of a running ``tensafe serve``: expiry, the operator's load/unload, who is admin.

The server runs in process (:class:`~tensafe.serving.standalone.StandaloneServer` on the real
``TransformersEngine`` and the tiny model, served by :func:`run_standalone` with uvicorn on a
loopback port, in its own thread); requests go over HTTP. The audit log is the real one.
"""

from __future__ import annotations

import asyncio
import datetime as dt
import json
import os
import pathlib
import secrets
import threading
import time
from collections.abc import Callable, Iterator
from typing import Any

import httpx
import pytest
from sqlalchemy import select

from serving.standalone.conftest import BASE, ServeKeys
from serving.standalone.test_serve import free_port
from tensafe.audit import AuditLog
from tensafe.audit.models import AuditRecordRow
from tensafe.db import create_engine_from_url, make_session_factory, upgrade
from tensafe.server.tenants import create_api_key, create_tenant
from tensafe.serving.errors import AdapterRefusedError
from tensafe.serving.packages import PackageAdmission
from tensafe.serving.standalone import ADMIN_ACTOR, AdminToken, StandaloneServer, run_standalone


class Running:
    """A started StandaloneServer served in a thread; ``url`` is its base URL."""

    def __init__(self, serving_model_dir: pathlib.Path, **start: Any) -> None:
        self.port = free_port()
        self.url = f"http://127.0.0.1:{self.port}"
        self._start = start
        self._model_dir = serving_model_dir
        self._ready = threading.Event()
        self._stop = threading.Event()
        self.error: BaseException | None = None
        self.server: StandaloneServer | None = None
        self._thread = threading.Thread(target=self._run, daemon=True)
        self._thread.start()
        deadline = time.monotonic() + 120
        while not self._ready.wait(0.05):
            if self.error is not None or time.monotonic() > deadline:
                raise AssertionError(f"the server did not start: {self.error!r}")

    def _run(self) -> None:
        async def main() -> None:
            from tensafe.serving.engines.transformers import TransformersEngine

            async def start_engine() -> Any:
                return await TransformersEngine.start(
                    str(self._model_dir),
                    model_name=BASE,
                    max_loras=4,
                    max_lora_rank=8,
                    max_num_seqs=4,
                    max_model_len=256,
                )

            self.server = await StandaloneServer.start(start_engine=start_engine, **self._start)
            await run_standalone(
                self.server, host="127.0.0.1", port=self.port, started=self._ready.set, stop=self._stop
            )

        try:
            asyncio.run(main())
        except BaseException as exc:
            self.error = exc

    def stop(self) -> None:
        self._stop.set()
        self._thread.join(60)


class Setup:
    def __init__(self, root: pathlib.Path, keys: ServeKeys, model_dir: pathlib.Path) -> None:
        self.url = f"sqlite:///{root / 'lifecycle.db'}"
        upgrade(self.url)
        self.db = create_engine_from_url(self.url)
        self.sessions = make_session_factory(self.db)
        with self.sessions.begin() as session:
            create_tenant(session, "acme")
            self.key, _ = create_api_key(session, "acme")
        self.keys = keys
        self.model_dir = model_dir
        self.audit = AuditLog(self.sessions, signer=None, checkpoint_every=None)
        self.running: list[Running] = []

    def start(self, packages: list[pathlib.Path], **kwargs: Any) -> Running:
        admission = PackageAdmission(
            trust=[self.keys.publisher.verifying_key()],
            recipient_key=self.keys.recipient,
            policy=None,
            state=None,
            audit=None,
            base_model=BASE,
            base_model_sha256=None,
        )
        kwargs.setdefault("admin_token", None)
        kwargs.setdefault("recheck_seconds", 30.0)
        running = Running(
            self.model_dir,
            tenant="acme",
            admission=admission,
            packages=packages,
            audit_log=self.audit,
            sessions=self.sessions,
            max_resident=4,
            **kwargs,
        )
        self.running.append(running)
        return running

    def records(self, action: str | None = None) -> list[AuditRecordRow]:
        with self.sessions() as session:
            rows = list(
                session.execute(
                    select(AuditRecordRow)
                    .where(AuditRecordRow.tenant_id == "acme")
                    .order_by(AuditRecordRow.seq)
                ).scalars()
            )
        return [r for r in rows if action is None or r.action == action]


@pytest.fixture
def setup(tmp_path: pathlib.Path, serve_keys: ServeKeys, serving_model_dir: pathlib.Path) -> Iterator[Setup]:
    s = Setup(tmp_path, serve_keys, serving_model_dir)
    yield s
    for running in s.running:
        running.stop()
    s.db.dispose()


def _complete(client: httpx.Client, url: str, key: str, model: str) -> httpx.Response:
    return client.post(
        f"{url}/v1/completions",
        headers={"Authorization": f"Bearer {key}"},
        json={"model": model, "prompt": "Hello", "max_tokens": 3, "temperature": 0},
    )


def test_an_expired_package_is_unloaded_and_answered_404_saying_so(
    setup: Setup, make_package: Callable[..., pathlib.Path]
) -> None:
    package = make_package(expires_in=dt.timedelta(seconds=8))
    running = setup.start([package], recheck_seconds=0.2)
    server = running.server
    assert server is not None
    with httpx.Client(timeout=60) as client:
        assert _complete(client, running.url, setup.key, "clinical").status_code == 200
        assert len(server.engine.resident_adapters()) == 1
        deadline = time.monotonic() + 30
        while server.engine.resident_adapters():  # the periodic sweep, not a request, unloads it
            assert time.monotonic() < deadline, "the expired adapter stayed loaded"
            time.sleep(0.1)
        unloaded = [json.loads(r.details) for r in setup.records("serving.adapter.unloaded")]
        assert unloaded and unloaded[-1]["reason"] == "invalid" and "expired" in unloaded[-1]["why"]
        for model in ("clinical", "clinical@1.0.0"):
            answer = _complete(client, running.url, setup.key, model)
            assert answer.status_code == 404
            assert "expired at" in answer.json()["error"]["message"]
        models = client.get(f"{running.url}/v1/models", headers={"Authorization": f"Bearer {setup.key}"})
        assert [m["id"] for m in models.json()["data"]] == [BASE]
    assert not server.engine.resident_adapters()
    refused = [json.loads(r.details) for r in setup.records("serving.adapter.refused")]
    assert refused and refused[-1]["reason"] == "unavailable"


@pytest.fixture
def token_file(tmp_path: pathlib.Path) -> tuple[pathlib.Path, str]:
    token = secrets.token_urlsafe(32)
    path = tmp_path / "admin.token"
    path.write_text(token + "\n")
    path.chmod(0o600)
    return path, token


def test_only_the_operator_loads_and_unloads_at_runtime(
    setup: Setup,
    make_package: Callable[..., pathlib.Path],
    token_file: tuple[pathlib.Path, str],
    serve_keys: ServeKeys,
) -> None:
    path, token = token_file
    running = setup.start([make_package()], admin_token=AdminToken.from_file(path))
    url = running.url
    admin = {"Authorization": f"Bearer {token}"}
    tenant = {"Authorization": f"Bearer {setup.key}"}
    radiology = make_package(name="radiology", version="2.0.0")
    with httpx.Client(timeout=60) as client:
        # Who is admin: the token only; never a tenant's API key, a wrong token or nothing.
        for headers in ({}, tenant, {"X-API-Key": setup.key}, {"Authorization": "Bearer " + "x" * 43}):
            assert client.get(f"{url}/admin/adapters", headers=headers).status_code == 401
            assert (
                client.post(
                    f"{url}/admin/adapters", headers=headers, json={"path": str(radiology)}
                ).status_code
                == 401
            )
            assert client.delete(f"{url}/admin/adapters/clinical", headers=headers).status_code == 401
        assert _complete(client, url, setup.key, "radiology").status_code == 404
        assert _complete(client, url, setup.key, "clinical").status_code == 200
        listing = client.get(f"{url}/admin/adapters", headers=admin).json()["data"]
        assert [(a["id"], a["resident"], a["expired"]) for a in listing] == [("clinical", True, False)]

        # Load by path.
        loaded = client.post(f"{url}/admin/adapters", headers=admin, json={"path": str(radiology)})
        assert loaded.status_code == 201, loaded.text
        assert loaded.json()["models"] == ["radiology", "radiology@2.0.0"]
        assert _complete(client, url, setup.key, "radiology@2.0.0").status_code == 200

        # Upload a newer version of clinical: it replaces 1.0.0.
        newer = make_package(version="1.1.0").read_bytes()
        uploaded = client.post(
            f"{url}/admin/adapters",
            headers={**admin, "Content-Type": "application/octet-stream"},
            content=newer,
        )
        assert uploaded.status_code == 201, uploaded.text
        assert uploaded.json()["replaced"] == "1.0.0"
        assert _complete(client, url, setup.key, "clinical@1.0.0").status_code == 404
        assert _complete(client, url, setup.key, "clinical@1.1.0").status_code == 200

        # Refusals at runtime: tampered, untrusted signer. Nothing changes; everyone keeps being served.
        tampered = bytearray(make_package(name="oncology").read_bytes())
        tampered[-2] ^= 0x10
        bad = client.post(
            f"{url}/admin/adapters",
            headers={**admin, "Content-Type": "application/octet-stream"},
            content=bytes(tampered),
        )
        assert bad.status_code == 403 and "failed to decrypt" in bad.json()["error"]["message"]
        stranger = make_package(name="oncology", signing_keys=[serve_keys.stranger])
        untrusted = client.post(f"{url}/admin/adapters", headers=admin, json={"path": str(stranger)})
        assert untrusted.status_code == 403 and "trust store" in untrusted.json()["error"]["message"]
        assert client.post(f"{url}/admin/adapters", headers=admin, json={"nope": 1}).status_code == 400
        assert _complete(client, url, setup.key, "oncology").status_code == 404
        assert _complete(client, url, setup.key, "clinical").status_code == 200

        # Unload.
        deleted = client.delete(f"{url}/admin/adapters/radiology", headers=admin)
        assert deleted.status_code == 200 and deleted.json()["deleted"] is True
        assert _complete(client, url, setup.key, "radiology").status_code == 404
        assert client.delete(f"{url}/admin/adapters/radiology", headers=admin).status_code == 404
        listing = client.get(f"{url}/admin/adapters", headers=admin).json()["data"]
        assert [(a["id"], a["version"]) for a in listing] == [("clinical", "1.1.0")]

    server = running.server
    assert server is not None and len(server.engine.resident_adapters()) == 1
    by_operator = [r for r in setup.records() if r.actor == ADMIN_ACTOR]
    actions = [r.action for r in by_operator]
    assert actions.count("serving.adapter.loaded") == 2  # radiology, clinical 1.1.0
    assert "tssp.decrypt.failed" in actions and "tssp.signer.untrusted" in actions
    assert actions.count("serving.adapter.refused") == 2
    admin_unloads = [json.loads(r.details) for r in by_operator if r.action == "serving.adapter.unloaded"]
    assert [d["reason"] for d in admin_unloads] == ["admin"]
    replaced = [
        json.loads(r.details)
        for r in setup.records("serving.adapter.unloaded")
        if json.loads(r.details)["reason"] == "invalid"
    ]
    assert len(replaced) == 1  # clinical 1.0.0 left the engine when 1.1.0 replaced it
    assert token not in json.dumps([[r.actor, r.resource, r.details] for r in setup.records()])


def test_admin_routes_are_closed_without_a_token(
    setup: Setup, make_package: Callable[..., pathlib.Path]
) -> None:
    running = setup.start([make_package()])
    with httpx.Client(timeout=60) as client:
        closed = client.get(f"{running.url}/admin/adapters", headers={"Authorization": "Bearer " + "a" * 40})
    assert closed.status_code == 401 and "disabled" in closed.json()["error"]["message"]


def test_the_admin_token_file_must_be_private_and_strong(tmp_path: pathlib.Path) -> None:
    path = tmp_path / "token"
    path.write_text(secrets.token_urlsafe(32))
    path.chmod(0o640)
    with pytest.raises(AdapterRefusedError, match="chmod 600"):
        AdminToken.from_file(path)
    path.chmod(0o600)
    token = AdminToken.from_file(path)
    assert token.matches(path.read_text().strip()) and not token.matches("x" * 43) and not token.matches(None)
    assert "hidden" in repr(token)
    path.write_text("short\n")
    with pytest.raises(AdapterRefusedError, match="at least 32"):
        AdminToken.from_file(path)
    with pytest.raises(AdapterRefusedError, match="cannot read"):
        AdminToken.from_file(tmp_path / "missing")
    os.symlink(path, tmp_path / "link")
    with pytest.raises(AdapterRefusedError, match="cannot read"):
        AdminToken.from_file(tmp_path / "link")


def test_a_revoked_package_or_signer_is_unloaded_and_refused(
    setup: Setup, make_package: Callable[..., pathlib.Path], serve_keys: ServeKeys, tmp_path: pathlib.Path
) -> None:
    from tensafe.package import inspect

    revocations = tmp_path / "revoked.txt"
    revocations.write_text("# nothing withdrawn yet\n")
    clinical = make_package()
    radiology = make_package(name="radiology")
    running = setup.start([clinical, radiology], recheck_seconds=0.2, revocation_list=revocations)
    server = running.server
    assert server is not None
    with httpx.Client(timeout=60) as client:
        for model in ("clinical", "radiology"):
            assert _complete(client, running.url, setup.key, model).status_code == 200
        assert len(server.engine.resident_adapters()) == 2
        # The operator withdraws clinical's package by its header digest, while the server runs.
        revocations.write_text(f"package:{inspect(clinical).header_sha256}  # leaked\n")
        deadline = time.monotonic() + 30
        while len(server.engine.resident_adapters()) != 1:
            assert time.monotonic() < deadline, "the revoked adapter stayed loaded"
            time.sleep(0.1)
        answer = _complete(client, running.url, setup.key, "clinical")
        assert answer.status_code == 404 and "revoked" in answer.json()["error"]["message"]
        assert _complete(client, running.url, setup.key, "radiology").status_code == 200
        # A list that becomes malformed keeps the last good one (clinical stays withdrawn).
        revocations.write_text("not an entry\n")
        time.sleep(0.6)
        assert _complete(client, running.url, setup.key, "clinical").status_code == 404
        assert _complete(client, running.url, setup.key, "radiology").status_code == 200
    unloaded = [json.loads(r.details) for r in setup.records("serving.adapter.unloaded")]
    assert any(d["reason"] == "invalid" and "revoked" in d["why"] for d in unloaded)


def test_a_package_of_a_revoked_signer_does_not_start(
    setup: Setup, make_package: Callable[..., pathlib.Path], serve_keys: ServeKeys, tmp_path: pathlib.Path
) -> None:
    from tensafe.serving.standalone import read_revocation_list

    revocations = tmp_path / "revoked.txt"
    revocations.write_text(f"signer:{serve_keys.publisher.key_id}\n")
    package = make_package()
    with pytest.raises(AssertionError, match=r"its signer .* was revoked"):  # the start fails
        setup.start([package], revocation_list=revocations)
    refused = [json.loads(r.details) for r in setup.records("serving.adapter.refused")]
    assert refused and "revoked" in refused[-1]["why"]
    revocations.write_text("package:zz\n")
    with pytest.raises(AdapterRefusedError, match="line 1"):
        read_revocation_list(revocations)
