"""Server settings (from the environment or in code) and the catalog of trainable models."""

from __future__ import annotations

import json
import logging
import math
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path

from tensafe.server.cache import DEFAULT_MAX_LOADED_MODELS, check_caps
from tensafe.server.errors import BadRequestError, ServerConfigurationError
from tensafe.server.privacy import OperatorPrivacy

_log = logging.getLogger("tensafe.server")

__all__ = [
    "DEFAULT_RESULT_TTL_SECONDS",
    "MIN_RESULT_TTL_SECONDS",
    "CatalogEntry",
    "ModelCatalog",
    "ServerSettings",
]

#: How long a finished future's result is kept by default (``TS_SERVER_RESULT_TTL_S``): 7 days.
DEFAULT_RESULT_TTL_SECONDS = 7 * 86400.0
#: The shortest result retention accepted (seconds).
MIN_RESULT_TTL_SECONDS = 60.0


@dataclass(frozen=True)
class CatalogEntry:
    """A base model clients may name in ``create_model``.

    Attributes:
        name: The name clients send as ``base_model`` (e.g. ``Qwen/Qwen3-8B``).
        source: A TenSafe registered model name or an absolute local model directory.
        tokenizer_id: What ``get_info`` tells clients to load their tokenizer from
            (``model_data.tokenizer_id``, passed to ``AutoTokenizer.from_pretrained`` on
            the client's machine): a Hugging Face id, or a directory that exists on the
            clients' machines. ``None`` (the default) means the model's name up to its
            first ``:``, never ``source``: the server's directories are not revealed. It
            must not contain ``:`` (the official SDK cuts the id there).

    Raises:
        ServerConfigurationError: ``tokenizer_id`` is empty or contains ``:`` or a
            control character.
    """

    name: str
    source: str
    tokenizer_id: str | None = None

    def __post_init__(self) -> None:
        tokenizer = self.tokenizer_id
        if tokenizer is not None and (
            not tokenizer.strip() or ":" in tokenizer or any(ord(c) < 32 or ord(c) == 127 for c in tokenizer)
        ):
            raise ServerConfigurationError(
                f"the tokenizer id of base model {self.name!r} must be a Hugging Face id or a directory on "
                f"the clients' machines, without ':' (the Tinker SDK cuts the id there); got {tokenizer!r}"
            )

    @property
    def client_tokenizer_id(self) -> str:
        """The ``tokenizer_id`` clients receive: the configured one, else the name up to its first ``:``."""
        if self.tokenizer_id is not None:
            return self.tokenizer_id
        return self.name.split(":", 1)[0] or self.name

    def directory(self) -> Path:
        """Return the local Hugging Face directory, preparing a registered model once.

        Raises:
            BadRequestError: The model cannot be found or prepared. The message names the
                model, never ``source`` or a path (clients see it); the reason is logged.
        """
        from tensafe.training.errors import TrainingError
        from tensafe.training.models import prepare_model

        try:
            return prepare_model(self.source)
        except TrainingError as exc:
            _log.warning("base model %r cannot be prepared from its catalog source: %s", self.name, exc)
            raise BadRequestError(
                f"base model {self.name!r} is not available on this server; ask the operator "
                "(the server's log says why)"
            ) from None

    def arch(self) -> str | None:
        """Return ``model_type`` from the model's ``config.json`` (None when unreadable)."""
        try:
            config = json.loads((self.directory() / "config.json").read_text(encoding="utf-8"))
        except (OSError, ValueError, BadRequestError):
            return None
        value = config.get("model_type")
        return value if isinstance(value, str) else None


@dataclass(frozen=True)
class ModelCatalog:
    """The base models this server serves, by client-visible name (case-sensitive)."""

    entries: Mapping[str, CatalogEntry] = field(default_factory=dict)

    @classmethod
    def parse(cls, text: str) -> ModelCatalog:
        """Parse ``NAME=SOURCE[|TOKENIZER][;NAME=SOURCE[|TOKENIZER]...]`` (``TS_SERVER_MODELS``).

        ``TOKENIZER`` sets :attr:`CatalogEntry.tokenizer_id` (default: ``NAME`` up to its
        first ``:``).

        Raises:
            ServerConfigurationError: An item has no ``=``, an empty side, an empty
                ``TOKENIZER`` after ``|``, or a tokenizer id with ``:``.
        """
        entries: dict[str, CatalogEntry] = {}
        for item in text.split(";"):
            item = item.strip()
            if not item:
                continue
            name, sep, rest = item.partition("=")
            source, bar, tokenizer = rest.partition("|")
            if not sep or not name.strip() or not source.strip() or (bar and not tokenizer.strip()):
                raise ServerConfigurationError(
                    f"TS_SERVER_MODELS item {item!r} must look like NAME=SOURCE or NAME=SOURCE|TOKENIZER, "
                    "e.g. 'Qwen/Qwen3-8B=/srv/models/qwen3-8b|Qwen/Qwen3-8B'"
                )
            entries[name.strip()] = CatalogEntry(
                name=name.strip(), source=source.strip(), tokenizer_id=tokenizer.strip() if bar else None
            )
        return cls(entries)

    @classmethod
    def default(cls) -> ModelCatalog:
        """Every model of TenSafe's registry, under its canonical id."""
        from tensafe.training.models import list_models

        return cls({m.id: CatalogEntry(name=m.id, source=m.id) for m in list_models()})

    def get(self, name: str) -> CatalogEntry:
        """Return the entry for ``name``.

        Raises:
            BadRequestError: The name is not served here (the message lists what is).
        """
        entry = self.entries.get(name)
        if entry is None:
            known = ", ".join(sorted(self.entries)) or "none"
            raise BadRequestError(f"unknown base model {name!r}; this server serves: {known}")
        return entry


