"""``OptimStepResponse``: the result of an optimizer step."""

from __future__ import annotations

from tensafe.client.types._base import ResponseModel

__all__ = ["OptimStepResponse"]


class OptimStepResponse(ResponseModel):
    """Metrics of the step (``name:reduction`` keys), when the server reports any."""

    metrics: dict[str, float] | None = None
