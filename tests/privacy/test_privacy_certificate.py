"""DP certificate: statement, round trip, JSON Schema, tampering, atomic writes, fuzzing."""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Any

import jsonschema
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from tensafe.privacy import (
    CERTIFICATE_SCHEMA,
    CertificateError,
    DpCertificate,
    PrivacyError,
    compute_epsilon,
)
from tensafe.privacy.certificate import schema_path

DP_KW: dict[str, Any] = {
    "accountant": "rdp",
    "noise_multiplier": 1.5,
    "clip_norm": 1.0,
    "sample_rate": 0.04,
    "steps": 2250,
    "delta": 1e-5,
    "dataset_size": 60000,
    "expected_batch_size": 2400,
    "sampling_method": "poisson",
    "sampling_performed_by_engine": True,
}


@pytest.fixture(scope="module")
def validator() -> jsonschema.protocols.Validator:
    schema = json.loads(schema_path().read_text(encoding="utf-8"))
    cls = jsonschema.validators.validator_for(schema)
    cls.check_schema(schema)
    return cls(schema)


@pytest.fixture(scope="module")
def dp_cert() -> DpCertificate:
    return DpCertificate.issue(**DP_KW, notes=["LoRA r=8 on q,v projections"])


def test_dp_statement_and_fields(dp_cert: DpCertificate) -> None:
    assert dp_cert.schema == CERTIFICATE_SCHEMA == "tensafe.dp_certificate/v1"
    assert dp_cert.statement == (
        "(ε=7.33, δ=1e-05)-DP for each training example under Poisson sampling performed by the engine "
        "(RDP accountant)."
    )
    assert dp_cert.epsilon == compute_epsilon(
        accountant="rdp", noise_multiplier=1.5, sample_rate=0.04, steps=2250, delta=1e-5
    )
    assert dp_cert.privacy_unit == "example"
    assert dp_cert.notes == ("LoRA r=8 on q,v projections",)
    versions = dp_cert.library_versions
    assert versions["tensafe"]
    assert versions["dp-accounting"] == "0.6.0" and versions["prv-accountant"] == "0.2.0"
    assert set(versions) >= {"torch", "opacus", "peft", "transformers"}


def test_non_private_certificate_says_so(validator: jsonschema.protocols.Validator) -> None:
    cert = DpCertificate.non_private(
        steps=100,
        dataset_size=1000,
        expected_batch_size=16,
        sample_rate=None,
        sampling_method="client_chosen_batches",
        sampling_performed_by_engine=False,
    )
    data = cert.to_dict()
    assert data["dp_enabled"] is False and data["epsilon"] is None
    assert "No differential privacy guarantee" in cert.statement and "ε is infinite" in cert.statement
    validator.validate(data)
    assert DpCertificate.from_dict(json.loads(cert.to_json())) == cert


def test_client_chosen_batches_are_stated_conditionally() -> None:
    cert = DpCertificate.issue(
        **{**DP_KW, "sampling_method": "client_chosen_batches", "sampling_performed_by_engine": False}
    )
    assert "only if every batch was drawn by Poisson sampling at rate q=0.04" in cert.statement
    assert "here the batches were chosen by the client and the engine did not perform the sampling" in (
        cert.statement
    )
    assert any("conditional" in note for note in cert.notes)


def test_round_trip_through_file(tmp_path: Path, dp_cert: DpCertificate, validator: Any) -> None:
    path = dp_cert.write(tmp_path / "dp_certificate.json")
    validator.validate(json.loads(path.read_text(encoding="utf-8")))
    again = DpCertificate.read(path)
    assert again == dp_cert
    assert again.recompute_epsilon() == dp_cert.epsilon
    assert [p.name for p in tmp_path.iterdir()] == ["dp_certificate.json"]


def test_failed_write_keeps_the_old_file(tmp_path: Path, dp_cert: DpCertificate, monkeypatch: Any) -> None:
    path = tmp_path / "dp_certificate.json"
    path.write_text("previous", encoding="utf-8")

    def boom(fd: int) -> None:
        raise OSError("disk full")

    monkeypatch.setattr(os, "fsync", boom)
    with pytest.raises(OSError, match="disk full"):
        dp_cert.write(path)
    assert path.read_text(encoding="utf-8") == "previous"
    assert [p.name for p in tmp_path.iterdir()] == ["dp_certificate.json"]


@pytest.mark.parametrize(
    ("change", "message"),
    [
        ({"schema": "tensafe.dp_certificate/v2"}, "unsupported schema"),
        ({"extra": 1}, r"unknown keys \['extra'\]"),
        ({"epsilon": -1.0}, "epsilon must be a finite number >= 0"),
        ({"epsilon": None}, "a DP run needs epsilon"),
        ({"delta": 0.5}, "not below 1/N"),
        ({"accountant": "gdp"}, "unknown accountant"),
        ({"sampling_method": "magic"}, "unknown sampling_method"),
        ({"privacy_unit": "user"}, "privacy_unit must be one of"),
        ({"created": "yesterday"}, "RFC 3339"),
        ({"dp_enabled": "yes"}, "dp_enabled must be true or false"),
        ({"steps": -1}, "steps must be >= 0"),
        ({"clip_norm": 0}, "clip_norm must be"),
        ({"notes": "text"}, "notes must be a list"),
        ({"statement": "(ε=0.1, δ=1e-05)-DP for each training example"}, "statement does not match"),
    ],
)
def test_from_dict_rejects(dp_cert: DpCertificate, change: dict[str, Any], message: str) -> None:
    data = {**dp_cert.to_dict(), **change}
    with pytest.raises(CertificateError, match=message):
        DpCertificate.from_dict(data)


