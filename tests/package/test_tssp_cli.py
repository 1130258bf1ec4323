"""``tensafe tssp`` end to end: keygen, pack, inspect, verify, unpack, and one-line errors."""

from __future__ import annotations

import json
import os
import stat
from pathlib import Path

import pytest

from package.tssp_helpers import certificate, make_adapter
from tensafe.cli.main import main

POLICY = str(Path(__file__).parents[2] / "src/tensafe/policy/examples/default.rego")


def run(capsys: pytest.CaptureFixture[str], *argv: str) -> tuple[int, str, str]:
    code = main(["tssp", *argv])
    out, err = capsys.readouterr()
    return code, out, err


@pytest.fixture()
def setup(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> dict[str, Path]:
    for who in ("alice", "bob"):
        code, out, _ = run(capsys, "keygen", "--out", str(tmp_path / who))
        assert code == 0 and "key id" in out
    adapter = make_adapter(tmp_path / "adapter", certificate=certificate())
    return {
        "root": tmp_path,
        "adapter": adapter,
        "alice": tmp_path / "alice",
        "bob": tmp_path / "bob",
        "state": tmp_path / "state.json",
    }


def test_keygen_writes_private_keys_0600(setup: dict[str, Path], capsys: pytest.CaptureFixture[str]) -> None:
    keys = setup["alice"]
    assert stat.S_IMODE(os.stat(keys / "signing.key").st_mode) == 0o600
    assert stat.S_IMODE(os.stat(keys / "recipient.key").st_mode) == 0o600
    code, _, err = run(capsys, "keygen", "--out", str(keys))
    assert code != 0 and err.startswith("tensafe: error:") and "never overwritten" in err


def test_full_cli_flow(setup: dict[str, Path], capsys: pytest.CaptureFixture[str]) -> None:
    root, alice, bob = setup["root"], setup["alice"], setup["bob"]
    pkg = root / "a.tssp"
    code, out, err = run(
        capsys,
        "pack",
        str(setup["adapter"]),
        "--name",
        "demo",
        "--version",
        "1.2.3",
        "--signing-key",
        str(alice / "signing.key"),
        "--recipient",
        str(bob / "recipient.pub"),
        "--out",
        str(pkg),
        "--expires-in-days",
        "30",
        "--run-id",
        "run-1",
    )
    assert code == 0, err
    code, out, _ = run(capsys, "inspect", str(pkg))
    assert code == 0 and out.startswith("UNVERIFIED") and out.rstrip().endswith("UNVERIFIED")
    assert "demo" in out and "adapter_model.safetensors" in out
    code, out, _ = run(capsys, "inspect", str(pkg), "--json")
    doc = json.loads(out)
    assert doc["verified"] is False and doc["evidence"]["training_run_id"] == "run-1"

    verify_args = ["--trust", str(alice / "signing.pub"), "--state", str(setup["state"])]
    code, out, err = run(capsys, "verify", str(pkg), *verify_args, "--policy", POLICY)
    assert code == 0 and out.startswith("OK demo 1.2.3"), err
    code, _, err = run(
        capsys, "verify", str(pkg), "--trust", str(bob / "signing.pub"), "--state", str(setup["state"])
    )
    assert code == 4 and "trust store" in err and len(err.strip().splitlines()) == 1

    out_dir = root / "out"
    code, out, err = run(
        capsys, "unpack", str(pkg), "--key", str(bob / "recipient.key"), *verify_args, "--out", str(out_dir)
    )
    assert code == 0, err
    assert (out_dir / "adapter_model.safetensors").read_bytes() == (
        setup["adapter"] / "adapter_model.safetensors"
    ).read_bytes()
    code, _, err = run(
        capsys,
        "unpack",
        str(pkg),
        "--key",
        str(alice / "recipient.key"),
        *verify_args,
        "--out",
        str(root / "out2"),
    )
    assert code == 7 and "not a recipient" in err and not (root / "out2").exists()


def test_policy_deny_and_rollback_exit_codes(
    setup: dict[str, Path], capsys: pytest.CaptureFixture[str]
) -> None:
    root, alice, bob = setup["root"], setup["alice"], setup["bob"]
    hot = make_adapter(root / "hot", certificate=certificate(epsilon=12))
    common = ["--signing-key", str(alice / "signing.key"), "--recipient", str(bob / "recipient.pub")]
    assert (
        run(
            capsys,
            "pack",
            str(hot),
            "--name",
            "demo",
            "--version",
            "2.0.0",
            *common,
            "--out",
            str(root / "hot.tssp"),
        )[0]
        == 0
    )
    assert (
        run(
            capsys,
            "pack",
            str(setup["adapter"]),
            "--name",
            "demo",
            "--version",
            "1.0.0",
            *common,
            "--out",
            str(root / "old.tssp"),
        )[0]
        == 0
    )
    trust = ["--trust", str(alice / "signing.pub"), "--state", str(setup["state"])]
    code, _, err = run(capsys, "verify", str(root / "hot.tssp"), *trust, "--policy", POLICY)
    assert code == 6 and "epsilon 12 exceeds the maximum 8" in err
    assert run(capsys, "verify", str(root / "hot.tssp"), *trust)[0] == 0
    code, _, err = run(capsys, "verify", str(root / "old.tssp"), *trust)
    assert code == 5 and "rollback" in err


@pytest.mark.parametrize(
    "argv",
    [
        ["verify", "missing.tssp", "--trust", "missing.pub"],
        ["inspect", "missing.tssp"],
        [
            "pack",
            "missing_dir",
            "--name",
            "x",
            "--version",
            "1.0.0",
            "--signing-key",
            "k",
            "--recipient",
            "r",
            "--out",
            "o.tssp",
        ],
    ],
)
def test_bad_input_is_one_line_error(
    tmp_path: Path, capsys: pytest.CaptureFixture[str], argv: list[str], monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.chdir(tmp_path)
    code, _, err = run(capsys, *argv)
    assert code != 0 and err.startswith("tensafe: error:") and len(err.strip().splitlines()) == 1


def test_garbage_package_and_bad_policy(setup: dict[str, Path], capsys: pytest.CaptureFixture[str]) -> None:
    root, alice = setup["root"], setup["alice"]
    junk = root / "junk.tssp"
    junk.write_bytes(b"TSSP\x01\x00\xff\xff\xff\xff")
    code, _, err = run(capsys, "inspect", str(junk))
    assert code == 3 and len(err.strip().splitlines()) == 1
    bad = root / "bad.rego"
    bad.write_text("package tensafe.tssp\ndeny contains if {")
    code, _, err = run(
        capsys, "verify", str(junk), "--trust", str(alice / "signing.pub"), "--policy", str(bad)
    )
    assert code != 0 and "Rego" in err and len(err.strip().splitlines()) == 1


def test_passphrase_protected_keys(
    tmp_path: Path, capsys: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("TSSP_TEST_PASS", "correct horse")
    code, _, err = run(capsys, "keygen", "--out", str(tmp_path / "k"), "--passphrase-env", "TSSP_TEST_PASS")
    assert code == 0, err
    adapter = make_adapter(tmp_path / "a")
    args = [
        "pack",
        str(adapter),
        "--name",
        "p",
        "--version",
        "1.0.0",
        "--signing-key",
        str(tmp_path / "k/signing.key"),
        "--recipient",
        str(tmp_path / "k/recipient.pub"),
        "--out",
        str(tmp_path / "p.tssp"),
    ]
    code, _, err = run(capsys, *args)
    assert code != 0 and "passphrase" in err
    assert run(capsys, *args, "--passphrase-env", "TSSP_TEST_PASS")[0] == 0
