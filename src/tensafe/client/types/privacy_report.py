"""``PrivacyReport``: re-exported from :mod:`tensafe.protocol.tensafe` (one definition)."""

from __future__ import annotations

from tensafe.protocol.tensafe import PrivacyReport

__all__ = ["PrivacyReport"]
