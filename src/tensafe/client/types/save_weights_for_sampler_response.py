"""``SaveWeightsForSamplerResponse``: where sampler weights were stored."""

from __future__ import annotations

from tensafe.client.types._base import ResponseModel

__all__ = ["SaveWeightsForSamplerResponse"]


class SaveWeightsForSamplerResponse(ResponseModel):
    """``path`` (named snapshot) or ``sampling_session_id`` (ephemeral snapshot)."""

    path: str | None = None
    sampling_session_id: str | None = None
