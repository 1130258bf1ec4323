"""``tensafe audit``: verify, export, verify-bundle, log, checkpoint."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest
from audit_helpers import AuditDB
from sqlalchemy import text

from tensafe.cli.main import main
from tensafe.crypto.signing import HybridSigningKey, HybridVerifyingKey


def run(argv: list[str], capsys: pytest.CaptureFixture[str]) -> tuple[int, str, str]:
    code = main(argv)
    out, err = capsys.readouterr()
    return code, out, err


@pytest.fixture
def pub(tmp_path: Path, verifying_key: HybridVerifyingKey) -> str:
    path = tmp_path / "audit.pub"
    path.write_bytes(verifying_key.public_bytes())
    return str(path)


def _fill(db: AuditDB, n: int = 10) -> None:
    for i in range(n):
        db.log.append(
            tenant="acme", actor=f"user:{i}", action="data.upload", resource=f"ds/{i}", details={"i": i}
        )


def test_verify_export_and_verify_bundle(
    audit_db: AuditDB, pub: str, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    _fill(audit_db)
    url = audit_db.url
    code, out, err = run(["audit", "verify", "--database-url", url, "--public-key", pub], capsys)
    assert code == 0, err
    assert "ok: tenant 'acme': 10 records intact" in out

    code, out, err = run(["audit", "verify", "--database-url", url], capsys)
    assert code == 3 and "pass --public-key" in err and err.count("\n") == 1

    bundle = tmp_path / "bundle.json"
    code, out, err = run(
        ["audit", "export", "--database-url", url, "--tenant", "acme", "--out", str(bundle)], capsys
    )
    assert code == 0, err
    assert "wrote 10 records" in out
    code, _, err = run(
        ["audit", "export", "--database-url", url, "--tenant", "acme", "--out", str(bundle)], capsys
    )
    assert code == 1 and "--force" in err
    code, out, err = run(["audit", "verify-bundle", str(bundle), "--public-key", pub], capsys)
    assert code == 0, err
    code, _, err = run(["audit", "verify-bundle", str(bundle)], capsys)
    assert code == 3 and "pass --public-key" in err

    edited = json.loads(bundle.read_text())
    edited["records"][4]["resource"] = "ds/other"
    bundle.write_text(json.dumps(edited))
    code, _, err = run(["audit", "verify-bundle", str(bundle), "--public-key", pub], capsys)
    assert code == 3
    assert err.startswith("tensafe: error: audit verification failed for tenant 'acme' at seq 4:")
    assert err.count("\n") == 1

    bundle.write_bytes(b"\xffgarbage")
    code, _, err = run(["audit", "verify-bundle", str(bundle), "--public-key", pub], capsys)
    assert code == 1 and f"{bundle}: not UTF-8" in err

    with audit_db.engine.begin() as conn:
        conn.execute(text("UPDATE audit_records SET actor = 'mallory' WHERE seq = 7"))
    code, _, err = run(["audit", "verify", "--database-url", url, "--public-key", pub], capsys)
    assert code == 3 and "at seq 7" in err and "record modified" in err


def test_unsigned_tail_and_checkpoint_command(
    audit_db: AuditDB,
    pub: str,
    signing_key: HybridSigningKey,
    tmp_path: Path,
    capsys: pytest.CaptureFixture[str],
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    _fill(audit_db, 7)
    url = audit_db.url
    code, _, err = run(["audit", "verify", "--database-url", url, "--public-key", pub], capsys)
    assert code == 3 and "not covered by a signed checkpoint" in err and "at seq 5" in err
    code, out, _ = run(
        ["audit", "verify", "--database-url", url, "--public-key", pub, "--allow-unsigned-tail"], capsys
    )
    assert code == 0 and "2 after it not yet signed" in out

    key_file = tmp_path / "signing.key"
    key_file.write_bytes(signing_key.private_bytes(passphrase=b"correct horse"))
    args = ["audit", "checkpoint", "--database-url", url, "--tenant", "acme", "--signing-key", str(key_file)]
    code, _, err = run([*args, "--passphrase-env", "TS_TEST_PASS"], capsys)
    assert code != 0 and "TS_TEST_PASS" in err
    monkeypatch.setenv("TS_TEST_PASS", "correct horse")
    code, out, err = run([*args, "--passphrase-env", "TS_TEST_PASS"], capsys)
    assert code == 0, err
    assert "length 7" in out
    code, out, _ = run(
        ["audit", "verify", "--database-url", url, "--tenant", "acme", "--public-key", pub], capsys
    )
    assert code == 0 and "newest covers 7" in out
    code, _, err = run(
        ["audit", "verify", "--database-url", url, "--tenant", "nope", "--public-key", pub], capsys
    )
    assert code == 1 and "has no audit log" in err


def test_log_command(audit_db: AuditDB, capsys: pytest.CaptureFixture[str]) -> None:
    _fill(audit_db, 6)
    code, out, _ = run(
        ["audit", "log", "--database-url", audit_db.url, "--tenant", "acme", "--limit", "3"], capsys
    )
    assert code == 0
    lines = out.splitlines()
    assert [int(line.split()[0]) for line in lines] == [3, 4, 5]
    assert "data.upload" in lines[0] and "ds/3" in lines[0]
    code, out, _ = run(["audit", "log", "--database-url", audit_db.url, "--tenant", "acme", "--json"], capsys)
    records = [json.loads(line) for line in out.splitlines()]
    assert [r["seq"] for r in records] == list(range(6))
    assert records[0]["format"] == "tensafe.audit/v1"
    code, _, err = run(
        ["audit", "log", "--database-url", audit_db.url, "--tenant", "acme", "--limit", "0"], capsys
    )
    assert code == 1 and "--limit" in err


def test_database_errors_are_one_line(tmp_path: Path, pub: str, capsys: pytest.CaptureFixture[str]) -> None:
    missing = f"sqlite:///{tmp_path / 'nope.db'}"
    code, _, err = run(["audit", "verify", "--database-url", missing, "--public-key", pub], capsys)
    assert code == 1 and "no database file" in err
    assert not (tmp_path / "nope.db").exists()
    empty = tmp_path / "empty.db"
    empty.touch()
    code, _, err = run(["audit", "log", "--database-url", f"sqlite:///{empty}", "--tenant", "x"], capsys)
    assert code == 1 and "tensafe db upgrade" in err
    code, _, err = run(
        ["audit", "verify", "--database-url", missing, "--public-key", str(tmp_path / "x.pub")], capsys
    )
    assert code == 1 and "cannot read public key" in err
    bad_pub = tmp_path / "bad.pub"
    bad_pub.write_text("not a key")
    code, _, err = run(["audit", "verify-bundle", str(bad_pub), "--public-key", str(bad_pub)], capsys)
    assert code != 0 and err.startswith("tensafe: error:") and err.count("\n") == 1


def test_entry_point_subprocess(audit_db: AuditDB, pub: str) -> None:
    _fill(audit_db, 5)
    result = subprocess.run(
        [
            sys.executable,
            "-m",
            "tensafe.cli.main",
            "audit",
            "verify",
            "--database-url",
            audit_db.url,
            "--public-key",
            pub,
        ],
        capture_output=True,
        text=True,
    )
    assert result.returncode == 0, result.stderr
    assert "5 records intact" in result.stdout
