"""Fixtures of the OpenAI-compatible API tests: an engine per engine kind, a served router, references.

* ``engine_kind`` (module, parametrized by :data:`ENGINE_KINDS`), ``model_dir`` (its tiny model's
  directory, from the fixture named in :data:`ENGINE_MODEL_DIRS`) and ``engine`` (a started engine
  on it served as :data:`MODEL`, from :data:`ENGINE_STARTERS`). The vLLM engine adds its kind to
  these three tables (slow-marked); every test that takes ``engine`` (directly or through
  ``api``) then runs against both.
* ``adapters`` (module): three random non-zero PEFT adapters (``make_lora_adapter``) for
  ``model_dir``, of different ranks and seeds, whose greedy outputs differ.
* ``api``: the bare router (:func:`tensafe.serving.api.build_openai_app`) served by uvicorn on
  loopback, with a registry on a real audit log (SQLite) and an in-memory adapter source:
  ``acme`` owns ``acme-a`` and ``acme-b``, ``globex`` owns ``globex-c``; API keys
  ``key-acme`` and ``key-globex``. ``api.client(tenant)`` is an ``openai.OpenAI`` client.
  The checkpoint source and the real API-key authentication are tested through the server
  mount (``test_server_mount.py``).
* :func:`reference_greedy`: the independent reference, ``transformers`` + ``peft`` with the
  adapter written to a temporary directory, greedy, one full forward pass per token, returning
  the token ids and the log-softmax of each chosen token and of every vocabulary entry.
"""

from __future__ import annotations

import asyncio
import pathlib
import socket
import tempfile
import threading
import time
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass, field
from typing import Any

import pytest
from fastapi import Request

# The server's fixtures (a migrated database, keys, the encrypted store, the tiny model's catalog)
# for test_server_mount.py.
from server.conftest import server_env, start_server, tiny_model_dir  # noqa: F401
from serving.vllm.conftest import vllm_model_dir, vllm_python  # noqa: F401 - fixtures of the vllm kind
from tensafe.audit import AuditLog
from tensafe.db import create_engine_from_url, ensure_tenant, make_session_factory, upgrade
from tensafe.serving.api import build_openai_app
from tensafe.serving.engine import Engine, LoraAdapter
from tensafe.serving.errors import ModelNotFoundError, UnauthenticatedError
from tensafe.serving.registry import AdapterRef, AdapterRegistry, ModelEntry, ServingCaller

#: The base model's name (``tests/serving/conftest.py``'s ``SERVING_MODEL``).
MODEL = "tensafe-test/tiny-llama"
KEYS = {"key-acme": "acme", "key-globex": "globex"}
OWNERS = {"acme-a": "acme", "acme-b": "acme", "globex-c": "globex"}


def _start_transformers(_request: pytest.FixtureRequest, model_dir: pathlib.Path) -> Engine:
    from tensafe.serving.engines.transformers import TransformersEngine

    return asyncio.run(
        TransformersEngine.start(
            str(model_dir),
            model_name=MODEL,
            max_loras=4,
            max_lora_rank=16,
            max_num_seqs=16,
            max_model_len=256,
        )
    )


#: Engine kinds the API suite runs against (``pytest.param(..., marks=pytest.mark.slow)`` for slow ones).
ENGINE_KINDS: list[Any] = ["transformers"]
#: How each kind is started (served as :data:`MODEL`, context 256 tokens): ``starter(request, model_dir)``.
ENGINE_STARTERS: dict[str, Callable[[pytest.FixtureRequest, pathlib.Path], Engine]] = {
    "transformers": _start_transformers
}
#: The fixture that gives each kind's model directory (the adapters and the reference use it too).
ENGINE_MODEL_DIRS: dict[str, str] = {"transformers": "serving_model_dir"}


def _start_vllm(request: pytest.FixtureRequest, model_dir: pathlib.Path) -> Engine:
    # vLLM in its own environment (tests/serving/vllm/conftest.py: skipped without
    # TENSAFE_VLLM_PYTHON outside CI); its CPU attention needs heads of 32+, hence its model dir.
    from tensafe.serving.engines.vllm import VllmEngine

    python = request.getfixturevalue("vllm_python")
    return asyncio.run(
        VllmEngine.start(
            str(model_dir),
            vllm_python=python,
            model_name=MODEL,
            max_loras=4,
            max_lora_rank=16,
            max_num_seqs=16,
            max_model_len=256,
        )
    )


