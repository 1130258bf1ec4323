"""Database tables of the training API server.

Created by the migrations ``0003_server``, ``0004_privacy``, ``0005_downloads``,
``0006_inline_records`` and ``0007_privacy_ledger``
(``tensafe/db/migrations/versions/``), which must stay identical to these models
(``tests/server/test_schema.py`` checks it on SQLite and PostgreSQL). Every resource
row carries ``tenant_id``; queries always filter on it, so another tenant's rows are
invisible (404, never 403).

Training data and weights never go into these tables: a future's sensitive payload or
result is an artifact of the tenant's :class:`~tensafe.storage.EncryptedArtifactStore`,
referenced by ``payload_ref`` / ``result_ref``; small ones (see
``tensafe.server.jobs.INLINE_MAX_BYTES``) are sealed into the row itself
(``payload_blob`` / ``result_blob``, the same TSAF v1 encryption as the store).
"""

from __future__ import annotations

import datetime as _dt

from sqlalchemy import (
    BigInteger,
    Boolean,
    Float,
    ForeignKey,
    Integer,
    LargeBinary,
    String,
    Text,
    UniqueConstraint,
)
from sqlalchemy.orm import Mapped, mapped_column

import tensafe.db.models  # noqa: F401  (registers the tenants table the foreign keys refer to)
from tensafe.db import Base, UTCDateTime
from tensafe.db.api_keys import ApiKey  # the table lives below the server: tensafe serve checks keys too

__all__ = [
    "FUTURE_STATES",
    "ApiKey",
    "DownloadToken",
    "FutureRow",
    "PrivacyLedger",
    "PrivacyPolicyRow",
    "PrivacySpend",
    "SamplingSessionRow",
    "ServerSession",
    "SessionScoped",
    "TrainingCheckpoint",
    "TrainingModel",
]

#: ``queued`` -> ``running`` -> ``complete`` | ``failed``.
FUTURE_STATES = ("queued", "running", "complete", "failed")


class ServerSession(Base):
    """A client session (one ``ServiceClient``), kept alive by heartbeats."""

    __tablename__ = "server_sessions"

    id: Mapped[str] = mapped_column(String(64), primary_key=True)
    tenant_id: Mapped[str] = mapped_column(String(64), ForeignKey("tenants.id"))
    created_at: Mapped[_dt.datetime] = mapped_column(UTCDateTime())
    last_heartbeat_at: Mapped[_dt.datetime] = mapped_column(UTCDateTime())
    finished_at: Mapped[_dt.datetime | None] = mapped_column(UTCDateTime(), nullable=True)
    finish_reason: Mapped[str | None] = mapped_column(String(16), nullable=True)
    user_metadata: Mapped[str] = mapped_column(Text)
    tags: Mapped[str] = mapped_column(Text)
    project_id: Mapped[str | None] = mapped_column(String(200), nullable=True)
    display_name: Mapped[str | None] = mapped_column(String(200), nullable=True)
    sdk_version: Mapped[str | None] = mapped_column(String(200), nullable=True)


class SessionScoped:
    """The columns of a row numbered within a client session (``{session}:<kind>:{n}``,
    unique per session with its number column) and owned by the session's tenant: a
    training model, a sampling session."""

    id: Mapped[str] = mapped_column(String(200), primary_key=True, sort_order=-1)
    tenant_id: Mapped[str] = mapped_column(String(64), ForeignKey("tenants.id"), sort_order=-1)
    session_id: Mapped[str] = mapped_column(String(64), ForeignKey("server_sessions.id"), sort_order=-1)


class TrainingModel(SessionScoped, Base):
    """A LoRA training model (a Tinker "training run"), named ``{session}:train:{n}``.

    ``worker_id`` and ``lease_until`` say which worker holds the model's weights; a
    worker executes the model's futures only while it holds an unexpired lease.
    """

    __tablename__ = "training_models"
    __table_args__ = (UniqueConstraint("session_id", "model_seq_id"),)

    model_seq_id: Mapped[int] = mapped_column(Integer)
    base_model: Mapped[str] = mapped_column(String(500))
    lora_rank: Mapped[int | None] = mapped_column(Integer, nullable=True)
    lora_config: Mapped[str] = mapped_column(Text)
    optimizer_config: Mapped[str] = mapped_column(Text)
    user_metadata: Mapped[str] = mapped_column(Text)
    state: Mapped[str] = mapped_column(String(16))
    error: Mapped[str | None] = mapped_column(Text, nullable=True)
    created_at: Mapped[_dt.datetime] = mapped_column(UTCDateTime())
    last_request_time: Mapped[_dt.datetime] = mapped_column(UTCDateTime())
    worker_id: Mapped[str | None] = mapped_column(String(64), nullable=True)
    lease_until: Mapped[_dt.datetime | None] = mapped_column(UTCDateTime(), nullable=True)
    # 0004_privacy: the effective DP policy (JSON ``{"policy": {...} | null}``), the number of
    # completed optimizer steps, the encrypted auto-checkpoint that holds them (artifact id)
    # and the seq_id of the request that produced it, and the privacy spent (JSON).
    dp_policy: Mapped[str | None] = mapped_column(Text, nullable=True)
    step: Mapped[int | None] = mapped_column(Integer, nullable=True)
    state_ref: Mapped[str | None] = mapped_column(String(128), nullable=True)
    state_seq_id: Mapped[int | None] = mapped_column(Integer, nullable=True)
    privacy_spent: Mapped[str | None] = mapped_column(Text, nullable=True)
    # 0007_privacy_ledger: the ledger this run spends from (shared with the runs it was loaded
    # from or into, and with runs that registered the same data set); NULL without DP.
    ledger_id: Mapped[str | None] = mapped_column(String(40), nullable=True, index=True)


