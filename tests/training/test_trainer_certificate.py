"""Signed DP certificates of ``tensafe train`` / ``tensafe demo``, and visible deterministic mode.

Each guarantee is checked by the attack it stops:

* a forger who edits a run's certificate (a smaller ε) or signs it with their own key is
  rejected by ``tensafe privacy certificate --verify`` with the deployment's public key;
* a run whose deployment key cannot be opened (production without a KEK provider, a wrong
  master passphrase, a lost KEK) trains nothing and writes nothing, unless ``--unsigned`` is
  given, and then every output says the certificate is unsigned;
* a library caller cannot forget the signer (there is no default), and a signer whose
  public key does not verify its own signatures is refused before training;
* ``TS_DETERMINISTIC=1`` runs say ``private: false`` and show no ε in the certificate,
  ``summary.json``, ``evidence.json``, ``metrics.jsonl`` and the printed report.

The README's first command (``tensafe demo``) is run on a "new machine": an empty working
directory with the embedded defaults, and a fresh ``TS_DATA_DIR``/``DATABASE_URL``.
"""

from __future__ import annotations

import dataclasses
import json
import pathlib
import re
import shlex
from typing import Any

import pytest
from _run_helpers import isolated_deployment, write_run

from tensafe.cli.main import main
from tensafe.crypto.signing import HybridSigningKey, HybridVerifyingKey
from tensafe.privacy import DpCertificate
from tensafe.training.config import load_config
from tensafe.training.errors import TrainingError
from tensafe.training.trainer import train

_ERROR_LINE = re.compile(r"^tensafe: error: .+")


def _one_error_line(err: str) -> str:
    lines = [line for line in err.strip().splitlines() if line.startswith("tensafe: error:")]
    assert len(lines) == 1 and _ERROR_LINE.match(lines[0]), err
    assert "Traceback" not in err
    return lines[0]


def _export_public_key(path: pathlib.Path) -> pathlib.Path:
    assert main(["keys", "export-public-key", "--out", str(path)]) == 0
    return path


def _verify(cert: pathlib.Path, *public_keys: pathlib.Path) -> int:
    argv = ["privacy", "certificate", str(cert), "--verify"]
    for key in public_keys:
        argv += ["--public-key", str(key)]
    return main(argv)


# --------------------------------------------------------------------------- tensafe train


def test_cli_train_certificate_verifies_with_the_deployment_key_only(
    tmp_path: pathlib.Path,
    tiny_model_dir: pathlib.Path,
    monkeypatch: pytest.MonkeyPatch,
    capsys: pytest.CaptureFixture[str],
) -> None:
    isolated_deployment(monkeypatch, tmp_path / "deployment")
    config = write_run(tmp_path, tiny_model_dir, training__steps=2)
    assert main(["train", str(config), "--no-progress", "--json"]) == 0
    out = capsys.readouterr().out
    run = tmp_path / "run"
    summary = json.loads(out.strip().splitlines()[-1])

    deployment_pub = _export_public_key(tmp_path / "deployment.pub")
    key_id = HybridVerifyingKey.from_public_bytes(deployment_pub.read_bytes()).key_id
    assert summary["certificate_signed_by"] == key_id
    assert f"signed by the deployment key {key_id}" in out
    assert "--verify --public-key" in out

    # Both copies verify with the deployment's public key (signature and recomputed ε).
    for copy in (run / "dp_certificate.json", run / "adapter" / "dp_certificate.json"):
        assert _verify(copy, deployment_pub) == 0
        assert "valid" in capsys.readouterr().out

    # A key that is not the deployment's is refused, as is verifying without any key.
    stranger = HybridSigningKey.generate()
    stranger_pub = tmp_path / "stranger.pub"
    stranger_pub.write_bytes(stranger.verifying_key().public_bytes())
    assert _verify(run / "dp_certificate.json", stranger_pub) == 2
    assert "not among the given public keys" in _one_error_line(capsys.readouterr().err)
    assert _verify(run / "dp_certificate.json") == 2
    _one_error_line(capsys.readouterr().err)

    # Forgery 1: a smaller ε (with a consistent statement), keeping the deployment's signature.
    original = DpCertificate.read(run / "dp_certificate.json")
    assert original.epsilon is not None
    forged = dataclasses.replace(original, epsilon=original.epsilon / 4)
    assert forged.signature == original.signature and forged.statement != original.statement
    forged.write(tmp_path / "forged.json")
    assert _verify(tmp_path / "forged.json", deployment_pub) == 2
    assert "invalid" in _one_error_line(capsys.readouterr().err)

    # Forgery 2: the edited certificate re-signed by the forger, presented under their key id.
    resigned = dataclasses.replace(original, epsilon=original.epsilon / 4).sign(stranger)
    resigned.write(tmp_path / "resigned.json")
    assert _verify(tmp_path / "resigned.json", deployment_pub) == 2
    _one_error_line(capsys.readouterr().err)

    # Forgery 3: one byte of the file changed (the δ in the text).
    text = (run / "dp_certificate.json").read_text(encoding="utf-8")
    assert '"delta": 1e-05' in text
    (tmp_path / "edited.json").write_text(
        text.replace('"delta": 1e-05', '"delta": 2e-05', 1), encoding="utf-8"
    )
    assert _verify(tmp_path / "edited.json", deployment_pub) != 0
    _one_error_line(capsys.readouterr().err)


