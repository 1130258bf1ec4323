"""``SampledSequence``: re-exported from :mod:`tensafe.protocol` (one definition)."""

from __future__ import annotations

from tensafe.protocol import SampledSequence

__all__ = ["SampledSequence"]
