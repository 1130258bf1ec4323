"""DP certificate v2: statement, honest sampling fields, events, signature, round trip, JSON Schema,
tampering, atomic writes, fuzzing."""

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
    "sampled_by": "engine",
    "dataset_size_source": "counted",
}
CLIENT_KW: dict[str, Any] = {
    **DP_KW,
    "noise_multiplier": 40.0,
    "sample_rate": 1.0,
    "steps": 500,
    "sampling_method": "client_chosen_batches",
    "sampled_by": "client",
    "dataset_size_source": "declared",
    "privacy_unit": "datum",
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
    assert dp_cert.schema == CERTIFICATE_SCHEMA == "tensafe.dp_certificate/v2"
    assert dp_cert.statement == (
        "(ε=7.33, δ=1e-05)-DP for each training example under Poisson sampling at rate q=0.04 performed "
        "by the engine, over 2250 steps (RDP accountant)."
    )
    assert dp_cert.private is True and dp_cert.amplification == "poisson_subsampling"
    assert dp_cert.events == ({"noise_multiplier": 1.5, "sample_rate": 0.04, "steps": 2250},)
    assert dp_cert.noise_rng == "csprng" and dp_cert.signature is None
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
        dataset_size_source="declared",
        expected_batch_size=16,
        sample_rate=None,
        sampling_method="client_chosen_batches",
        sampled_by="client",
    )
    data = cert.to_dict()
    assert data["dp_enabled"] is False and data["epsilon"] is None and data["private"] is False
    assert "No differential privacy guarantee" in cert.statement and "ε is infinite" in cert.statement
    validator.validate(data)
    assert DpCertificate.from_dict(json.loads(cert.to_json())) == cert


def test_client_chosen_batches_get_no_amplification(validator: Any) -> None:
    """Batches the client chose: ε is that of T Gaussian mechanisms (q = 1), never a Poisson ε."""
    from dp_accounting import dp_event, rdp

    cert = DpCertificate.issue(**CLIENT_KW)
    oracle = rdp.RdpAccountant()
    oracle.compose(dp_event.GaussianDpEvent(40.0), 500)
    assert cert.epsilon == pytest.approx(oracle.get_epsilon(1e-5), rel=1e-12)
    assert cert.amplification == "none" and cert.sample_rate == 1.0 and cert.sampled_by == "client"
    assert cert.statement == (
        "(ε=2.45, δ=1e-05)-DP for each training datum without sampling amplification: the client chose "
        "the batches, so each datum counts as present in every one of the 500 steps (RDP accountant)."
    )
    validator.validate(cert.to_dict())


@pytest.mark.parametrize(
    ("change", "message"),
    [
        # The client chose the batches, but the certificate claims the Poisson rate q = B/N.
        ({**CLIENT_KW, "sample_rate": 0.04, "events": None}, "no sampling amplification: sample_rate"),
        # A Poisson claim the engine did not perform.
        ({**DP_KW, "sampled_by": "client"}, "sampled_by is 'client' exactly when"),
        # Engine Poisson sampling at a rate that does not follow from B and N.
        ({**DP_KW, "sample_rate": 0.0001}, r"is not expected_batch_size / dataset_size"),
        ({**DP_KW, "dataset_size_source": "guessed"}, "dataset_size_source must be one of"),
        ({**DP_KW, "noise_rng": "mersenne"}, "noise_rng must be one of"),
    ],
)
def test_issue_refuses_dishonest_sampling_claims(change: dict[str, Any], message: str) -> None:
    with pytest.raises(CertificateError, match=message):
        DpCertificate.issue(**change)


def test_deterministic_noise_is_not_private(validator: Any) -> None:
    cert = DpCertificate.issue(**DP_KW, noise_rng="deterministic")
    assert cert.private is False and cert.epsilon is None and cert.dp_enabled is True
    assert cert.statement.startswith("No differential privacy guarantee: DP-SGD ran with deterministic")
    validator.validate(cert.to_dict())
    with pytest.raises(CertificateError, match="no differential privacy guarantee"):
        cert.recompute_epsilon()
    forged = {**cert.to_dict(), "epsilon": 1.0}
    with pytest.raises(CertificateError, match="epsilon must be null"):
        DpCertificate.from_dict(forged)


