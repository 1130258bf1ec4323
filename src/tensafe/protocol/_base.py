"""The base classes of every wire model, and the SDK's lenient parsing.

Every wire type is defined once, in :mod:`tensafe.protocol`, and used by both sides:

* **Strict by default.** :class:`WireRequest` refuses unknown fields (``extra="forbid"``)
  wherever it is validated without a context: the server (FastAPI validates bodies that
  way) answers 422 to a field the protocol does not define. :class:`WireResponse` ignores
  unknown fields (the server only produces responses; tolerance there costs nothing).
* **Lenient in the SDK.** The SDK validates every answer with :func:`parse_lenient` /
  :func:`parse_lenient_json`, which pass the validation context :data:`LENIENT`: the
  ``before`` validator of :class:`WireModel` then drops the keys the class does not know,
  at every nesting level (pydantic hands the context down to nested models). A newer
  server may thus add a field anywhere without breaking an older SDK, and the class is
  still one definition: the strictness is chosen at validation time, not by a twin class.

Nothing else differs between the two modes: types, bounds and defaults are the same.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any, Final, TypeVar

from pydantic import BaseModel, ConfigDict, ValidationInfo, model_validator

__all__ = ["LENIENT", "WireModel", "WireRequest", "WireResponse", "parse_lenient", "parse_lenient_json"]

_MODE_KEY: Final = "tensafe.protocol.extra"

#: Validation context under which unknown fields are dropped instead of refused.
LENIENT: Final[Mapping[str, str]] = {_MODE_KEY: "ignore"}

M = TypeVar("M", bound=BaseModel)


class WireModel(BaseModel):
    """Root of the wire models: unknown fields refused, or dropped under :data:`LENIENT`."""

    model_config = ConfigDict(extra="forbid", protected_namespaces=())

    @model_validator(mode="before")
    @classmethod
    def _drop_unknown_when_lenient(cls, data: Any, info: ValidationInfo) -> Any:
        context = info.context
        if not isinstance(data, dict) or not context or context.get(_MODE_KEY) != "ignore":
            return data
        known = _known_keys(cls)
        if known.issuperset(data):
            return data
        return {key: value for key, value in data.items() if key in known}


def _known_keys(cls: type[BaseModel]) -> frozenset[str]:
    keys: set[str] = set()
    for name, info in cls.model_fields.items():
        keys.add(name)
        if isinstance(info.alias, str):
            keys.add(info.alias)
        if isinstance(info.validation_alias, str):
            keys.add(info.validation_alias)
    return frozenset(keys)


class WireRequest(WireModel):
    """What a client sends: frozen, strict (unknown fields refused by the server)."""

    model_config = ConfigDict(frozen=True)


class WireResponse(WireModel):
    """What the server answers: unknown fields ignored on every side."""

    model_config = ConfigDict(extra="ignore")


def parse_lenient(model: type[M], data: Any) -> M:
    """Validate ``data`` (a decoded JSON value) as ``model``, dropping unknown fields at any depth.

    Raises:
        pydantic.ValidationError: A known field is missing or has the wrong type.
    """
    return model.model_validate(data, context=dict(LENIENT))


def parse_lenient_json(model: type[M], raw: str | bytes) -> M:
    """Validate a JSON document as ``model``, dropping unknown fields at any depth.

    Raises:
        pydantic.ValidationError: Not JSON, or a known field is missing or has the wrong type.
    """
    return model.model_validate_json(raw, context=dict(LENIENT))
