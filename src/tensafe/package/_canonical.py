"""Canonical JSON (RFC 8785, JCS) encoding and a strict decoder that accepts only canonical bytes."""

from __future__ import annotations

import json
import math
from typing import Any

from tensafe.package.errors import PackageFormatError

__all__ = ["canonical_json", "parse_canonical_json"]

_MAX_SAFE_INT = (1 << 53) - 1
_MAX_DEPTH = 64


def _encode_string(value: str, out: list[str]) -> None:
    """Append the RFC 8785 form of ``value``.

    Python's encoder with ``ensure_ascii=False`` escapes exactly what RFC 8785 requires: ``"``,
    ``\\``, the short forms ``\\b \\t \\n \\f \\r`` and other control characters as lower-case
    ``\\u00xx``; everything else is literal. Lone surrogates cannot be encoded as UTF-8 and are refused.
    """
    try:
        value.encode("utf-8")
    except UnicodeEncodeError:
        raise ValueError("lone surrogate in string") from None
    out.append(json.dumps(value, ensure_ascii=False))


def _encode_float(value: float) -> str:
    """Format a finite double as ECMAScript ``Number.prototype.toString`` does (RFC 8785 §3.2.2.3)."""
    if not math.isfinite(value):
        raise ValueError("NaN and infinities are not JSON")
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


def _encode(value: Any, out: list[str], depth: int) -> None:
    if depth > _MAX_DEPTH:
        raise ValueError("JSON nested too deeply")
    if value is None:
        out.append("null")
    elif value is True:
        out.append("true")
    elif value is False:
        out.append("false")
    elif isinstance(value, int):
        if abs(value) > _MAX_SAFE_INT:
            raise ValueError("integer outside ±(2**53 - 1)")
        out.append(str(value))
    elif isinstance(value, float):
        if value.is_integer() and abs(value) <= _MAX_SAFE_INT:
            out.append(str(int(value)))
        else:
            out.append(_encode_float(value))
    elif isinstance(value, str):
        _encode_string(value, out)
    elif isinstance(value, (list, tuple)):
        out.append("[")
        for i, item in enumerate(value):
            if i:
                out.append(",")
            _encode(item, out, depth + 1)
        out.append("]")
    elif isinstance(value, dict):
        for key in value:
            if not isinstance(key, str):
                raise ValueError("object keys must be strings")
        out.append("{")
        for i, key in enumerate(sorted(value, key=lambda s: s.encode("utf-16-be", "surrogatepass"))):
            if i:
                out.append(",")
            _encode_string(key, out)
            out.append(":")
            _encode(value[key], out, depth + 1)
        out.append("}")
    else:
        raise ValueError(f"{type(value).__name__} is not JSON-serialisable")


def canonical_json(value: Any) -> bytes:
    """Encode ``value`` as canonical JSON (RFC 8785) in UTF-8.

    Raises:
        ValueError: The value holds something JSON cannot represent exactly (NaN, big integers,
            non-string keys, lone surrogates, other types).
    """
    out: list[str] = []
    _encode(value, out, 0)
    return "".join(out).encode("utf-8")


def _no_duplicates(pairs: list[tuple[str, Any]]) -> dict[str, Any]:
    result: dict[str, Any] = {}
    for key, val in pairs:
        if key in result:
            raise PackageFormatError(f"duplicate JSON member {key[:40]!r}")
        result[key] = val
    return result


def _parse_int(text: str) -> int | float:
    """Integers beyond ±(2**53 - 1) are IEEE doubles in RFC 8785; keep them as floats."""
    if len(text) > 400:
        raise PackageFormatError("number too long")
    value = int(text)
    return value if abs(value) <= _MAX_SAFE_INT else float(value)


def _reject_constant(name: str) -> Any:
    raise PackageFormatError(f"{name} is not valid JSON")


def parse_canonical_json(data: bytes, *, what: str) -> Any:
    """Decode canonical JSON, rejecting anything that is not exactly its canonical encoding.

    Raises:
        PackageFormatError: ``data`` is not UTF-8, not JSON, has duplicate members, or is not canonical.
    """
    try:
        text = data.decode("utf-8")
    except UnicodeDecodeError:
        raise PackageFormatError(f"{what} is not UTF-8") from None
    try:
        value = json.loads(
            text, object_pairs_hook=_no_duplicates, parse_constant=_reject_constant, parse_int=_parse_int
        )
    except PackageFormatError as exc:
        raise PackageFormatError(f"{what}: {exc}") from None
    except (ValueError, RecursionError):
        raise PackageFormatError(f"{what} is not valid JSON") from None
    try:
        again = canonical_json(value)
    except (ValueError, RecursionError):
        raise PackageFormatError(f"{what} holds values canonical JSON cannot represent") from None
    if again != data:
        raise PackageFormatError(f"{what} is not canonical JSON (RFC 8785)")
    return value
