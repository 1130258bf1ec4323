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

from tensafe.protocol._base import WireRequest, WireResponse
from tensafe.protocol._models import CheckpointName

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


class SaveWeightsExternalRequest(WireRequest):
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


class SetTtlRequest(WireRequest):
    """Body of ``PUT .../ttl``: seconds from now (3600 s to 10 years), or null for no expiry."""

    ttl_seconds: int | None


class ExternalWeightsUrlsResponse(WireResponse):
    """Answer of ``.../external_weights_urls``: one download URL per file, valid until ``expires``.

    ``urls`` maps each file (relative to the checkpoint root) to its download URL. Each URL
    is a bearer capability: a plain GET fetches the file without an API key until
    ``expires``. Treat the URLs as secrets (do not log them).
    """

    urls: dict[str, str]
    expires: _dt.datetime


# --------------------------------------------------------------------------- audit


class AuditRecordView(WireResponse):
    """One audit record as the server stores it (see ``docs/audit.md``); the SDK's ``AuditRecord``.

    Every field is always sent (the server builds the view from the stored record, as in
    export bundles); ``resource`` may be the empty string.
    """

    seq: int
    timestamp: str
    actor: str
    action: str
    resource: str
    details: dict[str, Any]
    prev_hash: str
    record_hash: str
    format: str


class AuditRecordsResponse(WireResponse):
    """The newest records of the tenant's chain, oldest first, and the chain's length."""

    records: list[AuditRecordView]
    total_count: int


class AuditVerification(WireResponse):
    """Whether the tenant's chain verified, and what was covered (or why it failed).

    ``checkpoint_every`` is the server's checkpoint interval the chain was checked
    against, ``known_length`` the length of the known head that was compared (None when
    none was given). The server re-verifies a tenant's whole chain at most once per
    interval: ``cached`` is true when this answer reuses a verification made at
    ``verified_at``; the comparison with a known head is made on every call.
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


class AuditHead(WireResponse):
    """A signed checkpoint of the tenant's chain: exactly a head file of ``docs/audit.md``.

    The newest one is ``GET /api/v1/tensafe/audit/head``. A client keeps it somewhere the
    server's operators cannot write and passes it back to the verification later, which
    then fails if the chain was rolled back below it or rewritten. :meth:`to_json` is a
    head file that ``tensafe audit verify-head HEAD.json --public-key PUB`` (its signature)
    and ``tensafe audit verify --known-head`` / ``verify-bundle --known-head`` accept.

    ``signature`` is the standard base64 of the hybrid signature. Neither the server's
    answer nor the SDK checks it: verify it with the deployment's public key obtained from
    the operator out of band (``tensafe keys export-public-key``, compared by ``key_id``),
    never with a key this server hands out (see ``docs/audit.md``, "Known heads").
    """

    format: str
    tenant: str
    length: int = Field(ge=0)
    head_hash: str
    timestamp: str
    key_id: str
    signature: str

    def to_json(self) -> str:
        """The head file: this object as JSON, one member per line."""
        return self.model_dump_json(indent=2) + "\n"


# --------------------------------------------------------------------------- artifacts and privacy


class ArtifactInfo(WireResponse):
    """An artifact of the encrypted store and what references it.

    ``role`` is ``request_payload`` (training data of a request not finished yet),
    ``result`` (a future's result), ``checkpoint`` (a saved state or sampler weights) or
    ``training_state`` (the automatic checkpoint); a plain string, so that an older
    server's ``other`` still parses.
    """

    artifact_id: str
    role: str
    request_id: str | None = None
    training_run_id: str | None = None
    tinker_path: str | None = None
    size_bytes: int | None = None
    created_at: _dt.datetime | None = None


class ArtifactsResponse(WireResponse):
    """A page of the tenant's artifacts."""

    artifacts: list[ArtifactInfo]
    total_count: int


class PrivacyReport(WireResponse):
    """What a run has spent of its privacy budget.

    Attributes:
        training_run_id: The run (model id).
        dp_enabled: Whether DP-SGD applies to the run.
        epsilon_spent: ε spent so far at ``delta``.
        target_epsilon: The budget (the run stops before exceeding it).
        delta: δ.
        accountant: The accountant that computed ε (``rdp``, ``prv``, ...).
        steps: Optimizer steps taken under DP.
        noise_multiplier: σ, when fixed.
        max_grad_norm: The per-example clipping norm.
        sampling: How batches were formed (``client_chosen_batches`` or ``server_poisson``).
        extra: The policy's source, sampling rate, data set size, expected batch size and
            max steps.
    """

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
    extra: dict[str, Any] | None = None
