"""``Datum``: one training example (model input plus the loss function's inputs)."""

from __future__ import annotations

from typing import Any

import numpy as np
from pydantic import Field, field_validator

from tensafe.client.types._base import RequestModel
from tensafe.client.types.model_input import ModelInput
from tensafe.client.types.tensor_data import TensorData

__all__ = ["Datum"]

#: Plain lists under these keys become int64 (all other known keys become float32).
_INT_KEYS = frozenset({"target_tokens"})
_FLOAT_KEYS = frozenset(
    {"weights", "advantages", "logprobs", "clip_low_threshold", "clip_high_threshold", "sequence_ratio_mask"}
)


class Datum(RequestModel):
    """A training example.

    ``loss_fn_inputs`` values may be :class:`TensorData`, NumPy arrays or plain lists; lists
    are converted as the Tinker SDK does: ``target_tokens`` to int64, ``weights``,
    ``advantages``, ``logprobs`` and the clip thresholds to float32. Any other key needs an
    explicit ``TensorData`` or array.
    """

    model_input: ModelInput
    loss_fn_inputs: dict[str, TensorData] = Field(default_factory=dict)

    @field_validator("loss_fn_inputs", mode="before")
    @classmethod
    def _convert(cls, value: Any) -> Any:
        if not isinstance(value, dict):
            return value
        out: dict[str, Any] = {}
        for key, item in value.items():
            if isinstance(item, (TensorData, dict)):
                out[key] = item
            elif key in _INT_KEYS:
                arr = np.asarray(item, dtype=np.int64)
                out[key] = TensorData(data=arr.ravel().tolist(), dtype="int64", shape=list(arr.shape))
            elif key in _FLOAT_KEYS:
                arr = np.asarray(item, dtype=np.float32)
                out[key] = TensorData(data=arr.ravel().tolist(), dtype="float32", shape=list(arr.shape))
            elif isinstance(item, np.ndarray):
                out[key] = TensorData.from_numpy(item)
            else:
                raise ValueError(f"loss_fn_inputs[{key!r}]: pass a TensorData or a NumPy array for this key")
        return out
