"""Re-exports ``RegisterDatasetResponse`` and ``TrainStepResponse`` from :mod:`tensafe.protocol`."""

from __future__ import annotations

from tensafe.protocol import RegisterDatasetResponse, TrainStepResponse

__all__ = ["RegisterDatasetResponse", "TrainStepResponse"]
