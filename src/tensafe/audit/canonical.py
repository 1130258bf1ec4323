"""Canonical JSON for the audit log: RFC 8785 (JCS) without floating-point numbers.

The encoder and parser live in :mod:`tensafe._canonical` (shared with the TSSP package
format); this module fixes the audit log's choices and reports failures as
:class:`~tensafe.audit.errors.AuditError`. The rules (also in docs/audit.md):

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
* Nesting deeper than :data:`MAX_DEPTH` is refused.
* The output is UTF-8.

Under these restrictions the output is byte-for-byte what any RFC 8785 implementation
produces, which ``tests/test_canonical.py`` checks against the independent ``rfc8785`` package.
"""

from __future__ import annotations

from typing import Any

from tensafe._canonical import MAX_SAFE_INTEGER, CanonicalJSONError
from tensafe._canonical import canonical_json as _canonical_json
from tensafe._canonical import parse_json as _parse_json
from tensafe.audit.errors import AuditError

__all__ = ["MAX_DEPTH", "MAX_SAFE_INTEGER", "JSONValue", "canonical_json", "parse_json_strict"]

#: Deepest nesting of arrays and objects accepted when encoding or parsing.
MAX_DEPTH = 32

JSONValue = None | bool | int | str | list["JSONValue"] | dict[str, "JSONValue"]


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
    try:
        return _canonical_json(value, allow_floats=False, max_depth=MAX_DEPTH)
    except CanonicalJSONError as exc:
        raise AuditError(str(exc)) from None


def parse_json_strict(data: bytes | str) -> Any:
    """Parse untrusted JSON, refusing anything canonical JSON cannot represent.

    Refuses invalid UTF-8, duplicate keys, floating-point numbers, ``NaN``/``Infinity``,
    integers beyond ±(2**53-1), lone surrogates and nesting deeper than :data:`MAX_DEPTH`.
    The input need not be in canonical form.

    Raises:
        AuditError: For any malformed or refused input (never another exception type).
    """
    try:
        return _parse_json(data, allow_floats=False, require_canonical=False, max_depth=MAX_DEPTH)
    except CanonicalJSONError as exc:
        raise AuditError(str(exc)) from None
