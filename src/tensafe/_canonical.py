"""Canonical JSON (RFC 8785, JCS): the one encoder and strict parser every layer uses.

The audit log (``tensafe.audit``) and the TSSP package format (``tensafe.package``) both hash
and sign canonical JSON. They differ in one switch, which callers must pass by keyword:

* ``allow_floats=False`` (the audit log): floating-point numbers are refused when encoding
  and when parsing (write them as decimal strings, e.g. ``"epsilon": "1.83"``), so every
  number is an integer within ``±(2**53 - 1)``.
* ``allow_floats=True`` (TSSP): finite doubles are written as ECMAScript's
  ``Number.prototype.toString`` writes them (RFC 8785 §3.2.2.3).

The rules common to both:

* Values are objects with string keys, arrays, strings, numbers, ``true``, ``false`` and
  ``null``. Integers outside ``±(2**53 - 1)`` are refused when encoding: RFC 8785 writes
  numbers as IEEE-754 doubles and those integers would not round-trip.
* Object members are sorted by their keys compared as UTF-16 code units (RFC 8785 §3.2.3);
  duplicate keys cannot occur in input from Python and are refused when parsing.
* No whitespace between tokens. Strings are written as RFC 8785 §3.2.2.2 says: ``"`` and
  ``\\`` are escaped, U+0008/0009/000A/000C/000D as ``\\b \\t \\n \\f \\r``, other controls
  below U+0020 as ``\\u00xx`` (lower-case hex), everything else literally. Lone surrogates
  are refused.
* Nesting deeper than ``max_depth`` arrays/objects is refused.
* The output is UTF-8.

This module imports nothing from TenSafe but :mod:`tensafe.errors`, so any layer may use it.
Its output is checked against the independent ``rfc8785`` package in ``tests/test_canonical.py``.
"""

from __future__ import annotations

import json
import math
from collections.abc import Mapping, Sequence
from typing import Any

from tensafe.errors import TenSafeError

__all__ = [
    "DEFAULT_MAX_DEPTH",
    "MAX_SAFE_INTEGER",
    "CanonicalJSONError",
    "canonical_json",
    "parse_json",
]

#: Largest integer that an IEEE-754 double represents exactly (RFC 8785 / I-JSON).
MAX_SAFE_INTEGER = 2**53 - 1

#: Deepest nesting of arrays and objects accepted unless the caller asks for less.
DEFAULT_MAX_DEPTH = 64

#: Longest run of digits the parser converts to a number (guards ``int()``'s quadratic cost).
_MAX_NUMBER_TEXT = 400


class CanonicalJSONError(TenSafeError, ValueError):
    """A value cannot be encoded as canonical JSON, or bytes are not acceptable JSON."""


# --------------------------------------------------------------------------- encoding


def _encode_string(value: str, out: list[str]) -> None:
    """Append the RFC 8785 form of ``value``.

    Python's encoder with ``ensure_ascii=False`` escapes exactly what RFC 8785 requires: ``"``,
    ``\\``, the short forms ``\\b \\t \\n \\f \\r`` and other control characters as lower-case
    ``\\u00xx``; everything else is literal. Lone surrogates cannot be encoded as UTF-8 and are
    refused first.
    """
    try:
        value.encode("utf-8")
    except UnicodeEncodeError:
        raise CanonicalJSONError("canonical JSON refuses strings holding lone surrogates") from None
    out.append(json.dumps(value, ensure_ascii=False))


def _encode_float(value: float) -> str:
    """Format a finite double as ECMAScript ``Number.prototype.toString`` does (RFC 8785 §3.2.2.3)."""
    if not math.isfinite(value):
        raise CanonicalJSONError("canonical JSON refuses NaN and infinities")
    if value == 0:
        return "0"
    sign = "-" if value < 0 else ""
    # repr() gives the shortest round-trip digits, as ECMAScript does.
    mantissa, _, exp_text = repr(abs(value)).partition("e")
    int_part, _, frac_part = mantissa.partition(".")
    digits = (int_part + frac_part).lstrip("0")
    exponent = int(exp_text) if exp_text else 0
    # Position of the decimal point relative to the start of `digits` (value = 0.digits * 10**n).
    n = (
        len(int_part.lstrip("0")) + exponent
        if int_part.strip("0")
        else exponent - (len(frac_part) - len(frac_part.lstrip("0")))
    )
    digits = digits.rstrip("0") or "0"
    k = len(digits)
    if k <= n <= 21:
        text = digits + "0" * (n - k)
    elif 0 < n <= 21:
        text = digits[:n] + "." + digits[n:]
    elif -6 < n <= 0:
        text = "0." + "0" * (-n) + digits
    else:
        e = n - 1
        exp = f"e{'+' if e >= 0 else '-'}{abs(e)}"
        text = digits[0] + ("." + digits[1:] if k > 1 else "") + exp
    return sign + text


