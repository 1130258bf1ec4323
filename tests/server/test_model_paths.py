"""``get_info`` and the model catalog reveal nothing about the server's disk.

Before the fix, ``get_info`` answered ``model_data.tokenizer_id = <absolute model
directory on the server>``. Any tenant could read where the operator keeps models and
data. Now the tokenizer id is the catalog name (a Hugging Face id for registry models),
or a ``tokenizer_id`` that the operator configured explicitly (``NAME=SOURCE|TOKENIZER``).
"""

from __future__ import annotations

import pathlib
from collections.abc import Callable
from typing import Any

import httpx
import pytest
from hypothesis import given
from hypothesis import strategies as st

from server.conftest import TINY_MODEL, LiveServer, ServerEnv
from tensafe.server import CatalogEntry, ModelCatalog, ServerConfigurationError, ServerSettings


@pytest.fixture
def database_url(tmp_path: pathlib.Path) -> str:
    """SQLite only: these tests are about the answers, not the database."""
    return f"sqlite:///{tmp_path / 'paths.db'}"


def _api(server: LiveServer, key: str) -> httpx.Client:
    return httpx.Client(base_url=server.url + "/api/v1", headers={"X-API-Key": key}, timeout=30)


def _created_model(c: httpx.Client, base_model: str) -> tuple[str, str]:
    """Open a session and create a model (the worker is off: it stays ``creating``)."""
    r = c.post("/create_session", json={"tags": [], "user_metadata": {}, "sdk_version": "0.38.0"})
    assert r.status_code == 200, r.text
    session_id = r.json()["session_id"]
    r = c.post(
        "/create_model",
        json={
            "session_id": session_id,
            "model_seq_id": 0,
            "base_model": base_model,
            "lora_config": {"rank": 4},
            "optimizer_config": {"type": "adamw"},
        },
    )
    assert r.status_code == 200, r.text
    return session_id, str(r.json()["model_id"])


def _secrets_of(server_env: ServerEnv, *dirs: pathlib.Path) -> list[str]:
    """Substrings that no answer may contain: the directories and the pytest base path."""
    paths = [str(server_env.settings.data_dir), *(str(d) for d in dirs)]
    return [*paths, *(str(pathlib.Path(p).resolve()) for p in paths), "pytest-of-"]


@pytest.mark.parametrize("available", [True, False], ids=["model-present", "model-missing"])
def test_get_info_and_neighbours_never_reveal_server_directories(
    start_server: Callable[..., LiveServer],
    server_env: ServerEnv,
    tiny_model_dir: pathlib.Path,
    tmp_path: pathlib.Path,
    available: bool,
) -> None:
    source = tiny_model_dir if available else tmp_path / "operator-secret-models" / "tiny"
    catalog = ModelCatalog({TINY_MODEL: CatalogEntry(name=TINY_MODEL, source=str(source))})
    server = start_server(catalog=catalog, run_worker=False)
    with _api(server, server_env.tenant_key("acme")) as c:
        session_id, model_id = _created_model(c, TINY_MODEL)
        info = c.post("/get_info", json={"model_id": model_id, "type": "get_info"})
        assert info.status_code == 200, info.text
        data = info.json()["model_data"]
        assert data["tokenizer_id"] == TINY_MODEL and data["model_name"] == TINY_MODEL
        assert data["arch"] == ("llama" if available else None)
        answers: dict[str, Any] = {
            "get_info": info,
            "capabilities": c.get("/get_server_capabilities"),
            "training_runs": c.get("/training_runs"),
            "training_run": c.get(f"/training_runs/{model_id}"),
            "session": c.get(f"/sessions/{session_id}"),
            "sampling_session": c.post(
                "/create_sampling_session",
                json={"session_id": session_id, "sampling_session_seq_id": 0, "base_model": TINY_MODEL},
            ),
            "sampler": c.get(f"/samplers/{session_id}:sample:0"),
        }
    for name, answer in answers.items():
        assert answer.status_code == 200, (name, answer.text)
        for secret in _secrets_of(server_env, source, tiny_model_dir):
            assert secret not in answer.text, (name, secret)


@pytest.mark.parametrize("broken", ["missing", "not-a-model"])
def test_a_model_that_cannot_be_prepared_fails_without_naming_its_directory(
    start_server: Callable[..., LiveServer], server_env: ServerEnv, tmp_path: pathlib.Path, broken: str
) -> None:
    """The job's failure and get_info's 400 say the model is unavailable, not where it was looked for."""
    source = tmp_path / "operator-secret-models" / "tiny"
    if broken == "not-a-model":
        source.mkdir(parents=True)  # a directory without config.json
    catalog = ModelCatalog({TINY_MODEL: CatalogEntry(name=TINY_MODEL, source=str(source))})
    server = start_server(catalog=catalog)
    with _api(server, server_env.tenant_key("acme")) as c:
        r = c.post("/create_session", json={"tags": [], "user_metadata": {}, "sdk_version": "0.38.0"})
        session_id = r.json()["session_id"]
        r = c.post(
            "/create_model",
            json={
                "session_id": session_id,
                "model_seq_id": 0,
                "base_model": TINY_MODEL,
                "lora_config": {"rank": 4},
                "optimizer_config": {"type": "adamw"},
            },
        )
        assert r.status_code == 200, r.text
        request_id, model_id = r.json()["request_id"], r.json()["model_id"]
        for _ in range(20):
            failed = c.post("/retrieve_future", json={"request_id": request_id})
            if failed.status_code != 408:
                break
        assert failed.status_code == 200 and failed.json()["category"] == "user", failed.text
        assert "not available on this server" in failed.json()["error"]
        info = c.post("/get_info", json={"model_id": model_id})
    assert info.status_code == 400 and "not available on this server" in info.json()["detail"]
    for answer in (failed, info):
        for secret in [*_secrets_of(server_env, source), "operator-secret-models", "config.json"]:
            assert secret not in answer.text, (secret, answer.text)


