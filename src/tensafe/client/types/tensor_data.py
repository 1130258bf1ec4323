"""``TensorData``: a dense int64 or float32 array as it travels on the wire."""

from __future__ import annotations

from typing import Any, Literal

import numpy as np
from pydantic import Field

from tensafe.client.types._base import RequestModel

__all__ = ["TensorData"]


class TensorData(RequestModel):
    """A flat list of values with a dtype and an optional shape (absent: 1-D)."""

    data: list[int] | list[float] = Field(default_factory=list)
    dtype: Literal["int64", "float32"]
    shape: list[int] | None = None

    @classmethod
    def from_numpy(cls, array: Any) -> TensorData:
        """Build from a NumPy array (integers become int64, the rest float32)."""
        arr = np.asarray(array)
        if np.issubdtype(arr.dtype, np.integer) or arr.dtype == np.bool_:
            return cls(data=arr.astype(np.int64).ravel().tolist(), dtype="int64", shape=list(arr.shape))
        return cls(data=arr.astype(np.float32).ravel().tolist(), dtype="float32", shape=list(arr.shape))

    def to_numpy(self) -> np.ndarray:
        """Return the values as a NumPy array of the right dtype and shape."""
        arr = np.asarray(self.data, dtype=np.int64 if self.dtype == "int64" else np.float32)
        return arr.reshape(self.shape) if self.shape is not None else arr

    def tolist(self) -> list[Any]:
        """Return the values as (nested) Python lists."""
        result: list[Any] = self.to_numpy().tolist()
        return result
