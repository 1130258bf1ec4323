"""Re-exports ``CheckpointType`` and ``ParsedCheckpointTinkerPath`` from :mod:`tensafe.protocol`."""

from __future__ import annotations

from tensafe.protocol import CheckpointType, ParsedCheckpointTinkerPath

__all__ = ["CheckpointType", "ParsedCheckpointTinkerPath"]
