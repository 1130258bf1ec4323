"""Known heads: a signed checkpoint kept off-box detects a rollback to an earlier valid state.

A database writer can restore an older copy of the database (or delete the newest records
together with their checkpoints). Plain verification passes then, as documented: the
older state is a valid log. Verification with the head kept outside the database fails,
saying whether the chain is shorter than the head (rollback) or does not contain it
(rewrite). A head signed by another key, modified, or of another tenant is refused.
"""

from __future__ import annotations

import base64
import dataclasses
import json
import shutil
from pathlib import Path

import pytest
import rfc8785
from audit_helpers import AuditDB, rehash_from, sql
from sqlalchemy.engine import make_url

from tensafe.audit import (
    CHECKPOINT_CONTEXT,
    AuditError,
    AuditLog,
    AuditVerificationError,
    Checkpoint,
    export_bundle,
    head_bytes,
    known_head_problem,
    load_head,
    signed_head,
    verify_bundle,
    verify_chain,
    verify_head,
    write_head,
)
from tensafe.cli.main import main
from tensafe.crypto.signing import HybridSigningKey, HybridVerifyingKey
from tensafe.db import create_engine_from_url, ensure_tenant, make_session_factory

EVERY = 5


def _append(log: AuditLog, n: int, tenant: str = "acme") -> None:
    for i in range(n):
        log.append(tenant=tenant, actor=f"user:{i % 3}", action="privacy.spend", details={"step": i})


def _head(db: AuditDB, signer: HybridSigningKey | None) -> Checkpoint:
    with db.sessions.begin() as session:
        return signed_head(session, tenant="acme", signer=signer).checkpoint


def _forge(head: Checkpoint, key: HybridSigningKey) -> Checkpoint:
    """The true head, signed by ``key`` (not stored anywhere)."""
    unsigned = dataclasses.replace(head, key_id=key.verifying_key().key_id, signature=b"", id=None)
    return dataclasses.replace(
        unsigned, signature=key.sign(unsigned.signed_bytes(), context=CHECKPOINT_CONTEXT)
    )


def _verify(db: AuditDB, key: HybridVerifyingKey, **kw: object) -> object:
    with db.sessions.begin() as session:
        return verify_chain(
            session,
            tenant="acme",
            verifying_key=key,
            checkpoint_every=EVERY,
            allow_unsigned_tail=True,
            **kw,  # type: ignore[arg-type]
        )


def _rollback_to(db: AuditDB, length: int) -> None:
    """A valid earlier state: the newest records and their checkpoints gone, the head row consistent."""
    sql(db.engine, "DELETE FROM audit_records WHERE tenant_id = 'acme' AND seq >= :n", n=length)
    sql(db.engine, "DELETE FROM audit_checkpoints WHERE tenant_id = 'acme' AND length > :n", n=length)
    rehash_from(db.engine, length)  # only rewrites the head row: nothing after `length` is left


# --------------------------------------------------------------------------- the head itself


def test_head_is_a_signed_checkpoint_covering_the_whole_chain(
    audit_db: AuditDB, signing_key: HybridSigningKey, verifying_key: HybridVerifyingKey, tmp_path: Path
) -> None:
    _append(audit_db.log, 7)  # periodic checkpoint at 5; 2 records after it
    with audit_db.sessions.begin() as session:
        unsigned = signed_head(session, tenant="acme", signer=None)
    assert (unsigned.checkpoint.length, unsigned.unsigned, unsigned.created) == (5, 2, False)
    with audit_db.sessions.begin() as session:
        head = signed_head(session, tenant="acme", signer=signing_key)
    assert (head.checkpoint.length, head.unsigned, head.created) == (7, 0, True)
    # Independent check of the signature: the hybrid key over the RFC 8785 body.
    body = {k: v for k, v in json.loads(head_bytes(head.checkpoint)).items() if k != "signature"}
    verifying_key.verify(head.checkpoint.signature, rfc8785.dumps(body), context=CHECKPOINT_CONTEXT)
    # Asking again signs nothing new.
    with audit_db.sessions.begin() as session:
        again = signed_head(session, tenant="acme", signer=signing_key)
    assert not again.created and again.checkpoint.id == head.checkpoint.id
    path = tmp_path / "head.json"
    write_head(head.checkpoint, path)
    loaded = load_head(path.read_bytes())
    assert loaded.body() == head.checkpoint.body() and loaded.signature == head.checkpoint.signature
    verify_head(loaded, verifying_key=verifying_key, tenant="acme")


