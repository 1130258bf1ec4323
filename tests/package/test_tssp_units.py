"""Unit tests: canonical JSON (RFC 8785 vectors), SemVer precedence, path rules, policy engine."""

from __future__ import annotations

import itertools
import json
import math
import struct
from pathlib import Path
from typing import Any

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from tensafe.package import PackageFormatError, PackageStateError, RollbackState
from tensafe.package._canonical import canonical_json, parse_canonical_json
from tensafe.package._manifest import check_path, parse_manifest
from tensafe.package._semver import SemVer
from tensafe.policy import Policy, PolicyEvaluationError, PolicyLoadError

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
    assert canonical_json(value).decode() == expected


def test_rfc8785_structure_example() -> None:
    # RFC 8785 §3.2.3 sorting example (keys sorted by UTF-16 code units).
    doc = {
        "\u20ac": "Euro Sign",
        "\r": "Carriage Return",
        "\ufb33": "Hebrew Letter Dalet With Dagesh",
        "1": "One",
        "\U0001f600": "Emoji: Grinning Face",
        "\u0080": "Control",
        "\u00f6": "Latin Small Letter O With Diaeresis",
    }
    keys = list(json.loads(canonical_json(doc)))
    assert keys == ["\r", "1", "\u0080", "\u00f6", "\u20ac", "\U0001f600", "\ufb33"]
    assert canonical_json({"a": '\u000f\n"\\'}) == b'{"a":"\\u000f\\n\\"\\\\"}'


def _reference_string(value: str) -> str:
    """Naive per-character RFC 8785 string encoder (independent oracle)."""
    short = {'"': '\\"', "\\": "\\\\", "\b": "\\b", "\t": "\\t", "\n": "\\n", "\f": "\\f", "\r": "\\r"}
    return '"' + "".join(short.get(c) or (f"\\u{ord(c):04x}" if ord(c) < 0x20 else c) for c in value) + '"'


def _as_doubles(value: Any) -> Any:
    if isinstance(value, bool) or value is None or isinstance(value, str):
        return value
    if isinstance(value, int | float):
        return float(value)
    if isinstance(value, list | tuple):
        return [_as_doubles(v) for v in value]
    return {k: _as_doubles(v) for k, v in value.items()}


json_values = st.recursive(
    st.none()
    | st.booleans()
    | st.integers(-(2**53) + 1, 2**53 - 1)
    | st.floats(allow_nan=False, allow_infinity=False)
    | st.text(st.characters(exclude_categories=["Cs"])),
    lambda children: (
        st.lists(children, max_size=4) | st.dictionaries(st.text(max_size=8), children, max_size=4)
    ),
    max_leaves=20,
)


@settings(max_examples=300, deadline=None)
@given(json_values)
def test_canonical_round_trip_and_oracles(value: Any) -> None:
    data = canonical_json(value)
    parsed = parse_canonical_json(data, what="x")
    assert canonical_json(parsed) == data
    # Python's JSON parser (an independent decoder), reading every number as a double as RFC 8785
    # does, reads back the same value.
    assert _as_doubles(json.loads(data, parse_int=float)) == _as_doubles(parsed)
    assert _as_doubles(parsed) == _as_doubles(value)
    if isinstance(value, str):
        assert data.decode() == _reference_string(value)
    if isinstance(value, float) and not value.is_integer():
        assert float(data) == value  # shortest form still round-trips exactly


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
    ],
)
def test_non_canonical_json_is_rejected(data: bytes) -> None:
    with pytest.raises(PackageFormatError):
        parse_canonical_json(data, what="manifest")


def test_deep_nesting_is_a_format_error() -> None:
    with pytest.raises(PackageFormatError):
        parse_canonical_json(b"[" * 100_000 + b"]" * 100_000, what="x")


def test_semver_precedence_matches_spec_example() -> None:
    # semver.org §11 example chain.
    chain = [
        "1.0.0-alpha",
        "1.0.0-alpha.1",
        "1.0.0-alpha.beta",
        "1.0.0-beta",
        "1.0.0-beta.2",
        "1.0.0-beta.11",
        "1.0.0-rc.1",
        "1.0.0",
        "2.0.0",
        "2.1.0",
        "2.1.1",
        "10.0.0",
    ]
    keys = [SemVer.parse(v).precedence_key() for v in chain]
    assert all(a < b for a, b in itertools.pairwise(keys))
    assert SemVer.parse("1.0.0+build.1").precedence_key() == SemVer.parse("1.0.0+other").precedence_key()
    for bad in ["1.0", "01.0.0", "1.0.0-", "1.0.0-01", "v1.0.0", "1.0.0+", " 1.0.0", "1.0.0\n", "１.0.0"]:
        with pytest.raises(ValueError):
            SemVer.parse(bad)


@settings(max_examples=200, deadline=None)
@given(
    st.tuples(st.integers(0, 999), st.integers(0, 999), st.integers(0, 999)),
    st.tuples(st.integers(0, 999), st.integers(0, 999), st.integers(0, 999)),
)
def test_semver_release_order_is_numeric(a: tuple[int, int, int], b: tuple[int, int, int]) -> None:
    ka = SemVer.parse(".".join(map(str, a))).precedence_key()
    kb = SemVer.parse(".".join(map(str, b))).precedence_key()
    assert (ka < kb) == (a < b) and (ka == kb) == (a == b)


