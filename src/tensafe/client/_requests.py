"""How the SDK turns a call into a JSON request body and a JSON answer into a result.

Every JSON body the SDK sends is an instance of the request model of
:mod:`tensafe.protocol` dumped with ``model_dump(mode="json", exclude_none=...)``, so the
SDK cannot send a field the server's (strict) model does not define. The instance is
built with ``model_construct``: the server validates it, as it validates the official
SDK's bodies, so a value it refuses comes back as the server's 4xx answer and not as a
local validation error (the same behaviour as the Tinker SDK). Answers and future results
are parsed leniently (:func:`tensafe.protocol.parse_lenient`).
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any, TypeVar

from pydantic import BaseModel, ValidationError

from tensafe.client._exceptions import APIResponseValidationError
from tensafe.protocol import WireRequest, parse_lenient

__all__ = ["json_result", "wire_body"]

M = TypeVar("M", bound=BaseModel)


def wire_body(model: type[WireRequest], /, *, exclude_none: bool = True, **fields: Any) -> dict[str, Any]:
    """The JSON body of a ``model`` request holding ``fields``.

    Fields whose value is ``None`` are left out when ``exclude_none`` (the protocol's
    default), as the Tinker SDK leaves them out.

    Raises:
        TypeError: A field the protocol model does not define (a bug of the SDK, never sent).
    """
    unknown = set(fields) - set(model.model_fields)
    if unknown:
        raise TypeError(f"{model.__name__} has no field(s) {sorted(unknown)}")
    body: dict[str, Any] = model.model_construct(**fields).model_dump(mode="json", exclude_none=exclude_none)
    return body


def json_result(model: type[M]) -> Callable[[Any], M]:
    """A decoder of a future's JSON result as ``model`` (unknown fields ignored).

    The decoder raises :class:`APIResponseValidationError` when a known field is missing or
    has the wrong type.
    """

    def decode(body: Any) -> M:
        try:
            return parse_lenient(model, body)
        except ValidationError as exc:
            raise APIResponseValidationError(
                f"unexpected {model.__name__} result: {exc.error_count()} validation errors"
            ) from None

    return decode
