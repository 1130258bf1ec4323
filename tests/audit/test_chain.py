"""Appending, checkpoints and verification on SQLite and PostgreSQL; every kind of tampering."""

from __future__ import annotations

import base64
import datetime as dt
import hashlib
from collections.abc import Callable
from typing import Any

import pytest
import rfc8785
from audit_helpers import AuditDB, rehash_from, rows, sql
from sqlalchemy import Engine, text

from tensafe.audit import (
    GENESIS_HASH,
    AuditError,
    AuditLog,
    AuditVerificationError,
    append_record,
    audited_tenants,
    create_checkpoint,
    iter_records,
    latest_records,
    list_checkpoints,
    parse_json_strict,
    record_hash,
    verify_chain,
)
from tensafe.audit.records import CHECKPOINT_CONTEXT, Checkpoint
from tensafe.crypto.signing import HybridSigningKey, HybridVerifyingKey

N = 12  # records in the standard chain: checkpoints at 5 and 10 (every 5), then one on demand at 12
EVERY = 5  # the interval of the audit_db fixture's log


def build_chain(db: AuditDB, tenant: str = "acme", n: int = N) -> None:
    for i in range(n):
        db.log.append(
            tenant=tenant,
            actor=f"user:{i % 3}",
            action="model.train",
            resource=f"job/{i}",
            details={"i": i, "sha256": hashlib.sha256(bytes([i])).hexdigest()},
        )
    db.log.checkpoint(tenant=tenant)


def verify(db: AuditDB, key: HybridVerifyingKey, tenant: str = "acme", **kw: Any) -> Any:
    kw.setdefault("checkpoint_every", EVERY)
    with db.sessions.begin() as session:
        return verify_chain(session, tenant=tenant, verifying_key=key, **kw)


def insert_row(
    engine: Engine, seq: int, *, prev: str, digest: str | None = None, tenant: str = "acme"
) -> None:
    body = {
        "format": "tensafe.audit/v1",
        "tenant": tenant,
        "seq": seq,
        "timestamp": "2026-01-01T00:00:00.000000Z",
        "actor": "mallory",
        "action": "keys.export",
        "resource": "kek/1",
        "details": {},
        "prev_hash": prev,
    }
    sql(
        engine,
        "INSERT INTO audit_records (tenant_id, seq, format, timestamp, actor, action, resource, details, "
        "prev_hash, record_hash) VALUES (:t, :s, 'tensafe.audit/v1', '2026-01-01T00:00:00.000000Z', "
        "'mallory', 'keys.export', 'kek/1', '{}', :p, :h)",
        t=tenant,
        s=seq,
        p=prev,
        h=digest or record_hash(body),
    )


# --------------------------------------------------------------------------- normal operation


def test_chain_structure_matches_an_independent_computation(audit_db: AuditDB) -> None:
    build_chain(audit_db)
    stored = rows(audit_db.engine)
    assert [r["seq"] for r in stored] == list(range(N))
    prev = "00" * 32
    for row in stored:
        body = {k: row[k] for k in ("format", "seq", "timestamp", "actor", "action", "resource")}
        body |= {"tenant": "acme", "details": parse_json_strict(row["details"]), "prev_hash": prev}
        oracle = hashlib.sha256(b"tensafe/audit/record/v1\x00" + rfc8785.dumps(body)).hexdigest()
        assert row["record_hash"] == oracle
        assert row["prev_hash"] == prev
        prev = oracle
    with audit_db.sessions.begin() as session:
        assert [c.length for c in list_checkpoints(session, tenant="acme")] == [5, 10, 12]
        records = list(iter_records(session, tenant="acme"))
        assert records[3].details["i"] == 3 and records[-1].record_hash == prev
        assert [r.seq for r in latest_records(session, tenant="acme", limit=3)] == [9, 10, 11]
        assert audited_tenants(session) == ["acme"]


def test_intact_chain_verifies(audit_db: AuditDB, verifying_key: HybridVerifyingKey) -> None:
    build_chain(audit_db)
    report = verify(audit_db, verifying_key)
    assert (report.length, report.checkpoints, report.signed_length, report.unsigned_tail) == (N, 3, N, 0)
    assert report.head_hash == rows(audit_db.engine)[-1]["record_hash"]