ENGINE_KINDS.append(pytest.param("vllm", marks=pytest.mark.slow))
ENGINE_STARTERS["vllm"] = _start_vllm
ENGINE_MODEL_DIRS["vllm"] = "vllm_model_dir"


@pytest.fixture(scope="module", params=ENGINE_KINDS)
def engine_kind(request: pytest.FixtureRequest) -> str:
    kind: str = request.param
    return kind


@pytest.fixture(scope="module")
def model_dir(request: pytest.FixtureRequest, engine_kind: str) -> pathlib.Path:
    directory: pathlib.Path = request.getfixturevalue(ENGINE_MODEL_DIRS[engine_kind])
    return directory


@pytest.fixture(scope="module")
def engine(request: pytest.FixtureRequest, engine_kind: str, model_dir: pathlib.Path) -> Iterator[Engine]:
    started = ENGINE_STARTERS[engine_kind](request, model_dir)
    try:
        yield started
    finally:
        asyncio.run(started.close())


@pytest.fixture(scope="module")
def adapters(
    model_dir: pathlib.Path, make_lora_adapter: Callable[..., LoraAdapter]
) -> dict[str, LoraAdapter]:
    return {
        "acme-a": make_lora_adapter(model_dir, rank=4, seed=11, base_model_id=MODEL),
        "acme-b": make_lora_adapter(model_dir, rank=8, seed=22, base_model_id=MODEL),
        "globex-c": make_lora_adapter(
            model_dir, rank=2, seed=33, base_model_id=MODEL, targets=("q_proj", "v_proj")
        ),
    }


@dataclass
class MemorySource:
    """Adapters in memory by name (a test source; the checkpoint source is tested on the server)."""

    adapters: dict[str, LoraAdapter]
    name: str = "memory"
    gone: set[str] = field(default_factory=set)

    def resolve(self, caller: ServingCaller, model: str) -> AdapterRef | None:
        if model not in OWNERS:
            return None
        if OWNERS[model] != caller.tenant or model in self.gone:
            raise ModelNotFoundError("not visible")
        return AdapterRef(source=self.name, name=model, tenant=caller.tenant, base_model=MODEL, version="1")

    def fetch(self, ref: AdapterRef) -> LoraAdapter:
        return self.adapters[ref.name]

    def check(self, ref: AdapterRef) -> None:
        if ref.name in self.gone:
            raise ModelNotFoundError("gone")

    def list_models(self, caller: ServingCaller) -> Sequence[ModelEntry]:
        return [ModelEntry(id=n, owned_by=t, root=MODEL) for n, t in OWNERS.items() if t == caller.tenant]


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port: int = s.getsockname()[1]
        return port


class Uvicorn:
    """An ASGI app served by uvicorn in a thread on a free loopback port."""

    def __init__(self, app: Any) -> None:
        import uvicorn

        self.port = free_port()
        self.url = f"http://127.0.0.1:{self.port}"
        self.server = uvicorn.Server(
            uvicorn.Config(app, host="127.0.0.1", port=self.port, log_level="warning", lifespan="off")
        )
        self.thread = threading.Thread(target=self.server.run, daemon=True)

    def __enter__(self) -> Uvicorn:
        self.thread.start()
        deadline = time.monotonic() + 30
        while not self.server.started:
            if time.monotonic() > deadline or not self.thread.is_alive():
                raise RuntimeError("the test server did not start")
            time.sleep(0.02)
        return self

    def __exit__(self, *_: object) -> None:
        self.server.should_exit = True
        self.thread.join(30)


@dataclass
class Api:
    """The served router and what the tests inspect."""

    url: str
    engine: Engine
    registry: AdapterRegistry
    source: MemorySource
    db_url: str
    engine_for: list[Engine]

    def client(self, tenant: str = "acme", **kwargs: Any) -> Any:
        import openai

        key = next(k for k, t in KEYS.items() if t == tenant)
        return openai.OpenAI(base_url=f"{self.url}/v1", api_key=key, max_retries=0, timeout=60, **kwargs)


