"""Fixtures for the API server tests: a migrated database, keys, a live server on loopback.

* ``tiny_model_dir`` (session): the tiny Llama of ``tests/training/conftest.py`` (same
  builder, loaded by path) saved with the real SmolLM2 tokenizer.
* ``server_env``: a migrated database (SQLite and PostgreSQL), a development KEK with
  minimal Argon2 parameters, an encrypted store and a model catalog serving
  ``TINY_MODEL`` from ``tiny_model_dir`` (also its configured tokenizer id: the client
  runs on the same host).
* ``live_server``: ``create_app`` served by uvicorn in a thread on a free loopback port.
"""

from __future__ import annotations

import importlib.util
import pathlib
import socket
import threading
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass, replace
from typing import Any

import pytest
from sqlalchemy import Engine
from sqlalchemy.orm import Session, sessionmaker

from tensafe.crypto.kdf import Argon2idParams
from tensafe.db import create_engine_from_url, make_session_factory
from tensafe.keys import KeyManager, LocalKekProvider
from tensafe.server import CatalogEntry, ModelCatalog, ServerSettings, create_app
from tensafe.server.privacy import OperatorPrivacy
from tensafe.server.tenants import create_api_key, create_tenant
from tensafe.storage import EncryptedArtifactStore, LocalFilesystemBackend

#: A loose operator privacy floor for tests (non-private runs allowed where the tenant allows them
#: too; a step on the tiny model moves the weights).
LOOSE = OperatorPrivacy(
    target_epsilon=50.0,
    delta=1e-3,
    clip_norm=10.0,
    dataset_size=64,
    expected_batch_size=8,
    max_steps=40,
    allow_non_private=True,
)

TINY_MODEL = "tensafe-test/tiny-llama"
_TRAINING_CONFTEST = pathlib.Path(__file__).parent.parent / "training" / "conftest.py"


def _training_helpers() -> Any:
    spec = importlib.util.spec_from_file_location("_tensafe_training_conftest", _TRAINING_CONFTEST)
    assert spec is not None and spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


@pytest.fixture(scope="session")
def tiny_model_dir(tmp_path_factory: pytest.TempPathFactory) -> pathlib.Path:
    """A local Hugging Face directory with the tiny Llama and the real SmolLM2 tokenizer."""
    from tensafe.training.models import load_tokenizer

    helpers = _training_helpers()
    tokenizer = load_tokenizer(helpers.REAL_MODEL_ID)
    directory = tmp_path_factory.mktemp("tiny-llama")
    model = helpers.build_tiny_llama(len(tokenizer), pad_token_id=tokenizer.pad_token_id)
    model.save_pretrained(str(directory), safe_serialization=True)
    tokenizer.save_pretrained(str(directory))
    return directory


@dataclass
class ServerEnv:
    """Everything a server test needs."""

    settings: ServerSettings
    engine: Engine
    sessions: sessionmaker[Session]
    keys: KeyManager
    store: EncryptedArtifactStore

    def tenant_key(self, tenant: str, **kwargs: Any) -> str:
        """Create ``tenant`` (if needed) and return a fresh API key for it."""
        from tensafe.db import Tenant

        with self.sessions.begin() as session:
            if session.get(Tenant, tenant) is None:
                create_tenant(session, tenant)
            key, _ = create_api_key(session, tenant, **kwargs)
        return key


@pytest.fixture
def server_env(
    migrated_database_url: str, tmp_path: pathlib.Path, tiny_model_dir: pathlib.Path
) -> Iterator[ServerEnv]:
    engine = create_engine_from_url(migrated_database_url)
    provider = LocalKekProvider.create(
        tmp_path / "keys" / "kek.json",
        passphrase=b"server tests passphrase 4711",
        params=Argon2idParams.minimum(),
    )
    keys = KeyManager(engine, provider)
    store = EncryptedArtifactStore(LocalFilesystemBackend(tmp_path / "artifacts"), keys)
    settings = ServerSettings(
        database_url=migrated_database_url,
        data_dir=tmp_path,
        # The tokenizer id is set explicitly: get_info never reveals a server directory by
        # itself, and here the client shares the server's host, so the path loads.
        catalog=ModelCatalog(
            {
                TINY_MODEL: CatalogEntry(
                    name=TINY_MODEL, source=str(tiny_model_dir), tokenizer_id=str(tiny_model_dir)
                )
            }
        ),
        long_poll_seconds=5.0,
        poll_interval_seconds=0.05,
    )
    yield ServerEnv(settings, engine, make_session_factory(engine), keys, store)
    keys.close()
    engine.dispose()


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port: int = s.getsockname()[1]
        return port


class LiveServer:
    """A uvicorn server in a thread; ``url`` is its base URL."""

    def __init__(self, app: Any) -> None:
        import uvicorn

        self.app = app
        self.port = _free_port()
        self.url = f"http://127.0.0.1:{self.port}"
        self._server = uvicorn.Server(
            uvicorn.Config(app, host="127.0.0.1", port=self.port, log_level="warning", lifespan="on")
        )
        self._thread = threading.Thread(target=self._server.run, daemon=True)

    def start(self) -> LiveServer:
        self._thread.start()
        deadline = time.monotonic() + 30
        while not self._server.started:
            if time.monotonic() > deadline or not self._thread.is_alive():
                raise RuntimeError("the test server did not start")
            time.sleep(0.02)
        return self

    def stop(self) -> None:
        self._server.should_exit = True
        self._thread.join(30)


@pytest.fixture
def start_server(server_env: ServerEnv) -> Iterator[Callable[..., LiveServer]]:
    """Start a live server; keyword arguments replace fields of the settings."""
    servers: list[LiveServer] = []

    def _start(**changes: Any) -> LiveServer:
        settings = replace(server_env.settings, **changes)
        app = create_app(settings, store=server_env.store, key_manager=server_env.keys)
        server = LiveServer(app).start()
        servers.append(server)
        return server

    yield _start
    for server in servers:
        server.stop()


@pytest.fixture
def live_server(start_server: Callable[..., LiveServer]) -> LiveServer:
    return start_server()


@pytest.fixture(params=["inline", "store"])
def payload_storage(request: pytest.FixtureRequest, monkeypatch: pytest.MonkeyPatch) -> str:
    """Run a test with small payloads sealed in the futures table, then with every payload in the store."""
    import tensafe.server.jobs

    if request.param == "store":
        monkeypatch.setattr(tensafe.server.jobs, "INLINE_MAX_BYTES", -1)
    return str(request.param)
