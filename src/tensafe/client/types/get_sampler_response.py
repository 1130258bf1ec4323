"""``GetSamplerResponse``: a sampling session's base model and weights path."""

from __future__ import annotations

from tensafe.client.types._base import ResponseModel

__all__ = ["GetSamplerResponse"]


class GetSamplerResponse(ResponseModel):
    """``sampler_id`` is the sampling session id (``<session>:sample:<n>``).

    ``model_path`` is the ``tinker://`` path of the sampler weights, or ``None`` for a
    sampler on the base model or on an ephemeral snapshot.
    """

    sampler_id: str
    base_model: str
    model_path: str | None = None