async def _authenticate(request: Request) -> ServingCaller:
    header = request.headers.get("authorization", "")
    tenant = KEYS.get(header.removeprefix("Bearer ").strip())
    if tenant is None:
        raise UnauthenticatedError("Incorrect API key provided.")
    return ServingCaller(tenant=tenant, actor=f"apikey:{tenant}-1")


@pytest.fixture
def api(engine: Engine, adapters: dict[str, LoraAdapter], tmp_path: pathlib.Path) -> Iterator[Api]:
    db_url = f"sqlite:///{tmp_path / 'api.db'}"
    upgrade(db_url)
    db = create_engine_from_url(db_url)
    sessions = make_session_factory(db)
    with sessions.begin() as session:
        ensure_tenant(session, "acme", name="ACME")
        ensure_tenant(session, "globex", name="Globex")
    source = MemorySource(adapters)
    current = [engine]  # a test may wrap the engine (engine_for returns current[0])

    async def engine_for(name: str) -> Engine:
        if name != MODEL:
            raise ModelNotFoundError(name)
        return current[0]

    registry = AdapterRegistry(
        sources=[source],
        engine_for=engine_for,
        base_models=[MODEL],
        max_resident=3,
        audit=AuditLog(sessions, signer=None, checkpoint_every=None),
        recheck_seconds=0,
    )
    app = build_openai_app(registry=registry, authenticate=_authenticate)
    try:
        with Uvicorn(app) as server:
            yield Api(server.url, engine, registry, source, db_url, current)
    finally:
        for adapter_id in engine.resident_adapters():
            asyncio.run(engine.unload_adapter(adapter_id))
        db.dispose()


# --------------------------------------------------------------------------- the reference


@dataclass(frozen=True)
class Reference:
    """Greedy tokens of transformers + PEFT and the log-softmax at each step."""

    token_ids: list[int]
    logprobs: list[float]
    top: list[dict[int, float]]
    text: str


_REFERENCE_MODELS: dict[tuple[str, str | None], Any] = {}


def reference_model(model_dir: pathlib.Path, adapter: LoraAdapter | None) -> Any:
    """The base model, with ``adapter`` applied by ``peft`` from files on disk (cached per adapter)."""
    import torch
    from peft import PeftModel
    from transformers import AutoModelForCausalLM

    key = (str(model_dir), None if adapter is None else adapter.adapter_id)
    if key not in _REFERENCE_MODELS:
        model = AutoModelForCausalLM.from_pretrained(
            str(model_dir), dtype=torch.float32, local_files_only=True
        )
        if adapter is not None:
            with tempfile.TemporaryDirectory(prefix="tensafe-test-ref-") as tmp:
                for name, data in adapter.files.items():
                    (pathlib.Path(tmp) / name).write_bytes(data)
                model = PeftModel.from_pretrained(model, tmp)
        model.eval()
        _REFERENCE_MODELS[key] = model
    return _REFERENCE_MODELS[key]


def reference_greedy(
    model_dir: pathlib.Path,
    adapter: LoraAdapter | None,
    prompt_ids: Sequence[int],
    max_tokens: int,
    *,
    stop_at_eos: bool = True,
    k: int = 5,
) -> Reference:
    import torch
    from transformers import AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(str(model_dir), local_files_only=True)
    model = reference_model(model_dir, adapter)
    ids = list(prompt_ids)
    out: list[int] = []
    logprobs: list[float] = []
    tops: list[dict[int, float]] = []
    with torch.no_grad():
        for _ in range(max_tokens):
            logits = model(input_ids=torch.tensor([ids])).logits[0, -1].to(torch.float64)
            logp = torch.log_softmax(logits, dim=-1)
            token = int(torch.argmax(logp))
            values, indices = torch.topk(logp, k)
            tops.append({int(i): float(v) for v, i in zip(values, indices, strict=True)})
            out.append(token)
            logprobs.append(float(logp[token]))
            ids.append(token)
            if stop_at_eos and token == tokenizer.eos_token_id:
                break
    text_ids = [t for t in out if not (stop_at_eos and t == tokenizer.eos_token_id)]
    text = tokenizer.decode(text_ids, skip_special_tokens=True, clean_up_tokenization_spaces=False)
    return Reference(out, logprobs, tops, text)
