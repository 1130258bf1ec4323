"""Every CLI option that names an output creates its parent directories (``mkdir -p``).

The README's quick tour failed in an empty directory (``tensafe data synth ... --out
data/train.jsonl``: "directory data does not exist"). Each command that writes a file or a
directory is run here with an output under directories that do not exist yet, and once with a
regular file in the way, which must stop it with one line naming the option.
"""

from __future__ import annotations

import json
import stat
from pathlib import Path

import pytest
from tssp_helpers import make_adapter

from tensafe.cli.main import main

pytestmark = pytest.mark.usefixtures("isolated")


def _ok(argv: list[str], capsys: pytest.CaptureFixture[str]) -> str:
    code = main(argv)
    out, err = capsys.readouterr()
    assert code == 0, err
    return out


def _refused(argv: list[str], flag: str, capsys: pytest.CaptureFixture[str]) -> None:
    assert main(argv) == 2
    err = capsys.readouterr().err
    assert err.startswith("tensafe: error:") and err.count("\n") == 1, err
    assert f"{flag} " in err and "cannot create the directory" in err, err


def test_data_synth_creates_the_directories_of_out_and_canary_out(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    argv = ["data", "synth", "--kind", "clinical", "--n", "20", "--seed", "1"]
    _ok(
        [*argv, "--out", "data/train.jsonl", "--canaries", "2", "--canary-out", "secret/c/canaries.json"],
        capsys,
    )
    lines = (tmp_path / "data" / "train.jsonl").read_text().splitlines()
    assert len(lines) == 20 and all(json.loads(line) for line in lines)
    assert json.loads((tmp_path / "secret" / "c" / "canaries.json").read_text())
    # The canaries' new directories are private (they hold the secrets a membership test needs).
    assert stat.S_IMODE((tmp_path / "secret" / "c").stat().st_mode) & 0o077 == 0
    (tmp_path / "blocker").write_text("a file, not a directory")
    _refused([*argv, "--out", "blocker/train.jsonl"], "--out", capsys)
    _refused(
        [*argv, "--out", "ok.jsonl", "--canaries", "1", "--canary-out", "blocker/c.json"],
        "--canary-out",
        capsys,
    )
    assert not (tmp_path / "ok.jsonl").exists()


def test_keys_export_public_key_creates_its_directory(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    _ok(["keys", "init"], capsys)
    out = _ok(["keys", "export-public-key", "--out", "deep/er/deployment.pub"], capsys)
    assert "written to deep/er/deployment.pub" in out
    assert (tmp_path / "deep" / "er" / "deployment.pub").stat().st_size > 0


def test_audit_export_and_head_create_their_directories(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    _ok(["admin", "create-tenant", "acme"], capsys)  # audited: a record to export
    url = "sqlite:///./tensafe.db"
    _ok(
        ["audit", "export", "--database-url", url, "--tenant", "acme", "--out", "exports/2026/acme.json"],
        capsys,
    )
    assert json.loads((tmp_path / "exports" / "2026" / "acme.json").read_text())
    _ok(["audit", "head", "--database-url", url, "--tenant", "acme", "--out", "heads/acme/head.json"], capsys)
    assert json.loads((tmp_path / "heads" / "acme" / "head.json").read_text())


def test_tssp_keygen_pack_and_unpack_create_their_directories(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    adapter = make_adapter(tmp_path / "adapter")
    _ok(["tssp", "keygen", "--out", "k/eys/"], capsys)
    keys = tmp_path / "k" / "eys"
    _ok(
        [
            "tssp", "pack", str(adapter), "--name", "demo", "--version", "1.0.0",
            "--signing-key", str(keys / "signing.key"), "--recipient", str(keys / "recipient.pub"),
            "--out", "dist/v1/demo.tssp",
        ],
        capsys,
    )  # fmt: skip
    package = tmp_path / "dist" / "v1" / "demo.tssp"
    assert package.is_file()
    _ok(
        [
            "tssp", "unpack", str(package), "--key", str(keys / "recipient.key"),
            "--trust", str(keys / "signing.pub"), "--state", "state/dir/tssp-state.json",
            "--out", "unpacked/v1/adapter/",
        ],
        capsys,
    )  # fmt: skip
    unpacked = tmp_path / "unpacked" / "v1" / "adapter"
    assert (unpacked / "adapter_config.json").read_bytes() == (adapter / "adapter_config.json").read_bytes()
    assert (tmp_path / "state" / "dir" / "tssp-state.json").is_file()
    (tmp_path / "blocker").write_text("x")
    _refused(
        [
            "tssp", "pack", str(adapter), "--name", "demo", "--version", "1.0.0",
            "--signing-key", str(keys / "signing.key"), "--recipient", str(keys / "recipient.pub"),
            "--out", "blocker/demo.tssp",
        ],
        "--out",
        capsys,
    )  # fmt: skip
