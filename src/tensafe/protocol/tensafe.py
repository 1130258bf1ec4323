"""Wire models of TenSafe's own endpoints (not part of Tinker's protocol), shared by server and SDK.

One definition per type: the server builds and validates these, the TenSafe SDK parses
them. Requests are strict (``extra="forbid"``: an unknown field is a 422), responses are
tolerant (``extra="ignore"``), as every model of :mod:`tensafe.protocol`.

* Checkpoint lifecycle (``docs/server.md``, "Checkpoint lifecycle"):
  :class:`SaveWeightsExternalRequest`, :class:`SetTtlRequest`,
  :class:`ExternalWeightsUrlsResponse`.
* ``/api/v1/tensafe/...``: the audit chain (:class:`AuditRecordsResponse`,
  :class:`AuditHead`, :class:`AuditVerification`), the artifacts listing
  (:class:`ArtifactsResponse`) and a run's privacy budget (:class:`PrivacyReport`).
"""

from __future__ import annotations

import datetime as _dt
from typing import Annotated, Any, Final, Literal

from pydantic import Field, StringConstraints

from tensafe.protocol._models import CheckpointName, _Request, _Response

__all__ = [
    "MAX_TTL_SECONDS",
    "MIN_TTL_SECONDS",
    "ArtifactInfo",
    "ArtifactsResponse",
    "AuditHead",
    "AuditRecordView",
    "AuditRecordsResponse",
    "AuditVerification",
    "ExternalWeightsUrlsResponse",
    "PrivacyReport",
    "SaveWeightsExternalRequest",
    "SetTtlRequest",
]

#: Shortest and longest checkpoint TTL (the SDK's documented range: 1 hour to 10 years).
MIN_TTL_SECONDS: Final = 3600
MAX_TTL_SECONDS: Final = 10 * 366 * 86400


# --------------------------------------------------------------------------- checkpoints


class SaveWeightsExternalRequest(_Request):
    """Body of ``/save_weights_external`` (strict: unknown fields are refused)."""

    model_id: Annotated[
        str, StringConstraints(min_length=1, max_length=200, pattern=r"^[A-Za-z0-9][A-Za-z0-9:._-]*$")
    ]
    path: CheckpointName
    seq_id: Annotated[int, Field(ge=0, le=2**31 - 1)]
    ttl_seconds: Annotated[int, Field(ge=MIN_TTL_SECONDS, le=MAX_TTL_SECONDS)] | None = None
    age_encryption_recipients: (
        Annotated[
            list[Annotated[str, StringConstraints(min_length=1, max_length=16384)]], Field(max_length=64)
        ]
        | None
    ) = None
    type: Literal["save_weights_external"] | None = None


class SetTtlRequest(_Request):
    """Body of ``PUT .../ttl``: seconds from now (3600 s to 10 years), or null for no expiry."""

    ttl_seconds: int | None


class ExternalWeightsUrlsResponse(_Response):
    """Answer of ``.../external_weights_urls``: one download URL per file, valid until ``expires``."""

    urls: dict[str, str]
    expires: _dt.datetime


# --------------------------------------------------------------------------- audit


class AuditRecordView(_Response):
    """One audit record (see ``docs/audit.md``)."""

    seq: int
    timestamp: str
    actor: str
    action: str
    resource: str
    details: dict[str, Any]
    prev_hash: str
    record_hash: str
    format: str


class AuditRecordsResponse(_Response):
    """The newest records of the tenant's chain, oldest first."""

    records: list[AuditRecordView]
    total_count: int


class AuditVerification(_Response):
    """The outcome of verifying the tenant's chain.

    ``cached`` is true when the chain verification was made before this call (at
    ``verified_at``); the comparison with a known head (``known_length``) is made on
    every call.
    """

    verified: bool
    length: int = 0
    head_hash: str | None = None
    checkpoints: int = 0
    signed_length: int = 0
    unsigned_tail: int = 0
    checkpoint_every: int = 0
    known_length: int | None = None
    cached: bool = False
    verified_at: _dt.datetime | None = None
    reason: str | None = None


class AuditHead(_Response):
    """A signed checkpoint of the tenant's chain: exactly a head file of ``docs/audit.md``.

    ``signature`` is the standard base64 of the hybrid signature. Verify it with the
    deployment's public key obtained from the operator, never with a key this server
    hands out (``tensafe audit verify-head``).
    """

    format: str
    tenant: str
    length: int
    head_hash: str
    timestamp: str
    key_id: str
    signature: str


# --------------------------------------------------------------------------- artifacts and privacy


class ArtifactInfo(_Response):
    """An artifact of the encrypted store and what references it."""

    artifact_id: str
    role: str
    request_id: str | None = None
    training_run_id: str | None = None
    tinker_path: str | None = None
    size_bytes: int | None = None
    created_at: _dt.datetime | None = None


class ArtifactsResponse(_Response):
    """A page of the tenant's artifacts."""

    artifacts: list[ArtifactInfo]
    total_count: int


class PrivacyReport(_Response):
    """The privacy budget of a run."""

    training_run_id: str
    dp_enabled: bool = True
    epsilon_spent: float | None = None
    target_epsilon: float | None = None
    delta: float | None = None
    accountant: str | None = None
    steps: int = 0
    noise_multiplier: float | None = None
    max_grad_norm: float | None = None
    sampling: str | None = None
    extra: dict[str, Any] | None = Field(default=None)