def test_missing_key_is_rejected(dp_cert: DpCertificate) -> None:
    data = dp_cert.to_dict()
    del data["clip_norm"]
    with pytest.raises(CertificateError, match=r"missing keys \['clip_norm'\]"):
        DpCertificate.from_dict(data)


def test_edited_epsilon_is_caught_by_recompute(dp_cert: DpCertificate) -> None:
    data = dp_cert.to_dict()
    data["epsilon"] = 1.0
    data["statement"] = data["statement"].replace("ε=7.33", "ε=1")
    forged = DpCertificate.from_dict(data)  # internally consistent text ...
    with pytest.raises(CertificateError, match="does not match ε="):
        forged.recompute_epsilon()  # ... but not what the recorded parameters give


def test_schema_rejects_what_from_dict_rejects(dp_cert: DpCertificate, validator: Any) -> None:
    for change in ({"schema": "x"}, {"extra": 1}, {"epsilon": -1}, {"sampling_method": "magic"}):
        data = {**dp_cert.to_dict(), **change}
        assert not validator.is_valid(data)
    non_dp_with_eps = {**dp_cert.to_dict(), "dp_enabled": False}
    assert not validator.is_valid(non_dp_with_eps)


@pytest.mark.parametrize("content", [b"", b"{", b"[]", b"\xff\xfe", b'{"epsilon": NaN}', b"[" * 100_000])
def test_read_rejects_garbage(tmp_path: Path, content: bytes) -> None:
    path = tmp_path / "c.json"
    path.write_bytes(content)
    with pytest.raises(CertificateError):
        DpCertificate.read(path)


def test_read_missing_file(tmp_path: Path) -> None:
    with pytest.raises(CertificateError, match="cannot read DP certificate"):
        DpCertificate.read(tmp_path / "absent.json")


def test_read_rejects_oversized_file(tmp_path: Path) -> None:
    path = tmp_path / "big.json"
    path.write_bytes(b" " * ((1 << 20) + 1))
    with pytest.raises(CertificateError, match="larger than"):
        DpCertificate.read(path)


_json = st.recursive(
    st.none() | st.booleans() | st.floats(allow_nan=False) | st.integers() | st.text(max_size=20),
    lambda children: (
        st.lists(children, max_size=4) | st.dictionaries(st.text(max_size=10), children, max_size=4)
    ),
    max_leaves=20,
)


@settings(max_examples=200, deadline=None)
@given(
    base=st.booleans(),
    overrides=st.dictionaries(
        st.sampled_from(
            [
                "schema",
                "dp_enabled",
                "epsilon",
                "delta",
                "accountant",
                "noise_multiplier",
                "clip_norm",
                "sample_rate",
                "steps",
                "dataset_size",
                "expected_batch_size",
                "sampling_method",
                "sampling_performed_by_engine",
                "privacy_unit",
                "created",
                "library_versions",
                "notes",
                "statement",
                "junk",
            ]
        ),
        _json,
        max_size=4,
    ),
)
def test_fuzz_from_dict_only_raises_certificate_error(base: bool, overrides: dict[str, Any]) -> None:
    """Arbitrary edits of a valid certificate either parse or raise CertificateError, nothing else."""
    good = (
        DpCertificate.non_private(
            steps=1,
            dataset_size=10,
            expected_batch_size=None,
            sample_rate=None,
            sampling_method="poisson",
            sampling_performed_by_engine=True,
        ).to_dict()
        if base
        else {
            "schema": CERTIFICATE_SCHEMA,
            "dp_enabled": True,
            "epsilon": 0.5,
            "delta": 1e-5,
            "accountant": "rdp",
            "noise_multiplier": 1.0,
            "clip_norm": 1.0,
            "sample_rate": 0.01,
            "steps": 1,
            "dataset_size": 1000,
            "expected_batch_size": 10,
            "sampling_method": "poisson",
            "sampling_performed_by_engine": True,
            "privacy_unit": "example",
            "created": "2026-01-01T00:00:00Z",
            "library_versions": {"tensafe": "0"},
            "notes": [],
            "statement": "",
        }
    )
    data = {**good, **overrides}
    try:
        cert = DpCertificate.from_dict(data)
    except CertificateError:
        return
    except PrivacyError as exc:  # pragma: no cover - a failure message for the assertion below
        pytest.fail(f"raised {type(exc).__name__} instead of CertificateError: {exc}")
    assert cert.to_dict()["statement"] == data["statement"]


def test_issue_validates_delta_against_dataset() -> None:
    with pytest.raises(CertificateError, match="not below 1/N"):
        DpCertificate.issue(**{**DP_KW, "dataset_size": 1000, "delta": 1e-3})


def test_issue_is_keyword_only() -> None:
    with pytest.raises(TypeError):
        DpCertificate.issue("rdp", 1.0)  # type: ignore[misc]
