"""``AdamParams``: per-step AdamW hyperparameters (the server's validated model)."""

from __future__ import annotations

from tensafe.protocol import AdamParams

__all__ = ["AdamParams"]
