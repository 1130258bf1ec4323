"""The shared canonical-JSON module (RFC 8785) in both modes: RFC vectors, an oracle, properties.

``tensafe._canonical`` is the one encoder and parser behind the audit log (``allow_floats=False``)
and the TSSP package format (``allow_floats=True``). The independent ``rfc8785`` package
(Trail of Bits) is the oracle; the RFC's own examples are pinned byte for byte.
"""

from __future__ import annotations

import json
import math
import random
import struct
from pathlib import Path
from typing import Any

import pytest
import rfc8785
from hypothesis import given, settings
from hypothesis import strategies as st

from tensafe._canonical import (
    DEFAULT_MAX_DEPTH,
    MAX_SAFE_INTEGER,
    CanonicalJSONError,
    canonical_json,
    parse_json,
)

AUDIT_VECTORS = Path(__file__).parent / "audit" / "vectors"

# --------------------------------------------------------------------------- RFC 8785 examples


@pytest.mark.parametrize("allow_floats", [False, True])
@pytest.mark.parametrize(
    "vector", json.loads((AUDIT_VECTORS / "rfc8785.json").read_text()), ids=lambda v: v["name"]
)
def test_rfc8785_vectors_without_numbers(vector: dict[str, str], allow_floats: bool) -> None:
    value = json.loads(vector["input_json"])
    expected = bytes.fromhex(vector["expected_hex"])
    assert canonical_json(value, allow_floats=allow_floats) == expected
    assert rfc8785.dumps(value) == expected


def test_rfc8785_section_3_2_4_example_in_full() -> None:
    # RFC 8785 §3.2.4: the whole example, numbers included (only with allow_floats).
    text = (
        '{\n  "numbers": [333333333.33333329, 1E30, 4.50,\n'
        "              2e-3, 0.000000000000000000000000001],\n"
        '  "string": "\\u20ac$\\u000F\\u000aA\'\\u0042\\u0022\\u005c\\\\\\"\\/",\n'
        '  "literals": [null, true, false]\n}'
    )
    expected = (
        '{"literals":[null,true,false],"numbers":[333333333.3333333,1e+30,4.5,0.002,1e-27],'
        '"string":"\u20ac$\\u000f\\nA\'B\\"\\\\\\\\\\"/"}'
    ).encode()
    value = json.loads(text)
    assert canonical_json(value, allow_floats=True) == expected
    assert rfc8785.dumps(value) == expected
    with pytest.raises(CanonicalJSONError, match="floating-point"):
        canonical_json(value, allow_floats=False)
    assert parse_json(expected, allow_floats=True, require_canonical=True) == value


# RFC 8785 Appendix B: IEEE 754 bit patterns and their canonical serialisation.
RFC8785_NUMBERS = {
    "0000000000000000": "0",
    "8000000000000000": "0",
    "0000000000000001": "5e-324",
    "8000000000000001": "-5e-324",
    "7fefffffffffffff": "1.7976931348623157e+308",
    "ffefffffffffffff": "-1.7976931348623157e+308",
    "4340000000000000": "9007199254740992",
    "c340000000000000": "-9007199254740992",
    "4430000000000000": "295147905179352830000",
    "44b52d02c7e14af5": "9.999999999999997e+22",
    "44b52d02c7e14af6": "1e+23",
    "44b52d02c7e14af7": "1.0000000000000001e+23",
    "444b1ae4d6e2ef4e": "999999999999999700000",
    "444b1ae4d6e2ef4f": "999999999999999900000",
    "444b1ae4d6e2ef50": "1e+21",
    "3eb0c6f7a0b5ed8c": "9.999999999999997e-7",
    "3eb0c6f7a0b5ed8d": "0.000001",
    "41b3de4355555553": "333333333.3333332",
    "41b3de4355555554": "333333333.33333325",
    "41b3de4355555555": "333333333.3333333",
    "41b3de4355555556": "333333333.3333334",
    "41b3de4355555557": "333333333.33333343",
    "becbf647612f3696": "-0.0000033333333333333333",
    "43143ff3c1cb0959": "1424953923781206.2",
}


@pytest.mark.parametrize(("bits", "expected"), sorted(RFC8785_NUMBERS.items()))
def test_rfc8785_number_vectors(bits: str, expected: str) -> None:
    value = struct.unpack(">d", bytes.fromhex(bits))[0]
    assert canonical_json(value, allow_floats=True).decode() == expected
    assert rfc8785.dumps(value).decode() == expected


