"""Configuration in one place (``tensafe.config``): the only reader of the environment.

* No module of ``src/`` but ``tensafe/config.py`` touches the process environment: every source
  file is parsed (an AST, so docstrings and comments do not count) and any ``os.environ``,
  ``os.environb``, ``os.getenv``/``putenv``/``unsetenv`` or ``from os import environ`` fails.
* The shared settings have one parser: the server, the key manager, the audit log and the TSSP
  state agree on ``TS_DATA_DIR`` and ``TS_AUDIT_CHECKPOINT_EVERY`` for any value (Hypothesis),
  against a naive oracle of what must be accepted.
* Every malformed shared variable is refused with a message that names it; nothing falls back.
* The ``tensafe`` command sets the Hugging Face offline variables (unless set); importing and
  using the library writes nothing.
"""

from __future__ import annotations

import ast
import os
from pathlib import Path

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from tensafe import config
from tensafe.audit import AuditError, checkpoint_every_from_environment
from tensafe.errors import ConfigurationError
from tensafe.keys import KeySettings
from tensafe.keys.errors import KeyConfigurationError
from tensafe.training.errors import UnknownModelError

SRC = Path(__file__).resolve().parent.parent / "src" / "tensafe"
_ENV_FUNCTIONS = {"getenv", "getenvb", "putenv", "unsetenv"}
_ENV_NAMES = {"environ", "environb"} | _ENV_FUNCTIONS


def environment_accesses(tree: ast.AST) -> list[int]:
    """Line numbers where ``tree`` touches the process environment through ``os``."""
    lines = []
    for node in ast.walk(tree):
        if isinstance(node, ast.Attribute) and node.attr in _ENV_NAMES:
            if isinstance(node.value, ast.Name) and node.value.id in ("os", "_os", "posix"):
                lines.append(node.lineno)
        elif isinstance(node, ast.ImportFrom) and node.module in ("os", "posix"):
            if any(alias.name in _ENV_NAMES for alias in node.names):
                lines.append(node.lineno)
    return lines


def test_the_detector_finds_every_form() -> None:
    code = (
        "import os\nfrom os import environ\nos.environ['A'] = '1'\nx = os.getenv('B')\n"
        "os.environ.setdefault('C', '1')\n'''os.environ in a docstring'''\n# os.environ\n"
    )
    assert environment_accesses(ast.parse(code)) == [2, 3, 4, 5]


def test_only_the_config_module_touches_the_environment() -> None:
    offenders = []
    for path in sorted(SRC.rglob("*.py")):
        if path == SRC / "config.py":
            continue
        lines = environment_accesses(ast.parse(path.read_text(encoding="utf-8"), filename=str(path)))
        offenders += [f"{path.relative_to(SRC.parent)}:{line}" for line in lines]
    assert offenders == [], "read the environment through tensafe.config: " + ", ".join(offenders)
    assert environment_accesses(ast.parse((SRC / "config.py").read_text(encoding="utf-8")))


# -- one parser per shared variable ---------------------------------------------------------------

_dir_names = st.text(
    alphabet=st.characters(codec="ascii", categories=("L", "N"), include_characters="._- "), max_size=20
)


@settings(max_examples=60, deadline=None)
@given(raw=_dir_names)
def test_ts_data_dir_means_the_same_to_every_component(raw: str) -> None:
    from tensafe.server import ServerSettings

    env = {"TS_DATA_DIR": raw, "TS_SERVER_MODELS": "m=/nonexistent"}
    expected = Path(raw.strip() or ".tensafe").expanduser().resolve()  # the oracle
    assert config.data_dir(env) == expected
    assert KeySettings.from_environment(env).data_dir == expected
    assert ServerSettings.from_environment(env).data_dir == expected
    state = config.tssp_state_path(env)
    if raw.strip():
        assert state == expected / "tssp-state.json"
    else:
        assert state.name == "tssp-state.json" and state.parent.name == "tensafe"


def _naive_checkpoint_every(raw: str) -> int | None:
    """What must be accepted: ASCII digits only, 1 <= N <= 2**53 - 1 (None: refused)."""
    text = raw.strip()
    if not text:
        return 1000
    if not all(c in "0123456789" for c in text):
        return None
    value = int(text)
    return value if 1 <= value <= 2**53 - 1 else None


@settings(max_examples=200, deadline=None)
@given(
    raw=st.one_of(
        st.integers(min_value=-5, max_value=2**54).map(str),
        st.text(max_size=8),
        st.sampled_from(
            ["+5", " 7 ", "1_000", "٣", "0", "00", "1e3", "9007199254740991", "9007199254740992"]
        ),
    )
)
def test_ts_audit_checkpoint_every_means_the_same_to_every_component(raw: str) -> None:
    from tensafe.server import ServerConfigurationError, ServerSettings

    if "\x00" in raw:
        return
    env = {"TS_AUDIT_CHECKPOINT_EVERY": raw, "TS_SERVER_MODELS": "m=/nonexistent"}
    expected = _naive_checkpoint_every(raw)
    if expected is None:
        with pytest.raises(config.EnvironmentVariableError, match="TS_AUDIT_CHECKPOINT_EVERY"):
            config.audit_checkpoint_every(env)
        with pytest.raises(AuditError, match="TS_AUDIT_CHECKPOINT_EVERY"):
            checkpoint_every_from_environment(env)
        with pytest.raises(KeyConfigurationError, match="TS_AUDIT_CHECKPOINT_EVERY"):
            KeySettings.from_environment(env)
        with pytest.raises(ServerConfigurationError, match="TS_AUDIT_CHECKPOINT_EVERY"):
            ServerSettings.from_environment(env)
    else:
        assert config.audit_checkpoint_every(env) == expected
        assert checkpoint_every_from_environment(env) == expected
        assert KeySettings.from_environment(env).audit_checkpoint_every == expected
        assert ServerSettings.from_environment(env).audit_checkpoint_every == expected


