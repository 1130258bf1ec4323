"""Wire models of "bring your own adapter" and checkpoint search (Tinker 0.39's names).

Tinker 0.39 added three calls that this module describes; their names and fields follow
Tinker's published 0.39 API reference, so that the official SDK can use them once it is
installable (0.38.0 stays the pinned SDK here):

* ``POST /api/v1/external_weights_upload_start``: :class:`ExternalWeightsUploadStartRequest`
  -> :class:`ExternalWeightsUploadStartResponse` (one signed, expiring, single-use ``PUT`` URL
  per file of a PEFT LoRA adapter);
* ``POST /api/v1/external_weights_upload_finish``: :class:`ExternalWeightsUploadFinishRequest`
  -> :class:`ExternalWeightsUploadFinishResponse` (the ``tinker://`` path of the
  ``external_weights`` checkpoint holding the verified weights);
* ``POST /api/v1/checkpoints/search`` (the path is TenSafe's choice: the published excerpts do
  not name it): :class:`CheckpointSearchRequest` -> :class:`CheckpointSearchResponse`, newest
  first, paginated with a ``(created, checkpoint id)`` cursor.

Requests (and the cursor, sent back in the next request) derive from
:class:`~tensafe.protocol._base.WireRequest`, answers from
:class:`~tensafe.protocol._base.WireResponse`, as everywhere in :mod:`tensafe.protocol`:
strict on the server, lenient in the SDK (:func:`~tensafe.protocol._base.parse_lenient`).
TenSafe has no projects: ``destination_project_id`` and ``project_ids`` are accepted by the
schema (Tinker's names) and refused by the server with a 400 when they are not null. Imports
nothing but pydantic.
"""

from __future__ import annotations

import datetime as _dt
from typing import Annotated, Literal

from pydantic import AwareDatetime, Field, StringConstraints

from tensafe.protocol._base import WireRequest, WireResponse
from tensafe.protocol._models import Checkpoint, LoraConfig

__all__ = [
    "ADAPTER_FILES",
    "CHECKPOINT_SEARCH_MAX_LIMIT",
    "CheckpointSearchCursor",
    "CheckpointSearchRequest",
    "CheckpointSearchResponse",
    "ExternalWeightsUploadFinishRequest",
    "ExternalWeightsUploadFinishResponse",
    "ExternalWeightsUploadStartRequest",
    "ExternalWeightsUploadStartResponse",
    "UploadId",
]

#: The files of an uploaded PEFT LoRA adapter, each sent with one ``PUT`` to its URL.
ADAPTER_FILES: tuple[str, str] = ("adapter_config.json", "adapter_model.safetensors")
#: Most checkpoints one search answers.
CHECKPOINT_SEARCH_MAX_LIMIT = 200

#: An upload id as the server issues it (``xw-`` and 32 hex digits).
UploadId = Annotated[str, StringConstraints(pattern=r"^xw-[0-9a-f]{32}$")]
_Short = Annotated[str, StringConstraints(min_length=1, max_length=200)]
_MetaKey = Annotated[str, StringConstraints(min_length=1, max_length=200)]
_MetaValue = Annotated[str, StringConstraints(max_length=2000)]


class ExternalWeightsUploadStartRequest(WireRequest):
    """Start uploading a LoRA adapter trained elsewhere, for ``base_model``.

    ``lora_config.rank`` must equal the adapter's ``r``; the ``train_*`` flags bound the
    modules its tensors may adapt. ``destination_project_id`` must be null (no projects here).
    """

    base_model: Annotated[str, StringConstraints(min_length=1, max_length=500)]
    lora_config: LoraConfig
    destination_project_id: _Short | None = None
    type: Literal["external_weights_upload_start"] | None = None


class ExternalWeightsUploadStartResponse(WireResponse):
    """``upload_id``, one ``PUT`` URL per file (see :data:`ADAPTER_FILES`), their expiry."""

    upload_id: str
    urls: dict[str, str]
    expires: _dt.datetime


class ExternalWeightsUploadFinishRequest(WireRequest):
    """Finish an upload: the server verifies the files and records the checkpoint."""

    upload_id: UploadId
    type: Literal["external_weights_upload_finish"] | None = None


class ExternalWeightsUploadFinishResponse(WireResponse):
    """Tinker path of the external weights checkpoint holding the uploaded weights."""

    tinker_path: str


class CheckpointSearchCursor(WireRequest):
    """Where the next page starts: after the checkpoint ``(last_created_at, last_checkpoint_uuid)``."""

    last_created_at: AwareDatetime
    last_checkpoint_uuid: Annotated[str, StringConstraints(min_length=1, max_length=64)]


class CheckpointSearchRequest(WireRequest):
    """Search the caller's checkpoints (every given filter must hold).

    * ``user_metadata``: exact matches, every pair must hold;
    * ``checkpoint_type``: ``training`` (``weights``), ``sampler`` (``sampler_weights``) or
      ``external`` (``external_weights``);
    * ``base_models``: any of them; an empty list matches nothing;
    * ``owner``: the caller's own tenant (the default); anything else is a 400;
    * ``project_ids``: must be null (no projects here).
    """

    project_ids: Annotated[list[_Short], Field(max_length=100)] | None = None
    user_metadata: Annotated[dict[_MetaKey, _MetaValue], Field(max_length=50)] = Field(default_factory=dict)
    checkpoint_type: Literal["training", "sampler", "external"] | None = None
    owner: _Short | None = None
    base_models: (
        Annotated[list[Annotated[str, StringConstraints(max_length=500)]], Field(max_length=100)] | None
    ) = None
    limit: Annotated[int, Field(ge=1, le=CHECKPOINT_SEARCH_MAX_LIMIT)] = 50
    cursor: CheckpointSearchCursor | None = None


class CheckpointSearchResponse(WireResponse):
    """One page of checkpoints, newest first, and the cursor of the next page (None: no more)."""

    checkpoints: list[Checkpoint]
    next_cursor: CheckpointSearchCursor | None = None