class PrivacyLedger(Base):
    """The privacy spent on one body of data, across every run that trains on it.

    A ledger is created with a run (``create_model``); a run created from a checkpoint
    (``load_weights``) spends from the ledger of the run that saved it, so reloading or
    branching never resets the budget. ``dataset_key`` is the keyed digest
    (:meth:`tensafe.storage.EncryptedArtifactStore.tenant_digest`) of a data set registered for
    server-side sampling: registering the same data set again continues its ledger.
    """

    __tablename__ = "privacy_ledgers"
    __table_args__ = (UniqueConstraint("tenant_id", "dataset_key"),)

    id: Mapped[str] = mapped_column(String(40), primary_key=True)
    tenant_id: Mapped[str] = mapped_column(String(64), ForeignKey("tenants.id"))
    dataset_key: Mapped[str | None] = mapped_column(String(64), nullable=True)
    created_at: Mapped[_dt.datetime] = mapped_column(UTCDateTime())


class PrivacySpend(Base):
    """One DP-SGD step charged to a ledger, recorded before the step runs (never removed).

    ``(model_id, step_index)`` is unique: a step retried after a crash reuses its spend.
    ``draw_blob`` holds the Poisson batch the engine drew for a server-sampled step, sealed
    under the tenant's DEK, until the step completes; a reload restores it instead of
    drawing again.
    """

    __tablename__ = "privacy_spends"
    __table_args__ = (UniqueConstraint("model_id", "step_index"),)

    id: Mapped[int] = mapped_column(Integer, primary_key=True, autoincrement=True)
    ledger_id: Mapped[str] = mapped_column(String(40), ForeignKey("privacy_ledgers.id"), index=True)
    tenant_id: Mapped[str] = mapped_column(String(64), ForeignKey("tenants.id"))
    model_id: Mapped[str] = mapped_column(String(200))
    step_index: Mapped[int] = mapped_column(Integer)
    noise_multiplier: Mapped[float] = mapped_column(Float)
    sample_rate: Mapped[float] = mapped_column(Float)
    created_at: Mapped[_dt.datetime] = mapped_column(UTCDateTime())
    draw_blob: Mapped[bytes | None] = mapped_column(LargeBinary, nullable=True)


class FutureRow(Base):
    """One submitted request and its eventual result (a durable future).

    ``(model_id, seq_id)`` is unique: re-submitting the same pair returns the same
    future. ``model_id`` is a training model id or a sampling session id; it is NULL for
    requests that belong to no model.
    """

    __tablename__ = "futures"
    __table_args__ = (UniqueConstraint("model_id", "seq_id"),)

    id: Mapped[str] = mapped_column(String(64), primary_key=True)
    tenant_id: Mapped[str] = mapped_column(String(64), ForeignKey("tenants.id"))
    model_id: Mapped[str | None] = mapped_column(String(200), nullable=True)
    seq_id: Mapped[int | None] = mapped_column(Integer, nullable=True)
    request_type: Mapped[str] = mapped_column(String(32))
    state: Mapped[str] = mapped_column(String(16), index=True)
    actor: Mapped[str] = mapped_column(String(64))
    request_sha256: Mapped[str] = mapped_column(String(64))
    payload_json: Mapped[str | None] = mapped_column(Text, nullable=True)
    payload_ref: Mapped[str | None] = mapped_column(String(128), nullable=True)
    # 0006_inline_records: a small payload / result sealed in the row (TSAF v1 under the
    # tenant's DEK, bound to the tenant and to payload_ref / result_ref as record id).
    payload_blob: Mapped[bytes | None] = mapped_column(LargeBinary, nullable=True)
    result_blob: Mapped[bytes | None] = mapped_column(LargeBinary, nullable=True)
    result_json: Mapped[str | None] = mapped_column(Text, nullable=True)
    result_ref: Mapped[str | None] = mapped_column(String(128), nullable=True)
    result_content_type: Mapped[str | None] = mapped_column(String(64), nullable=True)
    error: Mapped[str | None] = mapped_column(Text, nullable=True)
    error_category: Mapped[str | None] = mapped_column(String(16), nullable=True)
    worker_id: Mapped[str | None] = mapped_column(String(64), nullable=True)
    attempts: Mapped[int] = mapped_column(Integer)
    created_at: Mapped[_dt.datetime] = mapped_column(UTCDateTime())
    updated_at: Mapped[_dt.datetime] = mapped_column(UTCDateTime())
    started_at: Mapped[_dt.datetime | None] = mapped_column(UTCDateTime(), nullable=True)
    finished_at: Mapped[_dt.datetime | None] = mapped_column(UTCDateTime(), nullable=True)


