"""``ArtifactInfo``: one encrypted artifact the server holds for the tenant."""

from __future__ import annotations

import datetime as _dt

from tensafe.client.types._base import ResponseModel

__all__ = ["ArtifactInfo", "ArtifactsResponse"]


class ArtifactInfo(ResponseModel):
    """An artifact of the encrypted store and what references it.

    ``role`` is ``request_payload`` (training data of a request), ``result`` (a future's
    result), ``checkpoint`` (a saved state or sampler weights) or ``other``.
    """

    artifact_id: str
    role: str
    request_id: str | None = None
    training_run_id: str | None = None
    tinker_path: str | None = None
    size_bytes: int | None = None
    created_at: _dt.datetime | None = None


class ArtifactsResponse(ResponseModel):
    """A page of the tenant's artifacts."""

    artifacts: list[ArtifactInfo]
    total_count: int
