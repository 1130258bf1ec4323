"""``ForwardBackwardOutput``: per-datum outputs and metrics of a forward(/backward) pass."""

from __future__ import annotations

from pydantic import Field

from tensafe.client.types._base import ResponseModel
from tensafe.client.types.tensor_data import TensorData

__all__ = ["ForwardBackwardOutput"]


class ForwardBackwardOutput(ResponseModel):
    """``loss_fn_outputs[i]["logprobs"]`` holds datum ``i``'s target logprobs.

    Metric keys look like ``name:reduction`` (``loss:sum``).
    """

    loss_fn_output_type: str = ""
    loss_fn_outputs: list[dict[str, TensorData]] = Field(default_factory=list)
    metrics: dict[str, float] = Field(default_factory=dict)
