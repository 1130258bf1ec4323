"""``ExternalWeightsUrlsResponse``: re-exported from :mod:`tensafe.protocol.tensafe` (one definition)."""

from __future__ import annotations

from tensafe.protocol.tensafe import ExternalWeightsUrlsResponse

__all__ = ["ExternalWeightsUrlsResponse"]