def test_checkpoint_signature_is_a_real_hybrid_signature(
    audit_db: AuditDB, verifying_key: HybridVerifyingKey
) -> None:
    build_chain(audit_db, n=5)
    with audit_db.sessions.begin() as session:
        checkpoint = list_checkpoints(session, tenant="acme")[0]
    verifying_key.verify(checkpoint.signature, checkpoint.signed_bytes(), context=CHECKPOINT_CONTEXT)
    assert rfc8785.dumps(checkpoint.body()) == checkpoint.signed_bytes()
    with pytest.raises(Exception):
        verifying_key.verify(checkpoint.signature, checkpoint.signed_bytes(), context="some/other/context")


def test_tenants_have_independent_chains(audit_db: AuditDB, verifying_key: HybridVerifyingKey) -> None:
    build_chain(audit_db, "acme", 3)
    build_chain(audit_db, "globex", 7)
    assert verify(audit_db, verifying_key, "acme").length == 3
    assert verify(audit_db, verifying_key, "globex").length == 7
    assert rows(audit_db.engine, "globex")[0]["prev_hash"] == GENESIS_HASH


def test_unsigned_tail_fails_closed_unless_allowed(
    audit_db: AuditDB, verifying_key: HybridVerifyingKey
) -> None:
    for i in range(7):
        audit_db.log.append(tenant="acme", actor="a", action="x", details={"i": i})
    with pytest.raises(AuditVerificationError, match="not covered by a signed checkpoint") as info:
        verify(audit_db, verifying_key)
    assert info.value.seq == 5
    report = verify(audit_db, verifying_key, allow_unsigned_tail=True)
    assert (report.length, report.signed_length, report.unsigned_tail) == (7, 5, 2)


def test_verification_needs_the_right_public_key(
    audit_db: AuditDB, verifying_key: HybridVerifyingKey
) -> None:
    build_chain(audit_db, n=5)
    with pytest.raises(AuditVerificationError, match="--public-key"):
        verify(audit_db, None)  # type: ignore[arg-type]
    with pytest.raises(AuditVerificationError, match="--public-key"):
        verify(audit_db, [])  # type: ignore[arg-type]
    other = HybridSigningKey.generate().verifying_key()
    with pytest.raises(AuditVerificationError, match="not among the given public keys"):
        verify(audit_db, other)
    # Several keys (before and after a rotation) are accepted.
    assert verify(audit_db, [other, verifying_key]).checkpoints == 1


def test_key_rotation(audit_db: AuditDB, signing_key: HybridSigningKey) -> None:
    build_chain(audit_db, n=5)
    new_key = HybridSigningKey.generate()
    rotated = AuditLog(audit_db.sessions, signer=new_key, checkpoint_every=5)
    for i in range(5):
        rotated.append(tenant="acme", actor="a", action="x", details={"i": i})
    keys = [signing_key.verifying_key(), new_key.verifying_key()]
    report = verify(audit_db, keys)
    assert (report.length, report.checkpoints) == (10, 2)
    with pytest.raises(AuditVerificationError, match="not among"):
        verify(audit_db, new_key.verifying_key())


def test_on_demand_checkpoint_is_idempotent(audit_db: AuditDB) -> None:
    audit_db.log.append(tenant="acme", actor="a", action="x")
    first = audit_db.log.checkpoint(tenant="acme")
    second = audit_db.log.checkpoint(tenant="acme")
    assert first.id == second.id and first.length == 1
    empty = audit_db.log.checkpoint(tenant="globex")
    assert (empty.length, empty.head_hash) == (0, GENESIS_HASH)


def test_append_is_part_of_the_callers_transaction(audit_db: AuditDB, signing_key: HybridSigningKey) -> None:
    with pytest.raises(RuntimeError), audit_db.sessions.begin() as session:
        append_record(session, tenant="acme", actor="a", action="keys.rotate")
        raise RuntimeError("the business operation failed")
    assert rows(audit_db.engine) == []
    with audit_db.sessions.begin() as session:
        append_record(session, tenant="acme", actor="a", action="keys.rotate")
        create_checkpoint(session, tenant="acme", signer=signing_key)
    assert len(rows(audit_db.engine)) == 1


@pytest.mark.parametrize(
    ("kwargs", "match"),
    [
        ({"tenant": "nobody"}, "unknown tenant"),
        ({"details": {"password": "hunter2"}}, "looks like a secret"),
        ({"details": {"epsilon": 0.5}}, "floating-point"),
        ({"actor": ""}, "must not be empty"),
        ({"action": "x" * 129}, "longer than"),
        ({"resource": "line\nbreak"}, "control characters"),
    ],
)
def test_bad_appends_are_refused_and_write_nothing(
    audit_db: AuditDB, kwargs: dict[str, Any], match: str
) -> None:
    args: dict[str, Any] = {"tenant": "acme", "actor": "a", "action": "x"} | kwargs
    with pytest.raises(AuditError, match=match) as info:
        audit_db.log.append(**args)
    assert "hunter2" not in str(info.value)
    assert rows(audit_db.engine, args["tenant"]) == []