@pytest.mark.parametrize("bits", ["7ff0000000000000", "fff0000000000000", "7ff8000000000000"])
def test_rfc8785_appendix_b_non_finite_numbers_are_refused(bits: str) -> None:
    value = struct.unpack(">d", bytes.fromhex(bits))[0]
    with pytest.raises(CanonicalJSONError, match="NaN and infinities"):
        canonical_json(value, allow_floats=True)


@pytest.mark.parametrize("allow_floats", [False, True])
def test_rfc8785_sorting_order_as_printed_in_the_rfc(allow_floats: bool) -> None:
    # RFC 8785 §3.2.3 lists the sorted keys: "\r", "1", "\u0080", "ö", "€", "😀", "\ufb33"
    # (the emoji sorts before U+FB33 because keys compare as UTF-16 code units).
    value = {k: 0 for k in ["\u20ac", "\r", "\ufb33", "1", "\U0001f600", "\u0080", "\u00f6"]}
    keys = list(json.loads(canonical_json(value, allow_floats=allow_floats)))
    assert keys == ["\r", "1", "\u0080", "\u00f6", "\u20ac", "\U0001f600", "\ufb33"]
    assert canonical_json({"a": '\u000f\n"\\'}, allow_floats=allow_floats) == b'{"a":"\\u000f\\n\\"\\\\"}'


# --------------------------------------------------------------------------- oracle and properties

_text = st.text(alphabet=st.characters(exclude_categories=("Cs",)), max_size=20)
_ints = st.integers(min_value=-MAX_SAFE_INTEGER, max_value=MAX_SAFE_INTEGER)
_floats = st.floats(allow_nan=False, allow_infinity=False)
integer_values = st.recursive(
    st.none() | st.booleans() | _ints | _text,
    lambda children: st.lists(children, max_size=5) | st.dictionaries(_text, children, max_size=5),
    max_leaves=25,
)
float_values = st.recursive(
    st.none() | st.booleans() | _ints | _floats | _text,
    lambda children: st.lists(children, max_size=5) | st.dictionaries(_text, children, max_size=5),
    max_leaves=25,
)


@settings(max_examples=300, deadline=None)
@given(integer_values)
def test_integer_mode_matches_the_independent_rfc8785_implementation(value: Any) -> None:
    assert canonical_json(value, allow_floats=False) == rfc8785.dumps(value)
    # The two modes agree wherever no float is involved.
    assert canonical_json(value, allow_floats=True) == rfc8785.dumps(value)


@settings(max_examples=400, deadline=None)
@given(float_values)
def test_float_mode_matches_the_independent_rfc8785_implementation(value: Any) -> None:
    assert canonical_json(value, allow_floats=True) == rfc8785.dumps(value)


@settings(max_examples=300, deadline=None)
@given(_floats)
def test_floats_round_trip_exactly(value: float) -> None:
    data = canonical_json(value, allow_floats=True)
    assert data == rfc8785.dumps(value)
    assert float(data) == value  # shortest form still round-trips exactly
    assert math.isfinite(float(data))


def _reference_string(value: str) -> str:
    """Naive per-character RFC 8785 string encoder (independent oracle)."""
    short = {'"': '\\"', "\\": "\\\\", "\b": "\\b", "\t": "\\t", "\n": "\\n", "\f": "\\f", "\r": "\\r"}
    return '"' + "".join(short.get(c) or (f"\\u{ord(c):04x}" if ord(c) < 0x20 else c) for c in value) + '"'


@settings(max_examples=300, deadline=None)
@given(st.text(st.characters(exclude_categories=["Cs"])))
def test_strings_match_a_naive_reference_encoder(value: str) -> None:
    assert canonical_json(value, allow_floats=False).decode() == _reference_string(value)


def _as_doubles(value: Any) -> Any:
    if isinstance(value, bool) or value is None or isinstance(value, str):
        return value
    if isinstance(value, int | float):
        return float(value)
    if isinstance(value, list | tuple):
        return [_as_doubles(v) for v in value]
    return {k: _as_doubles(v) for k, v in value.items()}


@settings(max_examples=300, deadline=None)
@given(float_values)
def test_float_mode_round_trip(value: Any) -> None:
    data = canonical_json(value, allow_floats=True)
    parsed = parse_json(data, allow_floats=True, require_canonical=True)
    assert canonical_json(parsed, allow_floats=True) == data
    # Python's JSON parser (an independent decoder), reading every number as a double as RFC 8785
    # does, reads back the same value.
    assert _as_doubles(json.loads(data, parse_int=float)) == _as_doubles(parsed)
    assert _as_doubles(parsed) == _as_doubles(value)


