"""``LoadWeightsResponse``: the result of loading a saved state."""

from __future__ import annotations

from tensafe.client.types._base import ResponseModel

__all__ = ["LoadWeightsResponse"]


class LoadWeightsResponse(ResponseModel):
    """The loaded path and the model it was loaded into, when the server says so."""

    path: str | None = None
    model_id: str | None = None
