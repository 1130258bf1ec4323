"""Results of TenSafe's server-side Poisson sampling operations."""

from __future__ import annotations

from tensafe.client.types._base import ResponseModel

__all__ = ["RegisterDatasetResponse", "TrainStepResponse"]


class RegisterDatasetResponse(ResponseModel):
    """The registered data set's size ``N`` (the privacy units the engine samples from)."""

    dataset_size: int


class TrainStepResponse(ResponseModel):
    """What one server-sampled step released: the noisy update's figures and ε.

    ``metrics`` holds ``grad_norm:mean`` (of the noisy gradient), ``learning_rate:mean`` and
    ``dp_epsilon:max``. The drawn batch's size and loss are not returned: they are
    statistics of the private batch, not covered by the DP guarantee.
    """

    metrics: dict[str, float] | None = None
