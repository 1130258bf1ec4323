"""Results of TenSafe's server-side Poisson sampling operations."""

from __future__ import annotations

from tensafe.client.types._base import ResponseModel

__all__ = ["RegisterDatasetResponse", "TrainStepResponse"]


class RegisterDatasetResponse(ResponseModel):
    """The registered data set's size ``N`` (the privacy units the engine samples from)."""

    dataset_size: int


class TrainStepResponse(ResponseModel):
    """Metrics of one server-sampled step and the size of the batch the engine drew."""

    metrics: dict[str, float] | None = None
    batch_size: int
