"""``SampleResponse``: re-exported from :mod:`tensafe.protocol` (one definition)."""

from __future__ import annotations

from tensafe.protocol import SampleResponse

__all__ = ["SampleResponse"]