def _utf16_key(key: str) -> bytes:
    return key.encode("utf-16-be", "surrogatepass")


def _encode(value: Any, out: list[str], depth: int, allow_floats: bool, max_depth: int) -> None:
    if depth > max_depth:
        raise CanonicalJSONError(f"canonical JSON refuses nesting deeper than {max_depth}")
    if value is None:
        out.append("null")
    elif value is True:
        out.append("true")
    elif value is False:
        out.append("false")
    elif isinstance(value, int):
        if not -MAX_SAFE_INTEGER <= value <= MAX_SAFE_INTEGER:
            raise CanonicalJSONError(
                "canonical JSON refuses integers beyond ±(2**53-1): write them as strings"
            )
        out.append(str(int(value)))
    elif isinstance(value, float):
        if not allow_floats:
            raise CanonicalJSONError(
                "canonical JSON refuses floating-point numbers: write them as decimal strings"
            )
        if value.is_integer() and abs(value) <= MAX_SAFE_INTEGER:
            out.append(str(int(value)))
        else:
            out.append(_encode_float(value))
    elif isinstance(value, str):
        _encode_string(value, out)
    elif isinstance(value, Mapping):
        for key in value:
            if not isinstance(key, str):
                raise CanonicalJSONError("canonical JSON object keys must be strings")
        out.append("{")
        for index, key in enumerate(sorted(value, key=_utf16_key)):
            if index:
                out.append(",")
            _encode_string(key, out)
            out.append(":")
            _encode(value[key], out, depth + 1, allow_floats, max_depth)
        out.append("}")
    elif isinstance(value, Sequence) and not isinstance(value, bytes | bytearray):
        out.append("[")
        for index, item in enumerate(value):
            if index:
                out.append(",")
            _encode(item, out, depth + 1, allow_floats, max_depth)
        out.append("]")
    else:
        raise CanonicalJSONError(f"canonical JSON cannot encode a value of type {type(value).__name__}")


def canonical_json(value: Any, *, allow_floats: bool, max_depth: int = DEFAULT_MAX_DEPTH) -> bytes:
    """Serialise ``value`` to canonical JSON (RFC 8785) bytes.

    Args:
        value: A JSON value built from mappings with string keys, sequences (not bytes), str,
            int, bool, None and, with ``allow_floats``, finite floats.
        allow_floats: Whether floating-point numbers are encoded (``True``) or refused.
        max_depth: Deepest nesting of arrays and objects accepted.

    Returns:
        The UTF-8 encoded canonical form.

    Raises:
        CanonicalJSONError: The value holds a refused float, NaN or an infinity, an integer
            beyond ±(2**53-1), a non-string key, a lone surrogate, bytes or another unsupported
            type, or nests too deeply.
    """
    out: list[str] = []
    try:
        _encode(value, out, 0, allow_floats, max_depth)
    except RecursionError:
        raise CanonicalJSONError(f"canonical JSON refuses nesting deeper than {max_depth}") from None
    return "".join(out).encode("utf-8")


# --------------------------------------------------------------------------- parsing


def _refuse_float(text: str) -> Any:
    raise CanonicalJSONError(f"floating-point number {text[:20]!r} is not allowed (numbers must be integers)")


def _refuse_constant(text: str) -> Any:
    raise CanonicalJSONError(f"{text} is not valid JSON")