def test_head_without_any_checkpoint_needs_a_signer(audit_db: AuditDB, signing_key: HybridSigningKey) -> None:
    with audit_db.sessions.begin() as session, pytest.raises(AuditError, match="no signed checkpoint yet"):
        signed_head(session, tenant="globex", signer=None)
    with audit_db.sessions.begin() as session:
        empty = signed_head(session, tenant="globex", signer=signing_key).checkpoint
    assert (empty.length, empty.head_hash) == (0, "00" * 32)


@pytest.mark.parametrize(
    ("edit", "match"),
    [
        (lambda h: h.update(extra=1), "unknown field"),
        (lambda h: h.pop("signature"), "lacks field"),
        (lambda h: h.update(length=-1), "non-negative"),
        (lambda h: h.update(head_hash="XY"), "hex"),
        (lambda h: h.update(signature="***"), "base64"),
        (lambda h: h.update(format="tensafe.audit.checkpoint/v9"), "not a TenSafe audit head"),
    ],
)
def test_malformed_head_files_are_refused(
    audit_db: AuditDB, signing_key: HybridSigningKey, edit: object, match: str
) -> None:
    _append(audit_db.log, 2)
    data = json.loads(head_bytes(_head(audit_db, signing_key)))
    edit(data)  # type: ignore[operator]
    with pytest.raises(AuditError, match=match):
        load_head(json.dumps(data).encode())
    with pytest.raises(AuditError, match="larger than"):
        load_head(b" " * (300 * 1024))


# --------------------------------------------------------------------------- forged heads


def test_a_head_signed_by_another_key_is_refused(
    audit_db: AuditDB, signing_key: HybridSigningKey, verifying_key: HybridVerifyingKey
) -> None:
    _append(audit_db.log, 6)
    forged = _forge(_head(audit_db, signing_key), HybridSigningKey.generate())  # signed by the wrong key
    with pytest.raises(AuditVerificationError, match="not among the given public keys"):
        verify_head(forged, verifying_key=verifying_key)
    with pytest.raises(AuditVerificationError, match=r"known head .* not among the given public keys"):
        _verify(audit_db, verifying_key, known_head=forged)


def test_a_modified_head_is_refused(
    audit_db: AuditDB, signing_key: HybridSigningKey, verifying_key: HybridVerifyingKey
) -> None:
    _append(audit_db.log, 6)
    head = json.loads(head_bytes(_head(audit_db, signing_key)))
    head["length"] = 3  # claim a shorter chain, to let a rollback to 3 pass
    edited = load_head(json.dumps(head).encode())
    with pytest.raises(AuditVerificationError, match="invalid signature"):
        verify_head(edited, verifying_key=verifying_key)
    with pytest.raises(AuditVerificationError, match=r"known head .* invalid signature"):
        _verify(audit_db, verifying_key, known_head=edited)
    sig = bytearray(base64.b64decode(json.loads(head_bytes(_head(audit_db, signing_key)))["signature"]))
    sig[10] ^= 1
    flipped = json.loads(head_bytes(_head(audit_db, signing_key))) | {
        "signature": base64.b64encode(sig).decode()
    }
    with pytest.raises(AuditVerificationError, match="invalid signature"):
        verify_head(load_head(json.dumps(flipped).encode()), verifying_key=verifying_key)


