"""``SaveWeightsExternalResponse``: re-exported from :mod:`tensafe.protocol` (one definition)."""

from __future__ import annotations

from tensafe.protocol import SaveWeightsExternalResponse

__all__ = ["SaveWeightsExternalResponse"]