def _parse_safe_int(text: str) -> int:
    if len(text.lstrip("-")) > 16:
        raise CanonicalJSONError("integer too large (at most 2**53-1 is allowed)")
    value = int(text)
    if not -MAX_SAFE_INTEGER <= value <= MAX_SAFE_INTEGER:
        raise CanonicalJSONError("integer too large (at most 2**53-1 is allowed)")
    return value


def _parse_number_int(text: str) -> int | float:
    """Integers beyond ±(2**53 - 1) are IEEE doubles in RFC 8785; keep them as floats."""
    if len(text) > _MAX_NUMBER_TEXT:
        raise CanonicalJSONError("number too long")
    value = int(text)
    return value if abs(value) <= MAX_SAFE_INTEGER else float(value)


def _parse_number_float(text: str) -> float:
    if len(text) > _MAX_NUMBER_TEXT:
        raise CanonicalJSONError("number too long")
    return float(text)


def _pairs(pairs: list[tuple[str, Any]]) -> dict[str, Any]:
    result: dict[str, Any] = {}
    for key, value in pairs:
        if key in result:
            raise CanonicalJSONError(f"duplicate JSON object key {key[:40]!r}")
        result[key] = value
    return result


def _depth_ok(value: Any, max_depth: int) -> bool:
    stack: list[tuple[Any, int]] = [(value, 0)]
    while stack:
        item, depth = stack.pop()
        if depth > max_depth:
            return False
        if isinstance(item, dict):
            stack.extend((v, depth + 1) for v in item.values())
        elif isinstance(item, list):
            stack.extend((v, depth + 1) for v in item)
    return True


def parse_json(
    data: bytes | bytearray | str,
    *,
    allow_floats: bool,
    require_canonical: bool,
    max_depth: int = DEFAULT_MAX_DEPTH,
) -> Any:
    """Parse untrusted JSON, refusing anything canonical JSON cannot represent.

    Always refuses invalid UTF-8, duplicate keys, ``NaN``/``Infinity``, lone surrogates and
    nesting deeper than ``max_depth``. Without ``allow_floats`` it also refuses fractions,
    exponents and integers beyond ±(2**53-1); with it, such integers are read as doubles (as
    RFC 8785 reads every number).

    Args:
        data: The JSON text (UTF-8 bytes or str).
        allow_floats: Whether floating-point numbers are accepted.
        require_canonical: Also refuse ``data`` unless it is byte-for-byte the canonical
            encoding of the value it holds.
        max_depth: Deepest nesting of arrays and objects accepted.

    Returns:
        The parsed value (dicts, lists, str, int, float, bool, None).

    Raises:
        CanonicalJSONError: For any malformed, refused or (with ``require_canonical``)
            non-canonical input; never another exception type.
    """
    try:
        text = bytes(data).decode("utf-8") if isinstance(data, bytes | bytearray) else data
        value = json.loads(
            text,
            object_pairs_hook=_pairs,
            parse_float=_parse_number_float if allow_floats else _refuse_float,
            parse_int=_parse_number_int if allow_floats else _parse_safe_int,
            parse_constant=_refuse_constant,
        )
    except CanonicalJSONError:
        raise
    except UnicodeDecodeError as exc:
        raise CanonicalJSONError(f"not UTF-8 text (byte {exc.start})") from None
    except json.JSONDecodeError as exc:
        raise CanonicalJSONError(
            f"not valid JSON: {exc.msg} at line {exc.lineno} column {exc.colno}"
        ) from None
    except RecursionError:
        raise CanonicalJSONError(f"JSON nests deeper than {max_depth} levels") from None
    except (ValueError, TypeError) as exc:
        raise CanonicalJSONError(f"not valid JSON: {type(exc).__name__}") from None
    if not _depth_ok(value, max_depth):
        raise CanonicalJSONError(f"JSON nests deeper than {max_depth} levels")
    if require_canonical:
        try:
            again = canonical_json(value, allow_floats=allow_floats, max_depth=max_depth)
        except CanonicalJSONError:
            raise CanonicalJSONError("holds values canonical JSON cannot represent") from None
        raw = data.encode("utf-8", "surrogatepass") if isinstance(data, str) else bytes(data)
        if again != raw:
            raise CanonicalJSONError("not canonical JSON (RFC 8785)")
    return value
