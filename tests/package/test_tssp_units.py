"""Unit tests: canonical-JSON sections, SemVer precedence, path rules, policy engine."""

from __future__ import annotations

import itertools
import math
from pathlib import Path
from typing import Any

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from tensafe._canonical import canonical_json
from tensafe.package import PackageFormatError, PackageStateError, RollbackState
from tensafe.package._format import parse_canonical_json
from tensafe.package._manifest import check_path, parse_manifest
from tensafe.package._semver import SemVer
from tensafe.policy import Policy, PolicyEvaluationError, PolicyLoadError

# The encoder itself (RFC 8785 vectors, the rfc8785 oracle, properties) is tested in
# tests/test_canonical.py; here, the package's section parser and its error type.


@pytest.mark.parametrize("value", [{"a": [1.5, -0.0, 1e21, "x\n"]}, {"n": None, "t": True}, [], "s"])
def test_canonical_sections_parse_in_float_mode(value: Any) -> None:
    data = canonical_json(value, allow_floats=True)
    assert parse_canonical_json(data, what="x") == value


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
    with pytest.raises(PackageFormatError, match=r"^manifest: "):
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
    good = {
        "schema": "tensafe.dp_certificate/v2",
        "private": True,
        "dp_enabled": True,
        "epsilon": 7.9,
        "delta": 1e-5,
    }
    assert policy.deny_reasons({**base, "dp_certificate": good}) == ()
    no_dp = {
        "schema": "tensafe.dp_certificate/v2",
        "private": False,
        "dp_enabled": False,
        "epsilon": None,
        "delta": None,
    }
    assert set(policy.deny_reasons({**base, "dp_certificate": no_dp})) == {
        "the training run did not use differential privacy",
        "the DP certificate does not state a differential privacy guarantee (private is not true)",
        "DP certificate has no numeric epsilon",
        "DP certificate has no numeric delta",
    }
    # Deterministic noise: DP-SGD ran, but there is no guarantee.
    deterministic = {**good, "private": False, "epsilon": None}
    assert set(policy.deny_reasons({**base, "dp_certificate": deterministic})) == {
        "the DP certificate does not state a differential privacy guarantee (private is not true)",
        "DP certificate has no numeric epsilon",
    }
    # A v1 certificate (no "private" member) is refused by the default policy.
    v1 = {"schema": "tensafe.dp_certificate/v1", "dp_enabled": True, "epsilon": 7.9, "delta": 1e-5}
    assert policy.deny_reasons({**base, "dp_certificate": v1}) == (
        "the DP certificate does not state a differential privacy guarantee (private is not true)",
    )
    assert policy.deny_reasons({**base, "dp_certificate": {**good, "delta": 1e-3}}) == (
        "delta 0.001 exceeds the maximum 0.00001",
    )
