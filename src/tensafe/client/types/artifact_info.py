"""``ArtifactInfo``, ``ArtifactsResponse``: from :mod:`tensafe.protocol.tensafe` (one definition)."""

from __future__ import annotations

from tensafe.protocol.tensafe import ArtifactInfo, ArtifactsResponse

__all__ = ["ArtifactInfo", "ArtifactsResponse"]
