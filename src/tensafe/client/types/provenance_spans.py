"""``PromptProvenanceSpan``, ``SampledProvenanceSpan``, ``ProvenanceSpans``: from :mod:`tensafe.protocol`.

Attach them to a :class:`~tensafe.protocol.Datum` with ``Datum.with_provenance`` (one
definition, shared with the server; the names are the Tinker SDK's).
"""

from __future__ import annotations

from tensafe.protocol import PromptProvenanceSpan, ProvenanceSpans, SampledProvenanceSpan

__all__ = ["PromptProvenanceSpan", "ProvenanceSpans", "SampledProvenanceSpan"]