@pytest.mark.parametrize(
    "path",
    [
        "",
        "/etc/passwd",
        "../x",
        "a/../b",
        "a/./b",
        "a//b",
        "a/",
        "a\\b",
        "a\x00b",
        "a\nb",
        "x" * 256,
        "evidence.json",
        "dp_certificate.json",
        "tssp_manifest.json",
        ".",
        "..",
    ],
)
def test_unsafe_paths_are_rejected(path: str) -> None:
    with pytest.raises(PackageFormatError):
        check_path(path)


@pytest.mark.parametrize(
    "path", ["adapter_config.json", "sub/dir/file.bin", ".hidden", "a..b", "sub/evidence.json"]
)
def test_safe_paths_are_accepted(path: str) -> None:
    assert check_path(path) == path


def test_policy_errors() -> None:
    with pytest.raises(PolicyLoadError, match="not valid Rego"):
        Policy.from_text("package tensafe.tssp\ndeny contains if {", package="tensafe.tssp")
    with pytest.raises(PolicyLoadError, match="must declare"):
        Policy.from_text("package other\nimport rego.v1\ndeny contains 1 if true\n", package="tensafe.tssp")
    policy = Policy.from_text(
        "package tensafe.tssp\nimport rego.v1\ndeny contains 1 if true\n", package="tensafe.tssp"
    )
    with pytest.raises(PolicyEvaluationError, match="only strings"):
        policy.deny_reasons({})
    policy = Policy.from_text(
        'package tensafe.tssp\nimport rego.v1\ndeny contains sprintf("%v", [1/0]) if true\n',
        package="tensafe.tssp",
    )
    with pytest.raises(PolicyEvaluationError):
        policy.deny_reasons({})
    with pytest.raises(PolicyEvaluationError, match="JSON"):
        Policy.from_text(
            'package tensafe.tssp\nimport rego.v1\ndeny contains "x" if false\n', package="tensafe.tssp"
        ).deny_reasons({"x": math.nan})
    # Error messages are one line and carry no Rust backtrace.
    try:
        Policy.from_text("package tensafe.tssp\ndeny[x] { x := 1 }", package="tensafe.tssp")
    except PolicyLoadError as exc:
        assert "\n" not in str(exc) and "backtrace" not in str(exc).lower()


def test_policy_allows_and_denies() -> None:
    policy = Policy.from_text(
        'package tensafe.tssp\nimport rego.v1\ndeny contains "too big" if input.x > 8\n',
        package="tensafe.tssp",
    )
    assert policy.deny_reasons({"x": 8}) == ()
    assert policy.deny_reasons({"x": 9}) == ("too big",)


def _manifest_with(paths: list[str]) -> dict[str, Any]:
    return {
        "schema": "tensafe.tssp.manifest/v1",
        "name": "a",
        "version": "1.0.0",
        "created": "2026-01-01T00:00:00Z",
        "expires": "2027-01-01T00:00:00Z",
        "base_model": {"id": "x", "sha256": None},
        "files": [{"path": p, "size": 0, "sha256": "0" * 64} for p in sorted(paths)],
        "payload": {"size": 0, "chunk_size": 1024},
        "evidence_sha256": "0" * 64,
        "dp_certificate_sha256": None,
        "signers": [{"key_id": "0" * 32, "public_key": "k"}],
        "threshold": 1,
    }


@pytest.mark.parametrize(
    "paths", [["A", "a/b"], ["e\u0301", "\u00e9"], ["Readme", "README"], ["x", "x"], ["STRASSE", "straße"]]
)
def test_colliding_paths_are_rejected(paths: list[str]) -> None:
    with pytest.raises(PackageFormatError):
        parse_manifest(_manifest_with(paths))


def test_manifest_validation_accepts_distinct_paths_and_rejects_bad_fields() -> None:
    assert parse_manifest(_manifest_with(["a", "b/c"])).name == "a"
    for key, value in [
        ("threshold", 2),
        ("threshold", True),
        ("name", "a\n"),
        ("version", "1.0.0\n"),
        ("expires", "2025-01-01T00:00:00Z"),
        ("created", "2026-01-01T00:00:00+00:00"),
        ("payload", {"size": 1, "chunk_size": 1024}),
        ("extra", 1),
    ]:
        doc = _manifest_with(["a"])
        doc[key] = value
        with pytest.raises(PackageFormatError):
            parse_manifest(doc)


def test_corrupt_state_is_never_reset(tmp_path: Path) -> None:
    state_file = tmp_path / "state.json"
    state_file.write_text("{not json")
    with pytest.raises(PackageStateError, match="corrupt"):
        RollbackState(state_file).check("a", "1.0.0", "00" * 32)
    assert state_file.read_text() == "{not json"


def test_default_policy_against_privacy_certificate_shapes() -> None:
    policy = Policy.from_file(
        Path(__file__).parents[2] / "src/tensafe/policy/examples/default.rego", package="tensafe.tssp"
    )
    base = {
        "manifest": {"base_model": {"id": "HuggingFaceTB/SmolLM2-135M-Instruct"}},
        "signers": {"trusted": []},
    }
    good = {"schema": "tensafe.dp_certificate/v1", "dp_enabled": True, "epsilon": 7.9, "delta": 1e-5}
    assert policy.deny_reasons({**base, "dp_certificate": good}) == ()
    no_dp = {"schema": "tensafe.dp_certificate/v1", "dp_enabled": False, "epsilon": None, "delta": None}
    assert set(policy.deny_reasons({**base, "dp_certificate": no_dp})) == {
        "the training run did not use differential privacy",
        "DP certificate has no numeric epsilon",
        "DP certificate has no numeric delta",
    }
    assert policy.deny_reasons({**base, "dp_certificate": {**good, "delta": 1e-3}}) == (
        "delta 0.001 exceeds the maximum 0.00001",
    )
