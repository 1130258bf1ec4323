"""Configuration from the environment: every variable TenSafe reads, parsed in one place.

This module is the only code in ``src/`` that touches ``os.environ`` (a test greps for any
other). It is the bottom layer next to :mod:`tensafe.errors`, so every package can use it.
Every variable is listed, with its default and meaning, in ``docs/configuration.md``.

Two kinds of readers:

* **Shared settings** that several layers need are parsed here into typed values, with one
  default and one error message each: :func:`environment` (``TS_ENVIRONMENT``),
  :func:`database_url` (``DATABASE_URL``), :func:`data_dir` (``TS_DATA_DIR``),
  :func:`audit_checkpoint_every` (``TS_AUDIT_CHECKPOINT_EVERY``), :func:`pqc_required`
  (``TS_PQC_REQUIRED``), :func:`deterministic` (``TS_DETERMINISTIC``), :func:`model_cache_dir`
  (``TENSAFE_MODEL_CACHE``), :func:`tssp_state_path`, and the SDK's
  :func:`client_base_url`, :func:`client_api_key`, :func:`client_project_id`,
  :func:`client_allow_insecure_http`, :func:`client_ca_bundle`. :func:`load_config` reads all
  of them at once into a :class:`Config`.
* **Groups** that belong to one component (``TS_SERVER_*`` and ``TS_DP_*`` for the server, the
  key providers' ``TS_KEK_PROVIDER``, ``TS_VAULT_*``, ``TS_PKCS11_*``, ...) are parsed by that
  component's settings class (``ServerSettings.from_environment``,
  ``KeySettings.from_environment``) from the snapshot :func:`environ` returns here, and use
  the shared parsers above for the shared variables.

Every function takes an optional ``env`` mapping (default: the process environment, read at
the call) so that a caller or a test can supply its own. Values are read when a command or an
app starts, never cached at import: a variable set before that takes effect.

Library code never writes the environment. The one write, :func:`set_offline_defaults`
(``HF_HUB_OFFLINE=1``, ``TRANSFORMERS_OFFLINE=1`` unless set), is called only by the ``tensafe``
command's entry point, before any Hugging Face library is imported: those libraries read the
variables once, at import. Library code loads models with ``local_files_only=True`` instead.
"""

from __future__ import annotations

import os
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path

from tensafe.errors import ConfigurationError

__all__ = [
    "DEFAULT_AUDIT_CHECKPOINT_EVERY",
    "DEFAULT_CLIENT_BASE_URL",
    "DEFAULT_DATABASE_URL",
    "DEFAULT_DATA_DIR",
    "DEFAULT_SERVE_MAX_RESIDENT_ADAPTERS",
    "ENVIRONMENTS",
    "Config",
    "EnvironmentVariableError",
    "audit_checkpoint_every",
    "client_allow_insecure_http",
    "client_api_key",
    "client_base_url",
    "client_ca_bundle",
    "client_project_id",
    "data_dir",
    "database_url",
    "deterministic",
    "env_value",
    "environ",
    "environment",
    "load_config",
    "model_cache_dir",
    "pg_bin",
    "pqc_required",
    "serve_max_resident_adapters",
    "set_offline_defaults",
    "tssp_state_path",
    "vllm_python",
]

#: ``DATABASE_URL`` when unset: a SQLite file in the working directory.
DEFAULT_DATABASE_URL = "sqlite:///./tensafe.db"
#: ``TS_DATA_DIR`` when unset (relative to the working directory).
DEFAULT_DATA_DIR = ".tensafe"
#: ``TS_AUDIT_CHECKPOINT_EVERY`` when unset: records between signed audit checkpoints.
DEFAULT_AUDIT_CHECKPOINT_EVERY = 1000
#: ``TS_SERVE_MAX_RESIDENT_ADAPTERS`` when unset: adapters loaded in the serving engines at once.
DEFAULT_SERVE_MAX_RESIDENT_ADAPTERS = 8
#: ``TENSAFE_BASE_URL`` when unset (the SDK).
DEFAULT_CLIENT_BASE_URL = "http://127.0.0.1:8000"
#: The values of ``TS_ENVIRONMENT``.
ENVIRONMENTS = ("development", "production")

_MAX_CHECKPOINT_EVERY = 2**53 - 1
_TRUE = frozenset({"1", "true", "yes", "on"})
_FALSE = frozenset({"", "0", "false", "no", "off"})


class EnvironmentVariableError(ConfigurationError):
    """An environment variable holds a value TenSafe refuses (the message names it and says why)."""


def environ() -> dict[str, str]:
    """A snapshot of the process environment (for the component groups; see the module doc)."""
    return dict(os.environ)


def env_value(name: str, env: Mapping[str, str] | None = None) -> str | None:
    """The value of the variable ``name`` (one a user named, e.g. ``--passphrase-env VAR``), or None."""
    return (os.environ if env is None else env).get(name)