@pytest.mark.parametrize(
    "breakage",
    ["production_without_provider", "vault_without_address", "wrong_master_passphrase", "lost_kek"],
)
def test_cli_train_without_key_material_fails_closed_before_training(
    tmp_path: pathlib.Path,
    tiny_model_dir: pathlib.Path,
    monkeypatch: pytest.MonkeyPatch,
    capsys: pytest.CaptureFixture[str],
    breakage: str,
) -> None:
    root = tmp_path / "deployment"
    isolated_deployment(monkeypatch, root)
    if breakage in ("wrong_master_passphrase", "lost_kek"):
        # A working deployment first: its KEK and signing key exist.
        assert main(["keys", "init"]) == 0
        capsys.readouterr()
    if breakage == "production_without_provider":
        monkeypatch.setenv("TS_ENVIRONMENT", "production")
    elif breakage == "vault_without_address":
        monkeypatch.setenv("TS_KEK_PROVIDER", "vault")
    elif breakage == "wrong_master_passphrase":
        monkeypatch.setenv("TS_KEY_MASTER", "Zq8#vN2@pL5!wR7$kT1%mX4^")
    else:
        (root / "data" / "keys" / "kek.json").unlink()  # the KEK is gone; the sealed key stays
    config = write_run(tmp_path, tiny_model_dir, training__steps=2)
    assert main(["train", str(config), "--no-progress"]) == 2
    line = _one_error_line(capsys.readouterr().err)
    assert "deployment signing key" in line and "--unsigned" in line
    # Nothing was trained or written: no run directory at all.
    assert not (tmp_path / "run").exists()


def test_cli_train_unsigned_is_explicit_loud_and_recorded(
    tmp_path: pathlib.Path,
    tiny_model_dir: pathlib.Path,
    monkeypatch: pytest.MonkeyPatch,
    capsys: pytest.CaptureFixture[str],
) -> None:
    isolated_deployment(monkeypatch, tmp_path / "deployment")
    monkeypatch.setenv("TS_ENVIRONMENT", "production")  # no key manager can be opened
    config = write_run(tmp_path, tiny_model_dir, training__steps=2)
    assert main(["train", str(config), "--no-progress", "--unsigned", "--json"]) == 0
    captured = capsys.readouterr()
    assert "WARNING: --unsigned" in captured.err
    assert "UNSIGNED" in captured.out
    summary = json.loads(captured.out.strip().splitlines()[-1])
    assert summary["certificate_signed_by"] is None
    run = tmp_path / "run"
    assert json.loads((run / "summary.json").read_text())["certificate_signed_by"] is None
    for copy in (run / "dp_certificate.json", run / "adapter" / "dp_certificate.json"):
        assert DpCertificate.read(copy).signature is None
    # An unsigned certificate never verifies, whatever key is offered.
    monkeypatch.delenv("TS_ENVIRONMENT")
    someone = HybridSigningKey.generate()
    pub = tmp_path / "someone.pub"
    pub.write_bytes(someone.verifying_key().public_bytes())
    assert _verify(run / "dp_certificate.json", pub) == 2
    assert "not signed" in _one_error_line(capsys.readouterr().err)