def test_a_configured_tokenizer_id_is_what_get_info_answers(
    start_server: Callable[..., LiveServer], server_env: ServerEnv, tiny_model_dir: pathlib.Path
) -> None:
    catalog = ModelCatalog.parse(f"{TINY_MODEL}={tiny_model_dir}|HuggingFaceTB/SmolLM2-135M-Instruct")
    server = start_server(catalog=catalog, run_worker=False)
    with _api(server, server_env.tenant_key("acme")) as c:
        _, model_id = _created_model(c, TINY_MODEL)
        data = c.post("/get_info", json={"model_id": model_id}).json()["model_data"]
    assert data["tokenizer_id"] == "HuggingFaceTB/SmolLM2-135M-Instruct"


def test_the_official_sdk_loads_an_explicitly_configured_local_tokenizer(
    live_server: LiveServer, server_env: ServerEnv, tiny_model_dir: pathlib.Path
) -> None:
    """Same host: the test catalog names the model directory as its tokenizer id, on purpose."""
    tinker = pytest.importorskip("tinker")
    service = tinker.ServiceClient(base_url=live_server.url, api_key=server_env.tenant_key("acme"))
    try:
        training = service.create_lora_training_client(base_model=TINY_MODEL, rank=4).result()
        assert training.get_info().model_data.tokenizer_id == str(tiny_model_dir)
        tokenizer = training.get_tokenizer()
        assert tokenizer.decode(tokenizer.encode("Hello", add_special_tokens=False)) == "Hello"
    finally:
        service.close("success").result()


# --------------------------------------------------------------------------- the catalog


def test_default_tokenizer_id_is_the_name_up_to_its_first_colon() -> None:
    assert CatalogEntry(name="Qwen/Qwen3-8B", source="/srv/m/qwen").client_tokenizer_id == "Qwen/Qwen3-8B"
    assert CatalogEntry(name="Qwen/Qwen3-8B:32k", source="/srv/m/q").client_tokenizer_id == "Qwen/Qwen3-8B"
    explicit = CatalogEntry(name="acme/private", source="/srv/m/p", tokenizer_id="/opt/shared/tok")
    assert explicit.client_tokenizer_id == "/opt/shared/tok"
    for entry in ModelCatalog.default().entries.values():
        assert entry.client_tokenizer_id == entry.name and "/" in entry.name  # Hugging Face ids


def test_catalog_syntax_with_tokenizer() -> None:
    catalog = ModelCatalog.parse(" a/b = /srv/m/ab | org/tok ; c=/srv/m/c ;")
    assert catalog.entries["a/b"] == CatalogEntry(name="a/b", source="/srv/m/ab", tokenizer_id="org/tok")
    assert catalog.entries["c"] == CatalogEntry(name="c", source="/srv/m/c", tokenizer_id=None)
    settings = ServerSettings.from_environment(
        {"DATABASE_URL": "sqlite:///unused.db", "TS_SERVER_MODELS": "x=/srv/x|/opt/tok/x"}
    )
    assert settings.catalog.entries["x"].client_tokenizer_id == "/opt/tok/x"


@pytest.mark.parametrize(
    "text",
    ["a=/srv/m|", "a=/srv/m|  ", "a=/srv/m|C:/models/tok", "a=/srv/m|org/tok:v2", "=/srv/m|t", "a=|t"],
)
def test_bad_tokenizer_syntax_stops_the_server(text: str) -> None:
    with pytest.raises(ServerConfigurationError, match=r"NAME=SOURCE|tokenizer id"):
        ModelCatalog.parse(text)


@pytest.mark.parametrize("bad", ["", " ", "org/tok:rev", "tok\nname", "tok\x7f"])
def test_a_configured_tokenizer_id_must_survive_the_sdk(bad: str) -> None:
    with pytest.raises(ServerConfigurationError, match="tokenizer id"):
        CatalogEntry(name="m", source="/srv/m", tokenizer_id=bad)


_PART = st.text(
    alphabet=st.characters(codec="ascii", categories=("L", "N"), include_characters="/._-"), min_size=1
).filter(lambda s: s.strip() == s)


@given(name=_PART, source=_PART, tokenizer=st.none() | _PART)
def test_parse_round_trips_and_never_hands_out_the_source(
    name: str, source: str, tokenizer: str | None
) -> None:
    text = f"{name}={source}" + ("" if tokenizer is None else f"|{tokenizer}")
    entry = ModelCatalog.parse(text).entries[name]
    assert (entry.name, entry.source, entry.tokenizer_id) == (name, source, tokenizer)
    # The id clients get is the configured one or the name: the source only if the operator said so.
    assert entry.client_tokenizer_id == (tokenizer if tokenizer is not None else name)
