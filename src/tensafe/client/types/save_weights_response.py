"""``SaveWeightsResponse``: where ``save_state`` stored the training state."""

from __future__ import annotations

from tensafe.client.types._base import ResponseModel

__all__ = ["SaveWeightsResponse"]


class SaveWeightsResponse(ResponseModel):
    """``path`` is ``tinker://<run id>/weights/<name>``."""

    path: str