def test_log_configuration_is_checked(audit_db: AuditDB) -> None:
    with pytest.raises(AuditError, match="need a signer"):
        AuditLog(audit_db.sessions, signer=None)
    with pytest.raises(AuditError, match="positive"):
        AuditLog(audit_db.sessions, signer=None, checkpoint_every=0)
    unsigned = AuditLog(audit_db.sessions, signer=None, checkpoint_every=None)
    unsigned.append(tenant="acme", actor="a", action="x")
    with pytest.raises(AuditError, match="no signer"):
        unsigned.checkpoint(tenant="acme")


def test_injected_clock_and_timestamp_format(audit_db: AuditDB) -> None:
    moment = dt.datetime(2026, 1, 31, 12, 0, 0, 5, tzinfo=dt.timezone(dt.timedelta(hours=2)))
    log = AuditLog(audit_db.sessions, signer=None, checkpoint_every=None, clock=lambda: moment)
    record = log.append(tenant="acme", actor="a", action="x")
    assert record.timestamp == "2026-01-31T10:00:00.000005Z"


# --------------------------------------------------------------------------- tampering

Tamper = Callable[[AuditDB, HybridSigningKey], None]


def _modify_field(db: AuditDB, _k: HybridSigningKey) -> None:
    sql(db.engine, "UPDATE audit_records SET actor = 'mallory' WHERE tenant_id = 'acme' AND seq = 3")


def _modify_details(db: AuditDB, _k: HybridSigningKey) -> None:
    sql(db.engine, "UPDATE audit_records SET details = :d WHERE tenant_id = 'acme' AND seq = 4", d='{"i":99}')


def _modify_and_rehash_one(db: AuditDB, _k: HybridSigningKey) -> None:
    sql(db.engine, "UPDATE audit_records SET actor = 'mallory' WHERE tenant_id = 'acme' AND seq = 3")
    row = rows(db.engine)[3]
    body = {k: row[k] for k in ("format", "seq", "timestamp", "actor", "action", "resource", "prev_hash")}
    body |= {"tenant": "acme", "details": parse_json_strict(row["details"])}
    sql(
        db.engine,
        "UPDATE audit_records SET record_hash = :h WHERE tenant_id = 'acme' AND seq = 3",
        h=record_hash(body),
    )


def _rewrite_and_rehash_all(db: AuditDB, _k: HybridSigningKey) -> None:
    sql(db.engine, "UPDATE audit_records SET actor = 'mallory' WHERE tenant_id = 'acme' AND seq = 7")
    rehash_from(db.engine, 7)


def _delete_middle(db: AuditDB, _k: HybridSigningKey) -> None:
    sql(db.engine, "DELETE FROM audit_records WHERE tenant_id = 'acme' AND seq = 6")


def _delete_middle_and_renumber(db: AuditDB, _k: HybridSigningKey) -> None:
    sql(db.engine, "DELETE FROM audit_records WHERE tenant_id = 'acme' AND seq = 6")
    for seq in range(7, N):
        sql(
            db.engine,
            "UPDATE audit_records SET seq = :n WHERE tenant_id = 'acme' AND seq = :s",
            n=seq - 1,
            s=seq,
        )
    rehash_from(db.engine, 6)


def _swap_rows(db: AuditDB, _k: HybridSigningKey) -> None:
    sql(db.engine, "UPDATE audit_records SET seq = -1 WHERE tenant_id = 'acme' AND seq = 2")
    sql(db.engine, "UPDATE audit_records SET seq = 2 WHERE tenant_id = 'acme' AND seq = 8")
    sql(db.engine, "UPDATE audit_records SET seq = 8 WHERE tenant_id = 'acme' AND seq = -1")


def _insert_forged_middle(db: AuditDB, _k: HybridSigningKey) -> None:
    for seq in range(N - 1, 2, -1):
        sql(
            db.engine,
            "UPDATE audit_records SET seq = :n WHERE tenant_id = 'acme' AND seq = :s",
            n=seq + 1,
            s=seq,
        )
    insert_row(db.engine, 3, prev=rows(db.engine)[2]["record_hash"])
    rehash_from(db.engine, 3)


