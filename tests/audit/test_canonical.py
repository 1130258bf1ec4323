"""The audit log's canonical JSON (no floats): its vectors, its error type, its depth limit.

The shared encoder (``tensafe._canonical``) is checked against the ``rfc8785`` package and the
RFC's examples in both modes in ``tests/test_canonical.py``.
"""

from __future__ import annotations

import hashlib
import json
from pathlib import Path
from typing import Any

import pytest
import rfc8785
from hypothesis import given, settings
from hypothesis import strategies as st

from tensafe.audit import AuditError, AuditRecord, canonical_json, parse_json_strict, record_hash
from tensafe.audit.canonical import MAX_DEPTH, MAX_SAFE_INTEGER

VECTORS = Path(__file__).parent / "vectors"


@pytest.mark.parametrize(
    "vector", json.loads((VECTORS / "rfc8785.json").read_text()), ids=lambda v: v["name"]
)
def test_rfc8785_vectors(vector: dict[str, str]) -> None:
    value = json.loads(vector["input_json"])
    assert canonical_json(value) == bytes.fromhex(vector["expected_hex"])


def test_record_v1_golden_vector() -> None:
    golden = json.loads((VECTORS / "record_v1.json").read_text(encoding="utf-8"))
    body = golden["body"]
    assert canonical_json(body) == golden["canonical_utf8"].encode("utf-8")
    assert record_hash(body) == golden["record_hash"]
    record = AuditRecord(**{k: v for k, v in body.items()}, record_hash=golden["record_hash"])
    assert record.computed_hash() == golden["record_hash"]
    # Independent recomputation: hashlib + the rfc8785 package.
    oracle = hashlib.sha256(b"tensafe/audit/record/v1\x00" + rfc8785.dumps(body)).hexdigest()
    assert oracle == golden["record_hash"]


# Strings without lone surrogates (canonical JSON refuses those).
_text = st.text(alphabet=st.characters(exclude_categories=("Cs",)), max_size=20)
_ints = st.integers(min_value=-MAX_SAFE_INTEGER, max_value=MAX_SAFE_INTEGER)
json_values = st.recursive(
    st.none() | st.booleans() | _ints | _text,
    lambda children: st.lists(children, max_size=5) | st.dictionaries(_text, children, max_size=5),
    max_leaves=25,
)


@settings(max_examples=300, deadline=None)
@given(json_values)
def test_round_trip(value: Any) -> None:
    encoded = canonical_json(value)
    decoded = parse_json_strict(encoded)
    assert decoded == value
    assert canonical_json(decoded) == encoded
    # No whitespace outside strings: re-serialising with Python's compact form agrees on length.
    assert len(encoded) == len(json.dumps(value, ensure_ascii=False, separators=(",", ":")).encode("utf-8"))


@pytest.mark.parametrize(
    "bad",
    [
        1.5,
        float("nan"),
        {"x": 0.1},
        2**53,
        -(2**53),
        b"raw",
        {1: "int key"},
        "\ud800",
        {"s": {1, 2}},
    ],
)
def test_refuses_what_it_cannot_represent(bad: Any) -> None:
    with pytest.raises(AuditError):
        canonical_json(bad)


def test_refuses_deep_nesting() -> None:
    deep: Any = 0
    for _ in range(MAX_DEPTH):
        deep = [deep]
    assert parse_json_strict(canonical_json(deep)) == deep
    with pytest.raises(AuditError, match="deeper"):
        canonical_json([deep])
    with pytest.raises(AuditError, match="deeper"):
        parse_json_strict(b"[" + canonical_json(deep) + b"]")


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
def test_strict_parser_refuses(text: bytes) -> None:
    with pytest.raises(AuditError):
        parse_json_strict(text)