@dataclass(frozen=True)
class ServerSettings:
    """Everything :func:`tensafe.server.create_app` needs.

    Attributes:
        database_url: Migrated SQLite or PostgreSQL database.
        data_dir: Where the encrypted artifact store keeps its blobs (``<data_dir>/artifacts``).
        catalog: Base models clients may train.
        long_poll_seconds: How long ``retrieve_future`` holds a request before answering
            408 ``try_again`` (below the SDK's 45 s read timeout).
        poll_interval_seconds: How often a waiting request re-reads the database (for
            results completed by another process).
        run_worker: Run the job worker in a thread of the API process.
        lease_seconds: How long a worker's claim on a model lasts without renewal; after
            that another worker (or a restarted server) takes the model over.
        audit_checkpoint_every: The audit checkpoint interval ``N``
            (``TS_AUDIT_CHECKPOINT_EVERY``, default 1000): a checkpoint is signed whenever
            ``N`` records of a tenant follow its newest one, and ``/audit/verify`` requires
            that rule (docs/audit.md).
        audit_verify_interval_seconds: ``/audit/verify`` re-verifies a tenant's whole chain
            at most once per this many seconds per process (``TS_AUDIT_VERIFY_INTERVAL_S``,
            default 60); calls in between get the cached report.
        audit_verify_concurrency: Full chain verifications one process runs at once
            (``TS_AUDIT_VERIFY_CONCURRENCY``, default 2); more wait for a slot.
        session_expiry_seconds: Sessions without a heartbeat for this long answer 410.
        privacy: The operator's privacy floor (``TS_DP_*``); tenants and clients can only
            make it stricter.
        auto_checkpoint: Persist the adapter and optimizer state, encrypted, after every
            completed ``optim_step`` (so a crash loses no completed step). Disable only for
            benchmarks.
        result_ttl_seconds: How long the result of a finished future is kept
            (``TS_SERVER_RESULT_TTL_S``, at least 60 s, default 7 days). After that the
            sweeper deletes it and ``retrieve_future`` answers 410 ``result_expired``; the
            future's row stays, so re-submitting the same ``(model_id, seq_id)`` still
            returns the same future (see :mod:`tensafe.server.retention`).
        max_loaded_models: Most training and sampling sessions a worker keeps loaded
            (``TS_SERVER_MAX_LOADED_MODELS``, default 8); a load beyond it evicts the least
            recently used one (:mod:`tensafe.server.cache`).
        max_loaded_per_tenant: Most of them of one tenant (``TS_SERVER_MAX_LOADED_PER_TENANT``,
            at most ``max_loaded_models``; None, the default: half of ``max_loaded_models``,
            at least 1). A tenant at its cap evicts its own sessions, never another's.
    """

    database_url: str
    data_dir: Path
    catalog: ModelCatalog = field(default_factory=ModelCatalog)
    long_poll_seconds: float = 25.0
    poll_interval_seconds: float = 0.25
    run_worker: bool = True
    lease_seconds: float = 30.0
    audit_checkpoint_every: int = 1000
    audit_verify_interval_seconds: float = 60.0
    audit_verify_concurrency: int = 2
    session_expiry_seconds: float = 3600.0
    privacy: OperatorPrivacy = field(default_factory=OperatorPrivacy)
    auto_checkpoint: bool = True
    result_ttl_seconds: float = DEFAULT_RESULT_TTL_SECONDS
    max_loaded_models: int = DEFAULT_MAX_LOADED_MODELS
    max_loaded_per_tenant: int | None = None

    def __post_init__(self) -> None:
        if not 0 < self.long_poll_seconds <= 40:
            raise ServerConfigurationError("long_poll_seconds must be in (0, 40] (the SDK times out at 45 s)")
        if self.poll_interval_seconds <= 0 or self.lease_seconds <= 0:
            raise ServerConfigurationError("poll_interval_seconds and lease_seconds must be positive")
        if isinstance(self.audit_checkpoint_every, bool) or not (
            isinstance(self.audit_checkpoint_every, int) and self.audit_checkpoint_every >= 1
        ):
            raise ServerConfigurationError("audit_checkpoint_every (TS_AUDIT_CHECKPOINT_EVERY) must be >= 1")
        if not 0 < self.audit_verify_interval_seconds < math.inf or self.audit_verify_concurrency < 1:
            raise ServerConfigurationError(
                "audit_verify_interval_seconds (TS_AUDIT_VERIFY_INTERVAL_S) must be a positive number of "
                "seconds and audit_verify_concurrency (TS_AUDIT_VERIFY_CONCURRENCY) at least 1"
            )
        if not MIN_RESULT_TTL_SECONDS <= self.result_ttl_seconds < math.inf:
            raise ServerConfigurationError(
                f"result_ttl_seconds (TS_SERVER_RESULT_TTL_S) must be a finite number of seconds, at least "
                f"{MIN_RESULT_TTL_SECONDS:g}; got {self.result_ttl_seconds!r}"
            )
        check_caps(self.max_loaded_models, self.max_loaded_per_tenant)

    @classmethod
    def from_environment(cls, env: Mapping[str, str] | None = None) -> ServerSettings:
        """Read ``DATABASE_URL``, ``TS_DATA_DIR``, ``TS_SERVER_MODELS``, ``TS_SERVER_LONG_POLL_S``,
        ``TS_SERVER_LEASE_S``, ``TS_SERVER_POLL_INTERVAL_S``, ``TS_SERVER_RESULT_TTL_S``,
        ``TS_AUDIT_CHECKPOINT_EVERY``, ``TS_AUDIT_VERIFY_INTERVAL_S``,
        ``TS_AUDIT_VERIFY_CONCURRENCY``, ``TS_SERVER_MAX_LOADED_MODELS``,
        ``TS_SERVER_MAX_LOADED_PER_TENANT`` and ``TS_DP_*``.

        Raises:
            ServerConfigurationError: A value is malformed.
        """
        from tensafe import config
        from tensafe.audit import AuditError, checkpoint_every_from_environment

        env = config.environ() if env is None else dict(env)
        url = config.database_url(env)
        data_dir = config.data_dir(env)
        models = env.get("TS_SERVER_MODELS", "").strip()
        catalog = ModelCatalog.parse(models) if models else ModelCatalog.default()
        seconds: dict[str, float] = {}
        for name, default in (
            ("TS_SERVER_LONG_POLL_S", 25.0),
            ("TS_SERVER_LEASE_S", 30.0),
            ("TS_SERVER_POLL_INTERVAL_S", 0.25),
            ("TS_SERVER_RESULT_TTL_S", DEFAULT_RESULT_TTL_SECONDS),
            ("TS_AUDIT_VERIFY_INTERVAL_S", 60.0),
        ):
            raw = env.get(name, "").strip()
            try:
                seconds[name] = float(raw) if raw else default
            except ValueError:
                raise ServerConfigurationError(f"{name} must be a number of seconds") from None
        long_poll = seconds["TS_SERVER_LONG_POLL_S"]
        try:
            checkpoint_every = checkpoint_every_from_environment(env)
        except AuditError as exc:
            raise ServerConfigurationError(str(exc)) from None
        raw_concurrency = env.get("TS_AUDIT_VERIFY_CONCURRENCY", "").strip()
        if raw_concurrency and not (raw_concurrency.isascii() and raw_concurrency.isdigit()):
            raise ServerConfigurationError("TS_AUDIT_VERIFY_CONCURRENCY must be a positive integer")
        caps: dict[str, int | None] = {}
        for name in ("TS_SERVER_MAX_LOADED_MODELS", "TS_SERVER_MAX_LOADED_PER_TENANT"):
            raw = env.get(name, "").strip()
            if raw and not (raw.isascii() and raw.isdigit() and int(raw) >= 1):
                raise ServerConfigurationError(
                    f"{name} must be a positive integer (a number of loaded models); got {raw!r}"
                )
            caps[name] = int(raw) if raw else None
        return cls(
            database_url=url,
            data_dir=data_dir,
            catalog=catalog,
            long_poll_seconds=long_poll,
            lease_seconds=seconds["TS_SERVER_LEASE_S"],
            poll_interval_seconds=seconds["TS_SERVER_POLL_INTERVAL_S"],
            result_ttl_seconds=seconds["TS_SERVER_RESULT_TTL_S"],
            audit_checkpoint_every=checkpoint_every,
            audit_verify_interval_seconds=seconds["TS_AUDIT_VERIFY_INTERVAL_S"],
            audit_verify_concurrency=int(raw_concurrency) if raw_concurrency else 2,
            privacy=OperatorPrivacy.from_environment(env),
            max_loaded_models=caps["TS_SERVER_MAX_LOADED_MODELS"] or DEFAULT_MAX_LOADED_MODELS,
            max_loaded_per_tenant=caps["TS_SERVER_MAX_LOADED_PER_TENANT"],
        )