def test_events_compose_like_an_independent_oracle() -> None:
    """A ledger of two mechanisms: ε equals dp_accounting's RDP of the same composition."""
    from dp_accounting import dp_event, rdp

    from tensafe.privacy import DpSgdEvent

    events = [
        DpSgdEvent(noise_multiplier=1.2, sample_rate=0.01, steps=300),
        DpSgdEvent(noise_multiplier=0.9, sample_rate=0.02, steps=100),
        DpSgdEvent(noise_multiplier=1.2, sample_rate=0.01, steps=50),
    ]
    cert = DpCertificate.issue(
        **{
            **DP_KW,
            "noise_multiplier": 1.2,
            "sample_rate": 0.01,
            "dataset_size": 10000,
            "expected_batch_size": 100,
            "steps": 450,
        },
        events=events,
    )
    oracle = rdp.RdpAccountant()
    for e in events:
        oracle.compose(
            dp_event.PoissonSampledDpEvent(e.sample_rate, dp_event.GaussianDpEvent(e.noise_multiplier)),
            e.steps,
        )
    assert cert.epsilon == pytest.approx(oracle.get_epsilon(1e-5), rel=1e-9)
    assert cert.recompute_epsilon() == cert.epsilon
    with pytest.raises(CertificateError, match="events cover 450 steps but steps is 449"):
        DpCertificate.issue(
            **{
                **DP_KW,
                "noise_multiplier": 1.2,
                "sample_rate": 0.01,
                "dataset_size": 10000,
                "expected_batch_size": 100,
                "steps": 449,
            },
            events=events,
        )


def test_signature_round_trip_and_tampering(dp_cert: DpCertificate, validator: Any) -> None:
    from tensafe.crypto.signing import HybridSigningKey

    key, other = HybridSigningKey.generate(), HybridSigningKey.generate()
    signed = dp_cert.sign(key)
    validator.validate(signed.to_dict())
    assert signed.signature is not None and signed.signature["key_id"] == key.key_id
    again = DpCertificate.from_dict(json.loads(signed.to_json()))
    assert again.verify_signature(key.verifying_key()) == key.key_id
    assert again.verify_signature([other.verifying_key(), key.verifying_key()]) == key.key_id
    with pytest.raises(CertificateError, match="not among the given public keys"):
        again.verify_signature(other.verifying_key())
    with pytest.raises(CertificateError, match="not signed"):
        dp_cert.verify_signature(key.verifying_key())
    # An edit that keeps the certificate internally consistent still breaks the signature.
    data = signed.to_dict()
    data["notes"] = ["edited"]
    with pytest.raises(CertificateError, match="signature is invalid"):
        DpCertificate.from_dict(data).verify_signature(key.verifying_key())
    # A signature made by another key, relabelled with the trusted key id.
    forged = dp_cert.sign(other).to_dict()
    forged["signature"]["key_id"] = key.key_id
    with pytest.raises(CertificateError, match="signature is invalid"):
        DpCertificate.from_dict(forged).verify_signature(key.verifying_key())


def test_v1_certificates_are_refused_with_a_reason() -> None:
    with pytest.raises(CertificateError, match="v1 certificate"):
        DpCertificate.from_dict({"schema": "tensafe.dp_certificate/v1"})


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
        ({"schema": "tensafe.dp_certificate/v3"}, "unsupported schema"),
        ({"extra": 1}, r"unknown keys \['extra'\]"),
        ({"epsilon": -1.0}, "epsilon must be a finite number >= 0"),
        ({"epsilon": None}, "epsilon must be a finite number"),
        ({"private": False}, "private does not match"),
        ({"amplification": "none"}, "amplification does not match"),
        ({"events": []}, "the events cover 0 steps"),
        ({"signature": {"alg": "rsa", "key_id": "00" * 16, "value": ""}}, "unsupported signature algorithm"),
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
                "sampled_by",
                "dataset_size_source",
                "events",
                "noise_rng",
                "signature",
                "private",
                "amplification",
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
            dataset_size_source="counted",
            expected_batch_size=None,
            sample_rate=None,
            sampling_method="poisson",
            sampled_by="engine",
        ).to_dict()
        if base
        else {
            "schema": CERTIFICATE_SCHEMA,
            "private": True,
            "dp_enabled": True,
            "epsilon": 0.5,
            "delta": 1e-5,
            "accountant": "rdp",
            "noise_multiplier": 1.0,
            "clip_norm": 1.0,
            "sample_rate": 0.01,
            "amplification": "poisson_subsampling",
            "steps": 1,
            "events": [{"noise_multiplier": 1.0, "sample_rate": 0.01, "steps": 1}],
            "dataset_size": 1000,
            "dataset_size_source": "counted",
            "expected_batch_size": 10,
            "sampling_method": "poisson",
            "sampled_by": "engine",
            "noise_rng": "csprng",
            "privacy_unit": "example",
            "ledger_id": None,
            "created": "2026-01-01T00:00:00Z",
            "library_versions": {"tensafe": "0"},
            "notes": [],
            "statement": "",
            "signature": None,
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
