"""Canonical JSON for hashing and signing: a strict subset of RFC 8785 (JCS).

The rules (also in docs/audit.md):

* Values are objects with string keys, arrays, strings, integers, ``true``, ``false``
  and ``null``. Floating-point numbers are refused (write them as decimal strings, e.g.
  ``"epsilon": "1.83"``), and so are integers outside ``±(2**53 - 1)``, because RFC 8785
  serialises numbers as IEEE-754 doubles and those would not round-trip.
* Object members are sorted by their keys compared as UTF-16 code units (RFC 8785
  §3.2.3); duplicate keys cannot occur in input from Python and are refused when parsing.
* No whitespace between tokens. Strings are written as in RFC 8785 §3.2.2.2: ``"`` and
  ``\\`` are escaped, U+0008/0009/000A/000C/000D as ``\\b \\t \\n \\f \\r``, other
  controls below U+0020 as ``\\u00xx`` (lower-case hex), everything else literally.
  Lone surrogates are refused.
* The output is UTF-8.

Under these restrictions the output is byte-for-byte what any RFC 8785 implementation
produces, which ``tests/audit`` checks against the independent ``rfc8785`` package.
"""

from __future__ import annotations

import json
from collections.abc import Mapping, Sequence
from typing import Any

from tensafe.audit.errors import AuditError

__all__ = ["MAX_DEPTH", "MAX_SAFE_INTEGER", "JSONValue", "canonical_json", "parse_json_strict"]

#: Largest integer that an IEEE-754 double represents exactly (RFC 8785 / I-JSON).
MAX_SAFE_INTEGER = 2**53 - 1

#: Deepest nesting of arrays and objects accepted when encoding or parsing.
MAX_DEPTH = 32

JSONValue = None | bool | int | str | list["JSONValue"] | dict[str, "JSONValue"]

_ESCAPES = {
    '"': '\\"',
    "\\": "\\\\",
    "\b": "\\b",
    "\t": "\\t",
    "\n": "\\n",
    "\f": "\\f",
    "\r": "\\r",
}


def _encode_string(value: str) -> str:
    out = ['"']
    for ch in value:
        code = ord(ch)
        if ch in _ESCAPES:
            out.append(_ESCAPES[ch])
        elif code < 0x20:
            out.append(f"\\u{code:04x}")
        elif 0xD800 <= code <= 0xDFFF:
            raise AuditError("canonical JSON refuses strings holding lone surrogates")
        else:
            out.append(ch)
    out.append('"')
    return "".join(out)


def _utf16_key(key: str) -> bytes:
    return key.encode("utf-16-be", "surrogatepass")


def _encode(value: Any, depth: int, out: list[str]) -> None:
    if depth > MAX_DEPTH:
        raise AuditError(f"canonical JSON refuses nesting deeper than {MAX_DEPTH}")
    if value is None:
        out.append("null")
    elif value is True:
        out.append("true")
    elif value is False:
        out.append("false")
    elif isinstance(value, int):
        if not -MAX_SAFE_INTEGER <= value <= MAX_SAFE_INTEGER:
            raise AuditError("canonical JSON refuses integers beyond ±(2**53-1): write them as strings")
        out.append(str(int(value)))
    elif isinstance(value, float):
        raise AuditError("canonical JSON refuses floating-point numbers: write them as decimal strings")
    elif isinstance(value, str):
        out.append(_encode_string(value))
    elif isinstance(value, Mapping):
        for key in value:
            if not isinstance(key, str):
                raise AuditError("canonical JSON object keys must be strings")
        out.append("{")
        first = True
        for key in sorted(value, key=_utf16_key):
            if not first:
                out.append(",")
            first = False
            out.append(_encode_string(key))
            out.append(":")
            _encode(value[key], depth + 1, out)
        out.append("}")
    elif isinstance(value, Sequence) and not isinstance(value, bytes | bytearray):
        out.append("[")
        for index, item in enumerate(value):
            if index:
                out.append(",")
            _encode(item, depth + 1, out)
        out.append("]")
    else:
        raise AuditError(f"canonical JSON cannot encode a value of type {type(value).__name__}")


def canonical_json(value: Any) -> bytes:
    """Serialise ``value`` to canonical JSON bytes (see the module docstring for the rules).

    Args:
        value: A JSON value built from dict (string keys), list/tuple, str, int, bool, None.

    Returns:
        The UTF-8 encoded canonical form.

    Raises:
        AuditError: The value holds a float, a too-large integer, a non-string key, a lone
            surrogate, bytes or another unsupported type, or nests too deeply.
    """
    out: list[str] = []
    _encode(value, 0, out)
    return "".join(out).encode("utf-8")


def _refuse_float(text: str) -> Any:
    raise AuditError(f"floating-point number {text[:20]!r} is not allowed (numbers must be integers)")


def _refuse_constant(text: str) -> Any:
    raise AuditError(f"{text} is not valid JSON")


def _parse_int(text: str) -> int:
    if len(text.lstrip("-")) > 16:
        raise AuditError("integer too large (at most 2**53-1 is allowed)")
    value = int(text)
    if not -MAX_SAFE_INTEGER <= value <= MAX_SAFE_INTEGER:
        raise AuditError("integer too large (at most 2**53-1 is allowed)")
    return value


def _pairs(pairs: list[tuple[str, Any]]) -> dict[str, Any]:
    result: dict[str, Any] = {}
    for key, value in pairs:
        if key in result:
            raise AuditError(f"duplicate JSON object key {key[:40]!r}")
        result[key] = value
    return result


def _depth_ok(value: Any) -> bool:
    stack: list[tuple[Any, int]] = [(value, 0)]
    while stack:
        item, depth = stack.pop()
        if depth > MAX_DEPTH:
            return False
        if isinstance(item, dict):
            stack.extend((v, depth + 1) for v in item.values())
        elif isinstance(item, list):
            stack.extend((v, depth + 1) for v in item)
    return True


def parse_json_strict(data: bytes | str) -> Any:
    """Parse untrusted JSON, refusing anything canonical JSON cannot represent.

    Refuses invalid UTF-8, duplicate keys, floating-point numbers, ``NaN``/``Infinity``,
    integers beyond ±(2**53-1), lone surrogates and nesting deeper than :data:`MAX_DEPTH`.

    Raises:
        AuditError: For any malformed or refused input (never another exception type).
    """
    try:
        text = data.decode("utf-8") if isinstance(data, bytes | bytearray) else data
        value = json.loads(
            text,
            object_pairs_hook=_pairs,
            parse_float=_refuse_float,
            parse_int=_parse_int,
            parse_constant=_refuse_constant,
        )
    except AuditError:
        raise
    except UnicodeDecodeError as exc:
        raise AuditError(f"not UTF-8 text (byte {exc.start})") from None
    except json.JSONDecodeError as exc:
        raise AuditError(f"not valid JSON: {exc.msg} at line {exc.lineno} column {exc.colno}") from None
    except RecursionError:
        raise AuditError(f"JSON nests deeper than {MAX_DEPTH} levels") from None
    except (ValueError, TypeError) as exc:
        raise AuditError(f"not valid JSON: {type(exc).__name__}") from None
    if not _depth_ok(value):
        raise AuditError(f"JSON nests deeper than {MAX_DEPTH} levels")
    return value
