"""``TensorData``: re-exported from :mod:`tensafe.protocol` (one definition)."""

from __future__ import annotations

from tensafe.protocol import TensorData

__all__ = ["TensorData"]