def test_another_tenants_head_is_refused(
    audit_db: AuditDB, signing_key: HybridSigningKey, verifying_key: HybridVerifyingKey
) -> None:
    _append(audit_db.log, 3, tenant="globex")
    with audit_db.sessions.begin() as session:
        other = signed_head(session, tenant="globex", signer=signing_key).checkpoint
    _append(audit_db.log, 3)
    with pytest.raises(AuditVerificationError, match="belongs to tenant 'globex'"):
        verify_head(other, verifying_key=verifying_key, tenant="acme")
    with pytest.raises(AuditVerificationError, match="belongs to tenant 'globex'"):
        _verify(audit_db, verifying_key, known_head=other)


# --------------------------------------------------------------------------- rollback and rewrite


def test_rollback_passes_plain_verification_but_not_with_the_known_head(
    audit_db: AuditDB, signing_key: HybridSigningKey, verifying_key: HybridVerifyingKey
) -> None:
    _append(audit_db.log, 8)
    _head(audit_db, signing_key)  # an on-demand checkpoint at 8 (as when a customer exports)
    _append(audit_db.log, 9)  # checkpoints at 13 (8 + 5)
    head = _head(audit_db, signing_key)  # signed at 17: the customer keeps it
    assert head.length == 17
    assert _verify(audit_db, verifying_key, known_head=head).known_length == 17  # type: ignore[attr-defined]
    _rollback_to(audit_db, 8)
    report = _verify(audit_db, verifying_key)  # documented: an earlier valid state verifies
    assert report.length == 8  # type: ignore[attr-defined]
    with pytest.raises(AuditVerificationError) as info:
        _verify(audit_db, verifying_key, known_head=head)
    assert "rolled back or truncated" in str(info.value) and "records seq 8..16 are missing" in str(
        info.value
    )
    assert info.value.seq == 8
    with audit_db.sessions.begin() as session:
        problem = known_head_problem(session, tenant="acme", length=head.length, head_hash=head.head_hash)
    assert problem is not None and "rolled back" in problem


def test_rollback_then_new_records_is_a_rewrite(
    audit_db: AuditDB, signing_key: HybridSigningKey, verifying_key: HybridVerifyingKey
) -> None:
    """After rolling back, the attacker appends again (even past the old length): the head is not in it."""
    _append(audit_db.log, 10)
    head = _head(audit_db, signing_key)
    _rollback_to(audit_db, 5)
    _append(audit_db.log, 7)  # honest-looking records, properly checkpointed
    _verify(audit_db, verifying_key)
    with pytest.raises(AuditVerificationError, match="does not contain the known head") as info:
        _verify(audit_db, verifying_key, known_head=head)
    assert info.value.seq == 5  # the last checkpoint matching the chain covers 5
    with audit_db.sessions.begin() as session:
        problem = known_head_problem(session, tenant="acme", length=head.length, head_hash=head.head_hash)
    assert problem is not None and "does not contain your known head" in problem


def test_the_whole_database_restored_from_an_older_copy(
    tmp_path: Path, signing_key: HybridSigningKey, verifying_key: HybridVerifyingKey
) -> None:
    """SQLite: copy the database file, keep working, then put the old file back."""
    from tensafe.db import upgrade

    url = f"sqlite:///{tmp_path / 'live.db'}"
    upgrade(url)
    path = Path(make_url(url).database or "")
    engine = create_engine_from_url(url)
    sessions = make_session_factory(engine)
    with sessions.begin() as session:
        ensure_tenant(session, "acme")
    log = AuditLog(sessions, signer=signing_key, checkpoint_every=EVERY)
    _append(log, 6)
    log.checkpoint(tenant="acme")
    engine.dispose()
    shutil.copy(path, tmp_path / "backup.db")  # the operator's older copy
    engine = create_engine_from_url(url)
    sessions = make_session_factory(engine)
    log = AuditLog(sessions, signer=signing_key, checkpoint_every=EVERY)
    _append(log, 8)
    with sessions.begin() as session:
        head = signed_head(session, tenant="acme", signer=signing_key).checkpoint
    engine.dispose()
    shutil.copy(tmp_path / "backup.db", path)  # rollback: restore the older copy
    engine = create_engine_from_url(url)
    try:
        with make_session_factory(engine).begin() as session:
            kw = {"tenant": "acme", "verifying_key": verifying_key, "checkpoint_every": EVERY}
            assert verify_chain(session, **kw).length == 6  # type: ignore[arg-type]
            with pytest.raises(AuditVerificationError, match="holds 6 records but the known head"):
                verify_chain(session, known_head=head, **kw)  # type: ignore[arg-type]
    finally:
        engine.dispose()


