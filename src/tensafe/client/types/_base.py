"""Base classes of the SDK's wire types: strict requests, tolerant responses."""

from __future__ import annotations

from pydantic import BaseModel, ConfigDict

__all__ = ["RequestModel", "ResponseModel"]


class RequestModel(BaseModel):
    """What the SDK sends: frozen, unknown fields refused."""

    model_config = ConfigDict(extra="forbid", frozen=True, protected_namespaces=())


class ResponseModel(BaseModel):
    """What the server answers: unknown fields ignored, so newer servers stay compatible."""

    model_config = ConfigDict(extra="ignore", protected_namespaces=())
