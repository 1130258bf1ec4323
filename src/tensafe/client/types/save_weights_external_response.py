"""``SaveWeightsExternalResponse``: where ``save_weights_external`` stored the export."""

from __future__ import annotations

from tensafe.client.types._base import ResponseModel

__all__ = ["SaveWeightsExternalResponse"]


class SaveWeightsExternalResponse(ResponseModel):
    """``path`` is ``tinker://<run id>/external_weights/<name>``.

    ``size_bytes`` (a TenSafe addition, optional on the wire) is the total size of the
    exported files.
    """

    path: str
    size_bytes: int | None = None