def test_bundles_are_checked_against_the_known_head(
    audit_db: AuditDB, signing_key: HybridSigningKey, verifying_key: HybridVerifyingKey, tmp_path: Path
) -> None:
    _append(audit_db.log, 9)
    head = _head(audit_db, signing_key)
    _rollback_to(audit_db, 5)
    out = tmp_path / "bundle.json"
    with audit_db.sessions.begin() as session:
        export_bundle(session, tenant="acme", out=out)
    data = out.read_bytes()
    assert verify_bundle(data, verifying_key=verifying_key, checkpoint_every=EVERY).length == 5
    with pytest.raises(AuditVerificationError, match="rolled back or truncated"):
        verify_bundle(data, verifying_key=verifying_key, checkpoint_every=EVERY, known_head=head)


def test_known_head_problem_is_o1_and_exact(
    audit_db: AuditDB, signing_key: HybridSigningKey, verifying_key: HybridVerifyingKey
) -> None:
    _append(audit_db.log, 6)
    head = _head(audit_db, signing_key)
    with audit_db.sessions.begin() as session:
        assert known_head_problem(session, tenant="acme", length=6, head_hash=head.head_hash) is None
        assert known_head_problem(session, tenant="acme", length=0, head_hash="00" * 32) is None
        assert known_head_problem(session, tenant="acme", length=0, head_hash="ab" * 32) is not None
        assert "does not contain" in str(
            known_head_problem(session, tenant="acme", length=5, head_hash="ab" * 32)
        )
        with pytest.raises(AuditError, match="hex"):
            known_head_problem(session, tenant="acme", length=5, head_hash="nothex")
    # Editing the head record's contents without fixing its hash is caught too.
    sql(audit_db.engine, "UPDATE audit_records SET actor = 'mallory' WHERE tenant_id = 'acme' AND seq = 5")
    with audit_db.sessions.begin() as session:
        assert known_head_problem(session, tenant="acme", length=6, head_hash=head.head_hash) is not None


# --------------------------------------------------------------------------- CLI


def _run(argv: list[str], capsys: pytest.CaptureFixture[str]) -> tuple[int, str, str]:
    code = main(argv)
    out, err = capsys.readouterr()
    return code, out, err


