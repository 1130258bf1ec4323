"""Errors of the wire protocol (layer 0): one small tree rooted at :class:`ProtocolError`.

``ProtocolError`` derives from :class:`ValueError` as well as
:class:`~tensafe.errors.TenSafeError`: a malformed wire value is a bad argument, and SDK
callers that catch ``ValueError`` (as the official ``tinker`` SDK documents) keep working.
The server maps these errors to a 400 answer; messages name the expected form and never
echo more than the first 80 characters of the input.
"""

from __future__ import annotations

from tensafe.errors import TenSafeError

__all__ = ["InvalidTinkerPathError", "ProtocolError"]


class ProtocolError(TenSafeError, ValueError):
    """A value does not follow the wire protocol."""


class InvalidTinkerPathError(ProtocolError):
    """A string is not a valid ``tinker://<training_run_id>/<kind>/<name>`` checkpoint path."""