def _insert_forged_tail_bad_hash(db: AuditDB, _k: HybridSigningKey) -> None:
    insert_row(db.engine, N, prev=rows(db.engine)[-1]["record_hash"], digest="ab" * 32)


def _insert_forged_tail(db: AuditDB, _k: HybridSigningKey) -> None:
    insert_row(db.engine, N, prev=rows(db.engine)[-1]["record_hash"])


def _insert_forged_tail_and_head(db: AuditDB, _k: HybridSigningKey) -> None:
    insert_row(db.engine, N, prev=rows(db.engine)[-1]["record_hash"])
    rehash_from(db.engine, N)


def _truncate_tail(db: AuditDB, _k: HybridSigningKey) -> None:
    sql(db.engine, "DELETE FROM audit_records WHERE tenant_id = 'acme' AND seq >= 8")


def _truncate_tail_and_fix_head(db: AuditDB, _k: HybridSigningKey) -> None:
    sql(db.engine, "DELETE FROM audit_records WHERE tenant_id = 'acme' AND seq >= 8")
    rehash_from(db.engine, 8)


def _modify_checkpoint(db: AuditDB, _k: HybridSigningKey) -> None:
    sql(db.engine, "UPDATE audit_checkpoints SET length = 9 WHERE tenant_id = 'acme' AND length = 10")


def _swap_checkpoint_signatures(db: AuditDB, _k: HybridSigningKey) -> None:
    with db.engine.connect() as conn:
        sig = conn.execute(text("SELECT signature FROM audit_checkpoints WHERE length = 10")).scalar_one()
    sql(db.engine, "UPDATE audit_checkpoints SET signature = :s WHERE length = 5", s=sig)


def _checkpoint_by_attacker_key(db: AuditDB, _k: HybridSigningKey) -> None:
    sql(db.engine, "DELETE FROM audit_records WHERE tenant_id = 'acme' AND seq >= 8")
    rehash_from(db.engine, 8)
    sql(db.engine, "DELETE FROM audit_checkpoints WHERE tenant_id = 'acme' AND length > 8")
    with db.sessions.begin() as session:
        create_checkpoint(session, tenant="acme", signer=HybridSigningKey.generate())


def _checkpoint_bit_flip(db: AuditDB, _k: HybridSigningKey) -> None:
    with db.engine.connect() as conn:
        sig = bytearray(
            conn.execute(text("SELECT signature FROM audit_checkpoints WHERE length = 5")).scalar_one()
        )
    sig[-1] ^= 1
    sql(db.engine, "UPDATE audit_checkpoints SET signature = :s WHERE length = 5", s=bytes(sig))


def _delete_all_checkpoints(db: AuditDB, _k: HybridSigningKey) -> None:
    sql(db.engine, "DELETE FROM audit_checkpoints WHERE tenant_id = 'acme'")


def _delete_middle_checkpoint(db: AuditDB, _k: HybridSigningKey) -> None:
    sql(db.engine, "DELETE FROM audit_checkpoints WHERE tenant_id = 'acme' AND length = 5")


def _delete_checkpoints_and_rewrite(db: AuditDB, _k: HybridSigningKey) -> None:
    """The attack the interval rule exists for: no checkpoint left, records rewritten consistently."""
    sql(db.engine, "DELETE FROM audit_checkpoints WHERE tenant_id = 'acme'")
    sql(db.engine, "UPDATE audit_records SET actor = 'mallory' WHERE tenant_id = 'acme' AND seq = 3")
    rehash_from(db.engine, 3)  # records, prev_hash links and the chain-head row


def _delete_newest_checkpoints_and_rewrite_tail(db: AuditDB, _k: HybridSigningKey) -> None:
    sql(db.engine, "DELETE FROM audit_checkpoints WHERE tenant_id = 'acme' AND length > 5")
    sql(db.engine, "UPDATE audit_records SET resource = 'job/forged' WHERE tenant_id = 'acme' AND seq = 7")
    rehash_from(db.engine, 7)


def _delete_head_row(db: AuditDB, _k: HybridSigningKey) -> None:
    sql(db.engine, "DELETE FROM audit_chain_heads WHERE tenant_id = 'acme'")