def test_cli_head_verify_head_and_known_head(
    audit_db: AuditDB,
    signing_key: HybridSigningKey,
    verifying_key: HybridVerifyingKey,
    tmp_path: Path,
    capsys: pytest.CaptureFixture[str],
) -> None:
    _append(audit_db.log, 7)
    url = audit_db.url
    pub = tmp_path / "deployment.pub"
    pub.write_bytes(verifying_key.public_bytes())
    key_file = tmp_path / "signing.key"
    key_file.write_bytes(signing_key.private_bytes(passphrase=None))
    head = tmp_path / "head.json"
    base = ["audit", "head", "--database-url", url, "--tenant", "acme", "--out", str(head)]

    code, out, err = _run([*base, "--no-sign"], capsys)
    assert code == 0, err
    assert "length 5" in out and "note: 2 records follow it" in out
    code, _, err = _run([*base, "--signing-key", str(key_file)], capsys)
    assert code == 1 and "--force" in err
    code, out, err = _run([*base, "--signing-key", str(key_file), "--force"], capsys)
    assert code == 0, err
    assert "length 7" in out and "signed now" in out
    code, out, err = _run(["audit", "verify-head", str(head), "--public-key", str(pub)], capsys)
    assert code == 0 and "ok: signed head of tenant 'acme': length 7" in out

    verify = ["audit", "verify", "--database-url", url, "--public-key", str(pub), "--checkpoint-every", "5"]
    code, out, err = _run([*verify, "--known-head", str(head)], capsys)
    assert code == 0, err
    assert "contains the known head of length 7" in out and "tenant 'acme'" in out
    code, _, err = _run([*verify, "--known-head", str(head), "--tenant", "globex"], capsys)
    assert code == 1 and "is the head of tenant 'acme', not 'globex'" in err

    _rollback_to(audit_db, 5)
    code, out, err = _run([*verify, "--allow-unsigned-tail"], capsys)
    assert code == 0, err  # the rolled-back log alone looks fine
    code, _, err = _run([*verify, "--allow-unsigned-tail", "--known-head", str(head)], capsys)
    assert code == 3 and "rolled back or truncated" in err and err.count("\n") == 1

    bundle = tmp_path / "b.json"
    assert (
        _run(["audit", "export", "--database-url", url, "--tenant", "acme", "--out", str(bundle)], capsys)[0]
        == 0
    )
    args = ["audit", "verify-bundle", str(bundle), "--public-key", str(pub), "--checkpoint-every", "5"]
    code, _, err = _run([*args, "--known-head", str(head)], capsys)
    assert code == 3 and "rolled back" in err

    # Forged head: signed by another key.
    forged = tmp_path / "forged.json"
    write_head(_forge(load_head(head.read_bytes()), HybridSigningKey.generate()), forged)
    code, _, err = _run(["audit", "verify-head", str(forged), "--public-key", str(pub)], capsys)
    assert code == 3 and "not among the given public keys" in err
    code, _, err = _run([*verify, "--known-head", str(forged)], capsys)
    assert code == 3 and "not among the given public keys" in err
    # Unreadable and malformed heads: exit 1, one line naming the file.
    code, _, err = _run([*verify, "--known-head", str(tmp_path / "missing.json")], capsys)
    assert code == 1 and "cannot read known head" in err
    (tmp_path / "bad.json").write_text("{}")
    code, _, err = _run([*verify, "--known-head", str(tmp_path / "bad.json")], capsys)
    assert code == 1 and err.startswith(f"tensafe: error: {tmp_path / 'bad.json'}: head file lacks field")


def test_cli_head_of_a_deleted_log_is_a_rollback(
    audit_db: AuditDB,
    signing_key: HybridSigningKey,
    verifying_key: HybridVerifyingKey,
    tmp_path: Path,
    capsys: pytest.CaptureFixture[str],
) -> None:
    _append(audit_db.log, 3)
    head = tmp_path / "head.json"
    write_head(_head(audit_db, signing_key), head)
    for table in ("audit_records", "audit_checkpoints", "audit_chain_heads"):
        sql(audit_db.engine, f"DELETE FROM {table} WHERE tenant_id = 'acme'")
    pub = tmp_path / "p.pub"
    pub.write_bytes(verifying_key.public_bytes())
    code, _, err = _run(
        [
            "audit",
            "verify",
            "--database-url",
            audit_db.url,
            "--public-key",
            str(pub),
            "--known-head",
            str(head),
        ],
        capsys,
    )
    assert code == 3 and "holds 0 records" in err


def test_cli_head_signs_with_the_key_manager_or_fails_closed(
    audit_db: AuditDB, tmp_path: Path, capsys: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch
) -> None:
    _append(audit_db.log, 2)
    head = tmp_path / "head.json"
    args = ["audit", "head", "--database-url", audit_db.url, "--tenant", "acme", "--out", str(head)]
    monkeypatch.setenv("TS_KEK_PROVIDER", "no-such-provider")
    code, _, err = _run(args, capsys)
    assert code == 1 and "key manager cannot be opened" in err and err.count("\n") == 1
    assert not head.exists()
    monkeypatch.delenv("TS_KEK_PROVIDER")
    monkeypatch.setenv("TS_DATA_DIR", str(tmp_path / "data"))
    code, out, err = _run(args, capsys)
    assert code == 0, err
    assert "length 2" in out and "signed now" in out
    code, _, err = _run(
        ["audit", "head", "--database-url", audit_db.url, "--tenant", "nobody", "--out", str(tmp_path / "x")],
        capsys,
    )
    assert code == 1 and "unknown tenant 'nobody'" in err