def _raw(name: str, env: Mapping[str, str] | None) -> str:
    return (os.environ if env is None else env).get(name, "").strip()


def environment(env: Mapping[str, str] | None = None) -> str:
    """``TS_ENVIRONMENT``: ``development`` (default) or ``production``.

    Raises:
        EnvironmentVariableError: Any other value.
    """
    value = _raw("TS_ENVIRONMENT", env).lower() or "development"
    if value not in ENVIRONMENTS:
        raise EnvironmentVariableError(f"TS_ENVIRONMENT must be 'development' or 'production', not {value!r}")
    return value


def database_url(env: Mapping[str, str] | None = None) -> str:
    """``DATABASE_URL``, else :data:`DEFAULT_DATABASE_URL`."""
    return _raw("DATABASE_URL", env) or DEFAULT_DATABASE_URL


def data_dir(env: Mapping[str, str] | None = None) -> Path:
    """``TS_DATA_DIR`` (default ``.tensafe``), ``~`` expanded, made absolute."""
    return Path(_raw("TS_DATA_DIR", env) or DEFAULT_DATA_DIR).expanduser().resolve()


def audit_checkpoint_every(env: Mapping[str, str] | None = None) -> int:
    """``TS_AUDIT_CHECKPOINT_EVERY``: records between signed audit checkpoints (default 1000).

    Raises:
        EnvironmentVariableError: The value is set but is not a positive integer.
    """
    raw = _raw("TS_AUDIT_CHECKPOINT_EVERY", env)
    if not raw:
        return DEFAULT_AUDIT_CHECKPOINT_EVERY
    value = int(raw, 10) if raw.isascii() and raw.isdigit() else 0
    if not 1 <= value <= _MAX_CHECKPOINT_EVERY:
        raise EnvironmentVariableError(
            "TS_AUDIT_CHECKPOINT_EVERY must be a positive integer (records between signed checkpoints), "
            f"not {raw[:40]!r}"
        )
    return value


def pqc_required(env: Mapping[str, str] | None = None) -> bool:
    """``TS_PQC_REQUIRED``: true for ``1``/``true``/``yes``/``on``; false when unset or ``0``/``false``/...

    Raises:
        EnvironmentVariableError: Any other value (a typo never weakens the policy).
    """
    raw = _raw("TS_PQC_REQUIRED", env).lower()
    if raw in _TRUE:
        return True
    if raw in _FALSE:
        return False
    raise EnvironmentVariableError(
        "TS_PQC_REQUIRED must be 'true' or 'false' (got an unrecognised value); fix the environment"
    )


def deterministic(env: Mapping[str, str] | None = None) -> bool:
    """``TS_DETERMINISTIC``: ``1`` selects reproducible, non-private noise; unset or ``0``: off.

    Raises:
        EnvironmentVariableError: Any other value.
    """
    value = _raw("TS_DETERMINISTIC", env)
    if value not in ("", "0", "1"):
        raise EnvironmentVariableError(f"TS_DETERMINISTIC must be 0 or 1, got {value!r}")
    return value == "1"


def model_cache_dir(env: Mapping[str, str] | None = None) -> Path:
    """``TENSAFE_MODEL_CACHE``, else ``${XDG_CACHE_HOME:-~/.cache}/tensafe/models``."""
    override = _raw("TENSAFE_MODEL_CACHE", env)
    if override:
        return Path(override).expanduser()
    xdg = _raw("XDG_CACHE_HOME", env)
    base = Path(xdg).expanduser() if xdg else Path.home() / ".cache"
    return base / "tensafe" / "models"


def tssp_state_path(env: Mapping[str, str] | None = None) -> Path:
    """The TSSP rollback state: ``$TS_DATA_DIR/tssp-state.json`` when ``TS_DATA_DIR`` is set, else
    ``${XDG_STATE_HOME:-~/.local/state}/tensafe/tssp-state.json``."""
    if _raw("TS_DATA_DIR", env):
        return data_dir(env) / "tssp-state.json"
    state_home = _raw("XDG_STATE_HOME", env)
    base = Path(state_home).expanduser() if state_home else Path.home() / ".local" / "state"
    return base / "tensafe" / "tssp-state.json"


def vllm_python(env: Mapping[str, str] | None = None) -> Path | None:
    """``TENSAFE_VLLM_PYTHON``: the interpreter of the environment vLLM is installed in (None when unset)."""
    raw = _raw("TENSAFE_VLLM_PYTHON", env)
    return Path(raw).expanduser() if raw else None


def pg_bin(env: Mapping[str, str] | None = None) -> str:
    """``TENSAFE_PG_BIN``: the PostgreSQL binaries the test fixtures use (empty when unset)."""
    return _raw("TENSAFE_PG_BIN", env)