@pytest.mark.parametrize(
    ("name", "value", "reader"),
    [
        ("TS_ENVIRONMENT", "staging", config.environment),
        ("TS_AUDIT_CHECKPOINT_EVERY", "-1", config.audit_checkpoint_every),
        ("TS_PQC_REQUIRED", "ture", config.pqc_required),
        ("TS_DETERMINISTIC", "yes", config.deterministic),
        ("TENSAFE_ALLOW_INSECURE_HTTP", "maybe", config.client_allow_insecure_http),
    ],
)
def test_a_malformed_shared_variable_is_refused_by_name(name: str, value: str, reader: object) -> None:
    with pytest.raises(config.EnvironmentVariableError, match=name) as caught:
        reader({name: value})  # type: ignore[operator]
    assert isinstance(caught.value, ConfigurationError) and caught.value.exit_code == 2
    if not name.startswith("TENSAFE_"):  # the SDK's variables are not part of load_config
        with pytest.raises(config.EnvironmentVariableError, match=name):
            config.load_config({name: value})


def test_the_domain_errors_are_kept(monkeypatch: pytest.MonkeyPatch) -> None:
    from tensafe.crypto.errors import CryptoConfigurationError
    from tensafe.crypto.hazmat.policy import pqc_required
    from tensafe.training.dp.errors import DPConfigError
    from tensafe.training.dp.rng import deterministic_requested

    monkeypatch.setenv("TS_PQC_REQUIRED", "ture")
    with pytest.raises(CryptoConfigurationError, match="TS_PQC_REQUIRED"):
        pqc_required()
    monkeypatch.setenv("TS_PQC_REQUIRED", "ON")
    assert pqc_required() is True  # read on every check
    monkeypatch.setenv("TS_DETERMINISTIC", "2")
    with pytest.raises(DPConfigError, match="TS_DETERMINISTIC"):
        deterministic_requested()


def test_load_config_reads_every_shared_setting(tmp_path: Path) -> None:
    env = {
        "TS_ENVIRONMENT": "Production",
        "DATABASE_URL": " postgresql://u@db/t ",
        "TS_DATA_DIR": str(tmp_path / "d"),
        "TS_AUDIT_CHECKPOINT_EVERY": "17",
        "TS_PQC_REQUIRED": "yes",
        "TS_DETERMINISTIC": "1",
        "TENSAFE_MODEL_CACHE": str(tmp_path / "models"),
    }
    loaded = config.load_config(env)
    assert loaded.production and not loaded.development
    assert loaded.database_url == "postgresql://u@db/t" and loaded.database_url_set
    assert loaded.data_dir == tmp_path / "d" and loaded.tssp_state_path == tmp_path / "d" / "tssp-state.json"
    assert (loaded.audit_checkpoint_every, loaded.pqc_required, loaded.deterministic) == (17, True, True)
    assert loaded.model_cache_dir == tmp_path / "models"
    defaults = config.load_config({})
    assert defaults.development and defaults.database_url == "sqlite:///./tensafe.db"
    assert not defaults.database_url_set and defaults.audit_checkpoint_every == 1000
    assert defaults.data_dir == Path(".tensafe").resolve()


# -- who writes the environment -------------------------------------------------------------------


def test_the_cli_sets_the_offline_defaults_and_keeps_explicit_values(monkeypatch: pytest.MonkeyPatch) -> None:
    from tensafe.cli.main import main

    monkeypatch.delenv("HF_HUB_OFFLINE", raising=False)
    monkeypatch.setenv("TRANSFORMERS_OFFLINE", "0")
    assert main([]) == 2  # prints the help
    assert os.environ["HF_HUB_OFFLINE"] == "1" and os.environ["TRANSFORMERS_OFFLINE"] == "0"


def test_the_model_library_writes_no_environment(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    from tensafe.training import models

    monkeypatch.delenv("HF_HUB_OFFLINE", raising=False)
    monkeypatch.delenv("TRANSFORMERS_OFFLINE", raising=False)
    monkeypatch.setenv("TENSAFE_MODEL_CACHE", str(tmp_path))
    before = dict(os.environ)
    assert models.model_cache_root() == tmp_path
    with pytest.raises(UnknownModelError):
        models.load_tokenizer("no-such-model-anywhere")
    assert dict(os.environ) == before