def _forge_checkpoint_row(db: AuditDB, key: HybridSigningKey) -> None:
    # A checkpoint claiming a longer chain, with the signature of a different message.
    fake = Checkpoint(
        tenant="acme",
        length=20,
        head_hash="cd" * 32,
        timestamp="2026-01-01T00:00:00.000000Z",
        key_id=key.verifying_key().key_id,
        signature=b"",
    )
    other = key.sign(b"something else", context=CHECKPOINT_CONTEXT)
    sql(
        db.engine,
        "INSERT INTO audit_checkpoints (tenant_id, format, length, head_hash, timestamp, key_id, signature) "
        "VALUES ('acme', :f, 20, :h, :ts, :k, :s)",
        f=fake.format,
        h=fake.head_hash,
        ts=fake.timestamp,
        k=fake.key_id,
        s=other,
    )


TAMPERING: list[tuple[str, Tamper, int | None, str]] = [
    ("modify-field", _modify_field, 3, "record modified"),
    ("modify-details", _modify_details, 4, "record modified"),
    ("modify-and-rehash-one", _modify_and_rehash_one, 4, "prev_hash does not match"),
    ("rewrite-and-rehash-all", _rewrite_and_rehash_all, 5, "records seq 5..9 were rewritten"),
    ("delete-middle", _delete_middle, 6, "missing"),
    ("delete-middle-renumber-rehash", _delete_middle_and_renumber, 5, "were rewritten"),
    ("swap-rows", _swap_rows, 2, "record modified"),
    ("insert-forged-middle", _insert_forged_middle, 0, "records seq 0..4 were rewritten"),
    ("insert-forged-tail-bad-hash", _insert_forged_tail_bad_hash, N, "record modified"),
    ("insert-forged-tail", _insert_forged_tail, N, "outside tensafe.audit"),
    ("insert-forged-tail-and-head", _insert_forged_tail_and_head, N, "not covered by a signed checkpoint"),
    ("truncate-tail", _truncate_tail, 8, "tail was truncated"),
    ("truncate-tail-fix-head", _truncate_tail_and_fix_head, 8, "tail was truncated"),
    ("modify-checkpoint", _modify_checkpoint, None, "invalid signature"),
    ("swap-checkpoint-signatures", _swap_checkpoint_signatures, None, "invalid signature"),
    ("checkpoint-bit-flip", _checkpoint_bit_flip, None, "invalid signature"),
    ("forged-checkpoint-row", _forge_checkpoint_row, None, "invalid signature"),
    ("checkpoint-by-attacker-key", _checkpoint_by_attacker_key, None, "not among the given public keys"),
    (
        "delete-all-checkpoints",
        _delete_all_checkpoints,
        0,
        r"12 records\) follow the newest signed checkpoint",
    ),
    (
        "delete-middle-checkpoint",
        _delete_middle_checkpoint,
        0,
        "between signed checkpoints of length 0 and 10",
    ),
    (
        "delete-checkpoints-rewrite-consistently",
        _delete_checkpoints_and_rewrite,
        0,
        "follow the newest signed checkpoint, but at most 4 may",
    ),
    (
        "delete-newest-checkpoints-rewrite-tail",
        _delete_newest_checkpoints_and_rewrite_tail,
        5,
        r"records seq 5..11 \(7 records\) follow the newest signed checkpoint",
    ),
    ("delete-head-row", _delete_head_row, 0, "chain-head row is missing"),
]


@pytest.mark.parametrize(("name", "tamper", "seq", "match"), TAMPERING, ids=[t[0] for t in TAMPERING])
def test_tampering_is_detected(
    audit_db: AuditDB,
    signing_key: HybridSigningKey,
    verifying_key: HybridVerifyingKey,
    name: str,
    tamper: Tamper,
    seq: int | None,
    match: str,
) -> None:
    build_chain(audit_db)
    verify(audit_db, verifying_key)  # intact before
    tamper(audit_db, signing_key)
    with pytest.raises(AuditVerificationError, match=match) as info:
        verify(audit_db, verifying_key)
    assert info.value.seq == seq
    assert info.value.tenant == "acme"
    assert "\n" not in str(info.value)
    # What the server checks (the tail after the newest checkpoint allowed) finds it too,
    # unless the only problem is that tail itself.
    if "not covered by a signed checkpoint" not in match:
        with pytest.raises(AuditVerificationError, match=match):
            verify(audit_db, verifying_key, allow_unsigned_tail=True)


def test_signature_blob_is_stored_verbatim(audit_db: AuditDB) -> None:
    build_chain(audit_db, n=5)
    with audit_db.engine.connect() as conn:
        stored = conn.execute(text("SELECT signature FROM audit_checkpoints")).scalar_one()
    with audit_db.sessions.begin() as session:
        assert list_checkpoints(session, tenant="acme")[0].signature == bytes(stored)
    assert base64.b64encode(bytes(stored))