# --------------------------------------------------------------------------- library


def test_train_has_no_default_signer(tmp_path: pathlib.Path, tiny_model_dir: pathlib.Path) -> None:
    cfg = load_config(write_run(tmp_path, tiny_model_dir, training__steps=1))
    with pytest.raises(TypeError, match="signer"):
        train(cfg, show_progress=False)  # type: ignore[call-arg]
    assert not (tmp_path / "run").exists()


def test_train_with_signer_none_is_unsigned_and_says_so(
    tmp_path: pathlib.Path, tiny_model_dir: pathlib.Path, caplog: pytest.LogCaptureFixture
) -> None:
    cfg = load_config(write_run(tmp_path, tiny_model_dir, training__steps=1, training__checkpoint_every=1))
    with caplog.at_level("WARNING", logger="tensafe.training.trainer"):
        result = train(cfg, signer=None, show_progress=False)
    assert any("UNSIGNED" in r.getMessage() for r in caplog.records)
    assert result.signed_by is None and result.certificate.signature is None
    assert DpCertificate.read(result.adapter_dir / "dp_certificate.json").signature is None
    assert json.loads(result.summary_path.read_text())["certificate_signed_by"] is None


class _MismatchedSigner:
    """Signs with one key but presents another's public key (a misconfigured HSM slot, a swap)."""

    def __init__(self) -> None:
        self._signing = HybridSigningKey.generate()
        self._claimed = HybridSigningKey.generate().verifying_key()

    def sign(self, message: bytes, *, context: str) -> bytes:
        return self._signing.sign(message, context=context)

    def verifying_key(self) -> Any:
        return self._claimed


def test_a_signer_that_does_not_verify_is_refused_before_training(
    tmp_path: pathlib.Path, tiny_model_dir: pathlib.Path
) -> None:
    cfg = load_config(write_run(tmp_path, tiny_model_dir, training__steps=1))
    with pytest.raises(TrainingError, match="signer does not work"):
        train(cfg, signer=_MismatchedSigner(), show_progress=False)
    assert not (tmp_path / "run").exists()


# --------------------------------------------------------------------------- deterministic mode


def test_deterministic_run_says_not_private_everywhere_and_prints_no_epsilon(
    tmp_path: pathlib.Path,
    tiny_model_dir: pathlib.Path,
    monkeypatch: pytest.MonkeyPatch,
    capsys: pytest.CaptureFixture[str],
) -> None:
    isolated_deployment(monkeypatch, tmp_path / "deployment")
    monkeypatch.setenv("TS_DETERMINISTIC", "1")
    config = write_run(tmp_path, tiny_model_dir, training__steps=3, training__log_every=1)
    assert main(["train", str(config), "--no-progress", "--json"]) == 0
    out = capsys.readouterr().out
    run = tmp_path / "run"

    cert = DpCertificate.read(run / "dp_certificate.json")
    assert cert.dp_enabled and not cert.private and cert.noise_rng == "deterministic"
    assert cert.epsilon is None
    summary = json.loads((run / "summary.json").read_text())
    assert summary == json.loads(out.strip().splitlines()[-1])
    assert summary["private"] is False and summary["noise_rng"] == "deterministic"
    assert summary["epsilon"] is None
    evidence = json.loads((run / "adapter" / "evidence.json").read_text())
    assert evidence["private"] is False and evidence["noise_rng"] == "deterministic"
    metrics = [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]
    assert len(metrics) == 3
    assert all(m["private"] is False and "epsilon" not in m for m in metrics)

    report = out.strip().splitlines()[:-1]  # the human report, without the JSON line
    assert any(line.startswith("WARNING: this run is NOT differentially private") for line in report)
    # No ε value is printed as if it were a guarantee ("ε is infinite" is the only ε).
    assert not re.search(r"ε\s*[=≤<]", "\n".join(report))

    # The same configuration without TS_DETERMINISTIC does show the guarantee (the oracle
    # that the checks above can fail).
    monkeypatch.delenv("TS_DETERMINISTIC")
    private_config = write_run(tmp_path / "private", tiny_model_dir, training__steps=3, training__log_every=1)
    assert main(["train", str(private_config), "--no-progress"]) == 0
    private_out = capsys.readouterr().out
    assert re.search(r"ε=\d", private_out) and "NOT differentially private" not in private_out
    private_run = tmp_path / "private" / "run"
    assert json.loads((private_run / "summary.json").read_text())["private"] is True
    assert all(
        "epsilon" in json.loads(line) for line in (private_run / "metrics.jsonl").read_text().splitlines()
    )


