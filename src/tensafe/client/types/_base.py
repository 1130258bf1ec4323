"""Base classes of the SDK's remaining TenSafe-route types: the protocol's own (one definition).

``RequestModel`` is :class:`tensafe.protocol.WireRequest` and ``ResponseModel``
:class:`tensafe.protocol.WireResponse`; the SDK parses answers with
:func:`tensafe.protocol.parse_lenient`.
"""

from __future__ import annotations

from tensafe.protocol import WireRequest as RequestModel
from tensafe.protocol import WireResponse as ResponseModel

__all__ = ["RequestModel", "ResponseModel"]