class TrainingCheckpoint(Base):
    """A saved checkpoint: ``tinker://{model_id}/{kind}/{name}``, content in the encrypted store."""

    __tablename__ = "training_checkpoints"
    __table_args__ = (UniqueConstraint("model_id", "kind", "name"),)

    id: Mapped[str] = mapped_column(String(64), primary_key=True)
    tenant_id: Mapped[str] = mapped_column(String(64), ForeignKey("tenants.id"))
    model_id: Mapped[str] = mapped_column(String(200), ForeignKey("training_models.id"))
    kind: Mapped[str] = mapped_column(String(32))
    name: Mapped[str] = mapped_column(String(200))
    artifact_id: Mapped[str | None] = mapped_column(String(128), nullable=True)
    size_bytes: Mapped[int | None] = mapped_column(BigInteger, nullable=True)
    public: Mapped[bool] = mapped_column(Boolean)
    user_metadata: Mapped[str] = mapped_column(Text)
    created_at: Mapped[_dt.datetime] = mapped_column(UTCDateTime())
    expires_at: Mapped[_dt.datetime | None] = mapped_column(UTCDateTime(), nullable=True)


class PrivacyPolicyRow(Base):
    """A tenant's privacy policy, set with ``tensafe admin set-privacy-policy``."""

    __tablename__ = "privacy_policies"

    tenant_id: Mapped[str] = mapped_column(String(64), ForeignKey("tenants.id"), primary_key=True)
    target_epsilon: Mapped[float] = mapped_column(Float)
    delta: Mapped[float] = mapped_column(Float)
    clip_norm: Mapped[float] = mapped_column(Float)
    accountant: Mapped[str] = mapped_column(String(32))
    allow_non_private: Mapped[bool] = mapped_column(Boolean)
    dataset_size: Mapped[int | None] = mapped_column(Integer, nullable=True)
    expected_batch_size: Mapped[int | None] = mapped_column(Integer, nullable=True)
    max_steps: Mapped[int | None] = mapped_column(Integer, nullable=True)
    updated_at: Mapped[_dt.datetime] = mapped_column(UTCDateTime())


class SamplingSessionRow(SessionScoped, Base):
    """A sampling session ``{session}:sample:{n}``: a base model, or sampler weights in the store."""

    __tablename__ = "sampling_sessions"
    __table_args__ = (UniqueConstraint("session_id", "seq_id"),)

    seq_id: Mapped[int] = mapped_column(Integer)
    base_model: Mapped[str] = mapped_column(String(500))
    model_path: Mapped[str | None] = mapped_column(String(700), nullable=True)
    weights_ref: Mapped[str | None] = mapped_column(String(128), nullable=True)
    created_at: Mapped[_dt.datetime] = mapped_column(UTCDateTime())


class DownloadToken(Base):
    """A short-lived download URL of one exported file (migration ``0005_downloads``).

    Only the SHA-256 of the bearer token is stored. ``checkpoint_id`` and ``artifact_id``
    are checked against the live checkpoint at download time, so a deleted, expired or
    overwritten checkpoint makes its tokens useless (no foreign key: the rows outlive it
    until the expiry sweeper removes them).
    """

    __tablename__ = "download_tokens"

    id: Mapped[str] = mapped_column(String(32), primary_key=True)
    token_hash: Mapped[str] = mapped_column(String(64), unique=True)
    tenant_id: Mapped[str] = mapped_column(String(64), ForeignKey("tenants.id"))
    checkpoint_id: Mapped[str] = mapped_column(String(64))
    artifact_id: Mapped[str] = mapped_column(String(128))
    file_name: Mapped[str] = mapped_column(String(300))
    size_bytes: Mapped[int] = mapped_column(BigInteger)
    created_by: Mapped[str] = mapped_column(String(64))
    created_at: Mapped[_dt.datetime] = mapped_column(UTCDateTime())
    expires_at: Mapped[_dt.datetime] = mapped_column(UTCDateTime())