# --------------------------------------------------------------------------- tensafe demo


def _demo_argv(out: pathlib.Path, model: pathlib.Path) -> list[str]:
    # The real demo's flow on the tiny model, small enough for a unit test.
    return [
        "demo",
        "--out",
        str(out),
        "--model",
        str(model),
        "--records",
        "60",
        "--eval-records",
        "6",
        "--steps",
        "4",
        "--batch-size",
        "20",
        "--lr",
        "0.05",
        "--rank",
        "2",
        "--top-layers",
        "2",
        "--no-progress",
    ]


@pytest.mark.parametrize("setup", ["embedded_defaults", "fresh_env"])
def test_demo_on_a_new_machine_signs_and_prints_a_working_verify_command(
    tmp_path: pathlib.Path,
    tiny_model_dir: pathlib.Path,
    monkeypatch: pytest.MonkeyPatch,
    capsys: pytest.CaptureFixture[str],
    setup: str,
) -> None:
    machine = tmp_path / "machine"
    machine.mkdir()
    monkeypatch.chdir(machine)
    isolated_deployment(monkeypatch, tmp_path / "fresh")
    if setup == "embedded_defaults":  # nothing configured: ./tensafe.db and ./.tensafe
        monkeypatch.delenv("TS_DATA_DIR")
        monkeypatch.delenv("DATABASE_URL")
    out = machine / "runs" / "demo"
    assert main(_demo_argv(out, tiny_model_dir)) == 0
    printed = capsys.readouterr().out
    if setup == "embedded_defaults":
        assert (machine / "tensafe.db").is_file() and (machine / ".tensafe" / "keys" / "kek.json").is_file()
    else:
        assert (tmp_path / "fresh" / "tensafe.db").is_file() and not (machine / "tensafe.db").exists()

    public_key = out / "deployment.pub"
    assert public_key.is_file()
    assert public_key.read_bytes() == _export_public_key(tmp_path / "exported.pub").read_bytes()
    commands = [line.split("Verify: ", 1)[1] for line in printed.splitlines() if "Verify: " in line]
    assert len(commands) == 1
    argv = shlex.split(commands[0])
    assert argv[:3] == ["tensafe", "privacy", "certificate"]
    assert argv[3:] == [str(out / "run" / "dp_certificate.json"), "--verify", "--public-key", str(public_key)]
    capsys.readouterr()
    assert main(argv[1:]) == 0  # the printed command, exactly
    assert "valid" in capsys.readouterr().out


def test_demo_in_deterministic_mode_prints_no_target_epsilon(
    tmp_path: pathlib.Path,
    tiny_model_dir: pathlib.Path,
    monkeypatch: pytest.MonkeyPatch,
    capsys: pytest.CaptureFixture[str],
) -> None:
    isolated_deployment(monkeypatch, tmp_path / "deployment")
    monkeypatch.setenv("TS_DETERMINISTIC", "1")
    out = tmp_path / "demo"
    assert main(_demo_argv(out, tiny_model_dir)) == 0
    printed = capsys.readouterr().out
    assert "NOT differentially private" in printed
    assert not re.search(r"ε\s*[=≤<]", printed)
    assert json.loads((out / "run" / "summary.json").read_text())["private"] is False