@settings(max_examples=300, deadline=None)
@given(integer_values)
def test_integer_mode_round_trip(value: Any) -> None:
    encoded = canonical_json(value, allow_floats=False)
    for canonical in (False, True):
        decoded = parse_json(encoded, allow_floats=False, require_canonical=canonical)
        assert decoded == value
    # No whitespace outside strings: Python's compact form has the same length.
    assert len(encoded) == len(json.dumps(value, ensure_ascii=False, separators=(",", ":")).encode("utf-8"))


@settings(max_examples=200, deadline=None)
@given(st.dictionaries(_text, float_values, min_size=1, max_size=8), st.randoms(use_true_random=False))
def test_key_order_independence(value: dict[str, Any], rnd: random.Random) -> None:
    items = list(value.items())
    rnd.shuffle(items)
    assert canonical_json(dict(items), allow_floats=True) == canonical_json(value, allow_floats=True)


# --------------------------------------------------------------------------- refusals


@pytest.mark.parametrize("allow_floats", [False, True])
@pytest.mark.parametrize(
    "bad",
    [
        float("nan"),
        float("inf"),
        2**53,
        -(2**53),
        b"raw",
        {1: "int key"},
        "\ud800",
        {"\udc00": 1},
        {"s": {1, 2}},
    ],
)
def test_refuses_what_it_cannot_represent_in_either_mode(bad: Any, allow_floats: bool) -> None:
    with pytest.raises(CanonicalJSONError):
        canonical_json(bad, allow_floats=allow_floats)


@pytest.mark.parametrize("value", [1.5, 1.0, -0.0, {"x": 0.1}, [1e300]])
def test_integer_mode_refuses_every_float(value: Any) -> None:
    with pytest.raises(CanonicalJSONError, match="floating-point"):
        canonical_json(value, allow_floats=False)
    # The float mode writes them (integral doubles without a fraction).
    assert canonical_json(value, allow_floats=True) == rfc8785.dumps(value)


def test_the_error_is_a_value_error_and_a_tensafe_error() -> None:
    from tensafe.errors import TenSafeError

    with pytest.raises(ValueError):
        canonical_json(1.5, allow_floats=False)
    assert issubclass(CanonicalJSONError, TenSafeError)


@pytest.mark.parametrize("max_depth", [3, 32, DEFAULT_MAX_DEPTH])
def test_refuses_deep_nesting(max_depth: int) -> None:
    ok: Any = 0
    for _ in range(max_depth):
        ok = [ok]
    assert (
        canonical_json(ok, allow_floats=False, max_depth=max_depth)
        == b"[" * max_depth + b"0" + b"]" * max_depth
    )
    with pytest.raises(CanonicalJSONError, match="deeper"):
        canonical_json([ok], allow_floats=False, max_depth=max_depth)
    text = json.dumps([ok]).encode()
    assert parse_json(text[1:-1], allow_floats=False, require_canonical=False, max_depth=max_depth) == ok
    with pytest.raises(CanonicalJSONError, match="deeper"):
        parse_json(text, allow_floats=False, require_canonical=False, max_depth=max_depth)


@pytest.mark.parametrize(
    "text",
    [
        b'{"a":1,"a":2}',
        b'{"a":1.0}',
        b'{"a":1e5}',
        b"NaN",
        b"[Infinity]",
        b"9007199254740992",
        b"1" * 5000,
        b"\xff\xfe",
        b"[" * 100000,
        b'{"a":',
        b"",
    ],
)
def test_integer_mode_parser_refuses(text: bytes) -> None:
    with pytest.raises(CanonicalJSONError):
        parse_json(text, allow_floats=False, require_canonical=False)


@pytest.mark.parametrize(
    "data",
    [
        b'{"b":1,"a":2}',
        b'{"a": 1}',
        b'{"a":1,"a":1}',
        b"1.0",
        b"1E3",
        b'"\\u0041"',
        b"NaN",
        b"[1,]",
        b"\xff",
        b"01",
        b'{"a":1}\n',
        b"9007199254740993",
        b"-0",
        b"1e400",
        b"1" * 5000,
        b"[" * 100_000 + b"]" * 100_000,
    ],
)
def test_canonical_parser_refuses_non_canonical_bytes(data: bytes) -> None:
    with pytest.raises(CanonicalJSONError):
        parse_json(data, allow_floats=True, require_canonical=True)


def test_non_canonical_but_valid_json_is_accepted_without_require_canonical() -> None:
    assert parse_json(b'{"b":1, "a":[2.5]}', allow_floats=True, require_canonical=False) == {
        "b": 1,
        "a": [2.5],
    }
    assert parse_json('{"b":1,"a":2}', allow_floats=False, require_canonical=False) == {"b": 1, "a": 2}