def serve_max_resident_adapters(env: Mapping[str, str] | None = None) -> int:
    """``TS_SERVE_MAX_RESIDENT_ADAPTERS``: most LoRA adapters loaded for serving at once (default 8).

    Raises:
        EnvironmentVariableError: The value is set but is not an integer from 1 to 1024.
    """
    raw = _raw("TS_SERVE_MAX_RESIDENT_ADAPTERS", env)
    if not raw:
        return DEFAULT_SERVE_MAX_RESIDENT_ADAPTERS
    value = int(raw, 10) if raw.isascii() and raw.isdigit() and len(raw) <= 6 else 0
    if not 1 <= value <= 1024:
        raise EnvironmentVariableError(
            "TS_SERVE_MAX_RESIDENT_ADAPTERS must be an integer from 1 to 1024 (adapters loaded at once), "
            f"not {raw[:40]!r}"
        )
    return value


# -- the SDK (tensafe.client) -------------------------------------------------------------------


def client_base_url(env: Mapping[str, str] | None = None) -> str:
    """``TENSAFE_BASE_URL``, else :data:`DEFAULT_CLIENT_BASE_URL`."""
    return _raw("TENSAFE_BASE_URL", env) or DEFAULT_CLIENT_BASE_URL


def client_api_key(env: Mapping[str, str] | None = None) -> str:
    """``TENSAFE_API_KEY`` (empty when unset)."""
    return _raw("TENSAFE_API_KEY", env)


def client_project_id(env: Mapping[str, str] | None = None) -> str | None:
    """``TENSAFE_PROJECT_ID`` (None when unset or empty)."""
    return _raw("TENSAFE_PROJECT_ID", env) or None


def client_ca_bundle(env: Mapping[str, str] | None = None) -> str | None:
    """``TENSAFE_CA_BUNDLE``: a PEM CA bundle for ``https://`` servers (None when unset)."""
    return _raw("TENSAFE_CA_BUNDLE", env) or None


def client_allow_insecure_http(env: Mapping[str, str] | None = None) -> bool:
    """``TENSAFE_ALLOW_INSECURE_HTTP``: ``1``/``true``/``yes`` allow plain HTTP to a remote host.

    Raises:
        EnvironmentVariableError: A value other than those or ``0``/``false``/``no``/unset.
    """
    raw = _raw("TENSAFE_ALLOW_INSECURE_HTTP", env).lower()
    if raw in ("", "0", "false", "no"):
        return False
    if raw in ("1", "true", "yes"):
        return True
    raise EnvironmentVariableError(f"TENSAFE_ALLOW_INSECURE_HTTP must be 1 or 0, not {raw[:20]!r}")


# -- everything at once ---------------------------------------------------------------------------


@dataclass(frozen=True)
class Config:
    """The shared settings, read and checked at once (:func:`load_config`).

    Attributes:
        environment: ``development`` or ``production`` (``TS_ENVIRONMENT``).
        database_url: ``DATABASE_URL`` or the default SQLite file.
        database_url_set: Whether ``DATABASE_URL`` was set (production requires it).
        data_dir: ``TS_DATA_DIR``, absolute.
        audit_checkpoint_every: ``TS_AUDIT_CHECKPOINT_EVERY``.
        pqc_required: ``TS_PQC_REQUIRED``.
        deterministic: ``TS_DETERMINISTIC``.
        model_cache_dir: ``TENSAFE_MODEL_CACHE`` or the XDG cache.
        tssp_state_path: Default TSSP rollback state file.
    """

    environment: str
    database_url: str
    database_url_set: bool
    data_dir: Path
    audit_checkpoint_every: int
    pqc_required: bool
    deterministic: bool
    model_cache_dir: Path
    tssp_state_path: Path

    @property
    def production(self) -> bool:
        """Whether ``TS_ENVIRONMENT=production``."""
        return self.environment == "production"

    @property
    def development(self) -> bool:
        """Whether development mode applies (``TS_ENVIRONMENT`` unset or ``development``)."""
        return self.environment == "development"


def load_config(env: Mapping[str, str] | None = None) -> Config:
    """Read and check every shared setting (default: the process environment, now).

    Raises:
        EnvironmentVariableError: The first malformed variable (its message names it).
    """
    snapshot = environ() if env is None else dict(env)
    return Config(
        environment=environment(snapshot),
        database_url=database_url(snapshot),
        database_url_set=bool(_raw("DATABASE_URL", snapshot)),
        data_dir=data_dir(snapshot),
        audit_checkpoint_every=audit_checkpoint_every(snapshot),
        pqc_required=pqc_required(snapshot),
        deterministic=deterministic(snapshot),
        model_cache_dir=model_cache_dir(snapshot),
        tssp_state_path=tssp_state_path(snapshot),
    )


def set_offline_defaults() -> None:
    """Set ``HF_HUB_OFFLINE=1`` and ``TRANSFORMERS_OFFLINE=1`` unless already set.

    Only the ``tensafe`` command's entry point calls this, before it imports any Hugging Face
    library (they read these variables once, at import). TenSafe never downloads models; library
    code passes ``local_files_only=True`` to every loader instead of writing the environment.
    """
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")
