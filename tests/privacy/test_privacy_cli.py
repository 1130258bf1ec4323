"""``tensafe privacy`` through ``tensafe.cli.main.main`` (in-process, captured output)."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import pytest

from tensafe.cli.main import main
from tensafe.privacy import DpCertificate, compute_epsilon


def _run(capsys: pytest.CaptureFixture[str], *argv: str) -> tuple[int, str, str]:
    code = main(["privacy", *argv])
    out, err = capsys.readouterr()
    return code, out, err


def _last_json(out: str) -> dict[str, Any]:
    return json.loads(out.strip().splitlines()[-1])  # type: ignore[no-any-return]


def test_epsilon_rdp_json(capsys: pytest.CaptureFixture[str]) -> None:
    code, out, err = _run(
        capsys,
        "epsilon",
        "--accountant",
        "rdp",
        "--noise-multiplier",
        "1.5",
        "--sample-rate",
        "0.04",
        "--steps",
        "2250",
        "--delta",
        "1e-5",
        "--json",
    )
    assert code == 0 and err == ""
    assert out.splitlines()[0].startswith("ε = 7.3293 at δ = 1e-05 after 2250 steps")
    data = _last_json(out)
    assert data["epsilon"] == pytest.approx(7.32911117143, rel=1e-3)
    assert data["accountant"] == "rdp" and data["optimal_order"] == 3.9
    assert (data["noise_multiplier"], data["sample_rate"], data["steps"], data["delta"]) == (
        1.5,
        0.04,
        2250,
        1e-5,
    )


def test_epsilon_human_only_without_json(capsys: pytest.CaptureFixture[str]) -> None:
    code, out, _ = _run(
        capsys,
        "epsilon",
        "--noise-multiplier",
        "1",
        "--sample-rate",
        "0.01",
        "--steps",
        "1000",
        "--delta",
        "1e-5",
    )
    assert code == 0
    assert out == "ε = 2.1014 at δ = 1e-05 after 1000 steps (σ = 1, q = 0.01, RDP accountant)\n"


def test_epsilon_prv_reports_bounds(capsys: pytest.CaptureFixture[str]) -> None:
    code, out, _ = _run(
        capsys,
        "epsilon",
        "--accountant",
        "prv",
        "--noise-multiplier",
        "1",
        "--sample-rate",
        "0.01",
        "--steps",
        "1000",
        "--delta",
        "1e-5",
        "--json",
    )
    assert code == 0
    data = _last_json(out)
    assert data["epsilon"] == data["epsilon_upper"] == pytest.approx(1.8382, rel=1e-3)
    assert data["epsilon_estimate"] == pytest.approx(1.8282, rel=1e-3)
    assert data["epsilon_lower"] == pytest.approx(1.8182, rel=1e-3)


def test_epsilon_from_dataset_size_and_epochs(capsys: pytest.CaptureFixture[str]) -> None:
    code, out, _ = _run(
        capsys,
        "epsilon",
        "--noise-multiplier",
        "1.3",
        "--dataset-size",
        "60000",
        "--batch-size",
        "150",
        "--epochs",
        "15",
        "--delta",
        "1e-5",
        "--json",
    )
    assert code == 0
    data = _last_json(out)
    assert data["steps"] == 6000 and data["sample_rate"] == 150 / 60000
    assert data["epsilon"] == pytest.approx(0.7242234026109595, rel=1e-3)


def test_noise_round_trip(capsys: pytest.CaptureFixture[str]) -> None:
    code, out, _ = _run(
        capsys,
        "noise",
        "--target-epsilon",
        "2",
        "--delta",
        "1e-5",
        "--sample-rate",
        "0.01",
        "--steps",
        "1000",
        "--accountant",
        "rdp",
        "--json",
    )
    assert code == 0
    data = _last_json(out)
    sigma = data["noise_multiplier"]
    eps = compute_epsilon(accountant="rdp", noise_multiplier=sigma, sample_rate=0.01, steps=1000, delta=1e-5)
    assert data["epsilon"] == eps and 2 * (1 - 1e-3) <= eps <= 2
    assert out.splitlines()[0].startswith(f"σ = {sigma:.4f} gives ε = ")


@pytest.mark.parametrize(
    ("argv", "message"),
    [
        (
            [
                "epsilon",
                "--noise-multiplier",
                "abc",
                "--sample-rate",
                "0.1",
                "--steps",
                "5",
                "--delta",
                "1e-5",
            ],
            "--noise-multiplier must be a number, got 'abc'",
        ),
        (
            ["epsilon", "--noise-multiplier", "0", "--sample-rate", "0.1", "--steps", "5", "--delta", "1e-5"],
            "noise_multiplier must be > 0",
        ),
        (
            ["epsilon", "--noise-multiplier", "1", "--sample-rate", "1.5", "--steps", "5", "--delta", "1e-5"],
            r"sample_rate must be in (0, 1]",
        ),
        (
            [
                "epsilon",
                "--noise-multiplier",
                "1",
                "--sample-rate",
                "0.1",
                "--steps",
                "-5",
                "--delta",
                "1e-5",
            ],
            "steps must be >= 0",
        ),
        (
            [
                "epsilon",
                "--noise-multiplier",
                "1",
                "--sample-rate",
                "0.1",
                "--steps",
                "2.5",
                "--delta",
                "1e-5",
            ],
            "--steps must be an integer",
        ),
        (
            ["epsilon", "--noise-multiplier", "1", "--sample-rate", "0.1", "--steps", "5", "--delta", "1"],
            "delta must be in (0, 1)",
        ),
        (
            [
                "epsilon",
                "--noise-multiplier",
                "nan",
                "--sample-rate",
                "0.1",
                "--steps",
                "5",
                "--delta",
                "1e-5",
            ],
            "--noise-multiplier must be finite",
        ),
        (
            [
                "epsilon",
                "--accountant",
                "gdp",
                "--noise-multiplier",
                "1",
                "--sample-rate",
                "0.1",
                "--steps",
                "5",
                "--delta",
                "1e-5",
            ],
            "unknown accountant 'gdp'",
        ),
        (["epsilon", "--noise-multiplier", "1", "--delta", "1e-5"], "give --sample-rate and --steps"),
        (
            [
                "epsilon",
                "--noise-multiplier",
                "1",
                "--sample-rate",
                "0.1",
                "--steps",
                "5",
                "--dataset-size",
                "9",
                "--delta",
                "1e-5",
            ],
            "not both",
        ),
        (
            [
                "epsilon",
                "--noise-multiplier",
                "1",
                "--dataset-size",
                "1000",
                "--batch-size",
                "10",
                "--epochs",
                "1",
                "--delta",
                "1e-2",
            ],
            "not below 1/N",
        ),
        (
            [
                "epsilon",
                "--noise-multiplier",
                "1",
                "--dataset-size",
                "10",
                "--batch-size",
                "100",
                "--epochs",
                "1",
                "--delta",
                "1e-5",
            ],
            "need 1 <= --batch-size <= --dataset-size",
        ),
        (
            ["noise", "--target-epsilon", "-1", "--delta", "1e-5", "--sample-rate", "0.1", "--steps", "5"],
            "target_epsilon must be > 0",
        ),
        (
            [
                "noise",
                "--target-epsilon",
                "0.001",
                "--delta",
                "1e-5",
                "--sample-rate",
                "0.5",
                "--steps",
                "10000",
            ],
            "is unreachable",
        ),
    ],
)
def test_bad_input_is_one_line_exit_2(
    capsys: pytest.CaptureFixture[str], argv: list[str], message: str
) -> None:
    code, out, err = _run(capsys, *argv)
    assert code == 2
    assert out == ""
    lines = err.strip().splitlines()
    assert len(lines) == 1, err
    assert lines[0].startswith("tensafe: error: ") and message in lines[0]


def test_missing_required_flag_exits_2(capsys: pytest.CaptureFixture[str]) -> None:
    with pytest.raises(SystemExit) as info:
        main(["privacy", "epsilon", "--sample-rate", "0.1", "--steps", "5", "--delta", "1e-5"])
    assert info.value.code == 2
    assert "--noise-multiplier" in capsys.readouterr().err


def test_certificate_show_and_verify(capsys: pytest.CaptureFixture[str], tmp_path: Path) -> None:
    from tensafe.crypto.signing import HybridSigningKey

    key, other = HybridSigningKey.generate(), HybridSigningKey.generate()
    pub, other_pub = tmp_path / "deployment.pub", tmp_path / "other.pub"
    pub.write_bytes(key.verifying_key().public_bytes())
    other_pub.write_bytes(other.verifying_key().public_bytes())
    cert = DpCertificate.issue(
        accountant="rdp",
        noise_multiplier=1.0,
        clip_norm=1.0,
        sample_rate=0.01,
        steps=1000,
        delta=1e-5,
        dataset_size=10000,
        dataset_size_source="counted",
        expected_batch_size=100,
        sampling_method="poisson",
        sampled_by="engine",
    ).sign(key)
    path = cert.write(tmp_path / "dp_certificate.json")
    code, out, _ = _run(capsys, "certificate", str(path), "--verify", "--public-key", str(pub), "--json")
    assert code == 0
    assert out.splitlines()[0].startswith("(ε=2.1, δ=1e-05)-DP for each training example")
    assert f"signed by {key.key_id}: valid" in out.splitlines()[0] and "matches" in out.splitlines()[0]
    assert _last_json(out) == cert.to_dict()

    code, out, err = _run(capsys, "certificate", str(path))  # shown, but says it was not checked
    assert code == 0 and "signature not checked" in out

    # Fail closed: no key, the wrong key, an unsigned certificate.
    code, out, err = _run(capsys, "certificate", str(path), "--verify")
    assert code == 2 and out == "" and "--public-key" in err
    code, out, err = _run(capsys, "certificate", str(path), "--verify", "--public-key", str(other_pub))
    assert code == 2 and "not among the given public keys" in err
    unsigned = tmp_path / "unsigned.json"
    DpCertificate.from_dict({**cert.to_dict(), "signature": None}).write(unsigned)
    code, out, err = _run(capsys, "certificate", str(unsigned), "--verify", "--public-key", str(pub))
    assert code == 2 and "not signed" in err

    # A consistent forgery (ε and statement edited together) breaks the signature.
    forged = cert.to_dict()
    forged["epsilon"] = 0.5
    forged["statement"] = forged["statement"].replace("ε=2.1", "ε=0.5")
    path.write_text(json.dumps(forged), encoding="utf-8")
    code, out, err = _run(capsys, "certificate", str(path), "--verify", "--public-key", str(pub))
    assert code == 2 and out == ""
    assert "signature is invalid" in err and len(err.strip().splitlines()) == 1


def test_certificate_garbage_file(capsys: pytest.CaptureFixture[str], tmp_path: Path) -> None:
    path = tmp_path / "x.json"
    path.write_text("{not json", encoding="utf-8")
    code, _, err = _run(capsys, "certificate", str(path))
    assert code == 2 and "is not valid JSON" in err


def test_privacy_without_subcommand_prints_help(capsys: pytest.CaptureFixture[str]) -> None:
    code, out, _ = _run(capsys)
    assert code == 2 and "epsilon" in out and "noise" in out
