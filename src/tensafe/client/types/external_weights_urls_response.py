"""``ExternalWeightsUrlsResponse``: download URLs of an external-weights checkpoint."""

from __future__ import annotations

import datetime as _dt

from tensafe.client.types._base import ResponseModel

__all__ = ["ExternalWeightsUrlsResponse"]


class ExternalWeightsUrlsResponse(ResponseModel):
    """``urls`` maps each file (relative to the checkpoint root) to its download URL.

    Each URL is a bearer capability: a plain GET fetches the file without an API key until
    ``expires``. Treat the URLs as secrets (do not log them).
    """

    urls: dict[str, str]
    expires: _dt.datetime
