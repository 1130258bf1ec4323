"""The checkpoint interval rule: honest writers always keep it, deleting checkpoints breaks it.

The rule (docs/audit.md, "The checkpoint interval"): with interval N, at most N records lie
between consecutive signed checkpoints (counting from the start of the chain) and fewer
than N follow the newest one. It is checked here against an independent formulation, a
naive sliding window: every N consecutive chain positions contain a checkpoint.
"""

from __future__ import annotations

import itertools
from pathlib import Path

import pytest
from audit_helpers import AuditDB, rehash_from, sql
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from sqlalchemy import text

from tensafe.audit import (
    DEFAULT_CHECKPOINT_EVERY,
    AuditError,
    AuditLog,
    AuditVerificationError,
    append_record,
    checkpoint_every_from_environment,
    create_checkpoint,
    list_checkpoints,
    verify_chain,
)
from tensafe.audit.interval import interval_violation
from tensafe.cli.main import main
from tensafe.crypto.signing import HybridSigningKey, HybridVerifyingKey
from tensafe.db import ensure_tenant


def window_rule_holds(positions: set[int], length: int, every: int) -> bool:
    """Naive oracle: each window (x, x + N] inside the chain holds a checkpoint position."""
    return all(any(x < p <= x + every for p in positions) for x in range(0, length - every + 1))


@settings(max_examples=400, deadline=None)
@given(
    every=st.integers(1, 8),
    length=st.integers(0, 40),
    data=st.data(),
)
def test_rule_matches_the_sliding_window_oracle(every: int, length: int, data: st.DataObject) -> None:
    positions = data.draw(st.sets(st.integers(0, length), max_size=12))
    found = interval_violation(positions, length, every)
    assert (found is None) == window_rule_holds(positions, length, every)
    if found is not None:
        assert found.end - found.start >= (every if found.tail else every + 1)


def test_interval_configuration(monkeypatch: pytest.MonkeyPatch) -> None:
    assert checkpoint_every_from_environment({}) == DEFAULT_CHECKPOINT_EVERY == 1000
    assert checkpoint_every_from_environment({"TS_AUDIT_CHECKPOINT_EVERY": " 25 "}) == 25
    for bad in ("0", "-3", "ten", "1e3", "2.5"):
        with pytest.raises(AuditError, match="TS_AUDIT_CHECKPOINT_EVERY must be a positive integer"):
            checkpoint_every_from_environment({"TS_AUDIT_CHECKPOINT_EVERY": bad})
    monkeypatch.setenv("TS_AUDIT_CHECKPOINT_EVERY", "7")
    assert checkpoint_every_from_environment() == 7
    with pytest.raises(AuditError, match="positive integer"):
        interval_violation([], 3, 0)


# --------------------------------------------------------------------------- honest writers


_tenants = (f"t{i}" for i in itertools.count())

#: One step of an honest deployment: an append by the server (the interval N), a key event
#: or admin append made inside a business transaction (also N), an append by a writer
#: configured with a smaller interval, an on-demand checkpoint, or a key rotation.
Step = st.sampled_from(["append", "in_transaction", "smaller_interval", "on_demand", "rotate"])


@settings(
    max_examples=25,
    deadline=None,
    suppress_health_check=[HealthCheck.function_scoped_fixture, HealthCheck.too_slow],
)
@given(every=st.integers(1, 6), steps=st.lists(Step, min_size=1, max_size=30))
def test_honest_interleavings_always_verify(
    audit_db: AuditDB, signing_key: HybridSigningKey, every: int, steps: list[str]
) -> None:
    tenant = next(_tenants)
    with audit_db.sessions.begin() as session:
        ensure_tenant(session, tenant)
    keys = [signing_key]
    server = AuditLog(audit_db.sessions, signer=signing_key, checkpoint_every=every)
    for step in steps:
        if step == "append":
            server.append(tenant=tenant, actor="apikey:k", action="api.sample")
        elif step == "in_transaction":
            with audit_db.sessions.begin() as session:
                append_record(
                    session,
                    tenant=tenant,
                    actor="admin:cli",
                    action="admin.create_api_key",
                    signer=keys[-1],
                    checkpoint_every=every,
                )
        elif step == "smaller_interval":
            smaller = AuditLog(audit_db.sessions, signer=keys[-1], checkpoint_every=max(1, every - 2))
            smaller.append(tenant=tenant, actor="service:keys", action="keys.dek.rotated")
        elif step == "on_demand":
            server.checkpoint(tenant=tenant)
        else:
            keys.append(HybridSigningKey.generate())
            server = AuditLog(audit_db.sessions, signer=keys[-1], checkpoint_every=every)
    public = [k.verifying_key() for k in keys]
    with audit_db.sessions.begin() as session:
        report = verify_chain(
            session, tenant=tenant, verifying_key=public, checkpoint_every=every, allow_unsigned_tail=True
        )
        positions = {c.length for c in list_checkpoints(session, tenant=tenant)}
    assert report.length == sum(s in ("append", "in_transaction", "smaller_interval") for s in steps)
    assert report.unsigned_tail < every
    assert window_rule_holds(positions, report.length, every)
    # A verifier using a larger interval accepts the same chain.
    with audit_db.sessions.begin() as session:
        verify_chain(
            session, tenant=tenant, verifying_key=public, checkpoint_every=every + 3, allow_unsigned_tail=True
        )


def test_periodic_checkpoints_without_on_demand_ones_land_on_multiples(
    audit_db: AuditDB, verifying_key: HybridVerifyingKey
) -> None:
    for i in range(17):
        audit_db.log.append(tenant="acme", actor="a", action="x", details={"i": i})
    with audit_db.sessions.begin() as session:
        assert [c.length for c in list_checkpoints(session, tenant="acme")] == [5, 10, 15]


def test_an_on_demand_checkpoint_restarts_the_count(audit_db: AuditDB) -> None:
    for _ in range(3):
        audit_db.log.append(tenant="acme", actor="a", action="x")
    audit_db.log.checkpoint(tenant="acme")
    for _ in range(6):
        audit_db.log.append(tenant="acme", actor="a", action="x")
    with audit_db.sessions.begin() as session:
        assert [c.length for c in list_checkpoints(session, tenant="acme")] == [3, 8]


def test_an_unsigned_writer_breaks_the_rule(audit_db: AuditDB, verifying_key: HybridVerifyingKey) -> None:
    """Why every appender must sign: an appender without the key lets the tail grow past N."""
    unsigned = AuditLog(audit_db.sessions, signer=None, checkpoint_every=None)
    for _ in range(5):
        unsigned.append(tenant="acme", actor="cli:someone", action="tssp.verify.accepted")
    with audit_db.sessions.begin() as session, pytest.raises(AuditVerificationError, match="at most 4 may"):
        verify_chain(
            session, tenant="acme", verifying_key=verifying_key, checkpoint_every=5, allow_unsigned_tail=True
        )


def test_checkpoint_due_without_a_signer_is_refused(audit_db: AuditDB) -> None:
    with audit_db.sessions.begin() as session:
        for _ in range(2):
            append_record(session, tenant="acme", actor="a", action="x", checkpoint_every=3)
    with pytest.raises(AuditError, match="no signer"), audit_db.sessions.begin() as session:
        append_record(session, tenant="acme", actor="a", action="x", checkpoint_every=3)


def test_a_forged_long_checkpoint_row_does_not_stop_the_writer(
    audit_db: AuditDB, verifying_key: HybridVerifyingKey
) -> None:
    """A row claiming more records than the chain has is ignored when deciding to sign."""
    for _ in range(2):
        audit_db.log.append(tenant="acme", actor="a", action="x")
    sql(
        audit_db.engine,
        "INSERT INTO audit_checkpoints (tenant_id, format, length, head_hash, timestamp, key_id, signature) "
        "VALUES ('acme', 'tensafe.audit.checkpoint/v1', 1000, :h, '2026-01-01T00:00:00.000000Z', 'k', :s)",
        h="ab" * 32,
        s=b"x",
    )
    for _ in range(3):
        audit_db.log.append(tenant="acme", actor="a", action="x")
    with audit_db.engine.connect() as conn:
        lengths = conn.execute(text("SELECT length FROM audit_checkpoints ORDER BY length")).scalars().all()
    assert lengths == [5, 1000]


# --------------------------------------------------------------------------- attacks


def _chain(db: AuditDB, n: int) -> None:
    for i in range(n):
        db.log.append(tenant="acme", actor=f"user:{i}", action="data.upload", details={"i": i})


@pytest.mark.parametrize("allow_tail", [True, False])
def test_delete_checkpoints_and_rewrite_is_detected(
    audit_db: AuditDB, verifying_key: HybridVerifyingKey, allow_tail: bool
) -> None:
    """Delete every checkpoint, rewrite a record and everything after it consistently."""
    _chain(audit_db, 13)
    sql(audit_db.engine, "DELETE FROM audit_checkpoints WHERE tenant_id = 'acme'")
    sql(audit_db.engine, "UPDATE audit_records SET actor = 'mallory' WHERE tenant_id = 'acme' AND seq = 2")
    rehash_from(audit_db.engine, 2)
    with audit_db.sessions.begin() as session, pytest.raises(AuditVerificationError) as info:
        verify_chain(
            session,
            tenant="acme",
            verifying_key=verifying_key,
            checkpoint_every=5,
            allow_unsigned_tail=allow_tail,
        )
    assert info.value.seq == 0 and "13 records) follow the newest signed checkpoint" in str(info.value)


def test_what_stays_out_of_reach_the_last_records_before_the_next_checkpoint(
    audit_db: AuditDB, verifying_key: HybridVerifyingKey
) -> None:
    """Documented limit: fewer than N records after a checkpoint can be rewritten unseen by the
    tolerant check (the strict one and a known head catch it)."""
    _chain(audit_db, 12)  # checkpoints at 5 and 10; seq 10 and 11 unsigned
    sql(audit_db.engine, "UPDATE audit_records SET actor = 'mallory' WHERE tenant_id = 'acme' AND seq = 10")
    rehash_from(audit_db.engine, 10)
    with audit_db.sessions.begin() as session:
        report = verify_chain(
            session, tenant="acme", verifying_key=verifying_key, checkpoint_every=5, allow_unsigned_tail=True
        )
        assert report.unsigned_tail == 2
        with pytest.raises(AuditVerificationError, match="not covered by a signed checkpoint"):
            verify_chain(session, tenant="acme", verifying_key=verifying_key, checkpoint_every=5)


def test_a_verifier_with_a_smaller_interval_reports_the_gap(
    audit_db: AuditDB, verifying_key: HybridVerifyingKey
) -> None:
    _chain(audit_db, 10)
    with audit_db.sessions.begin() as session, pytest.raises(AuditVerificationError) as info:
        verify_chain(session, tenant="acme", verifying_key=verifying_key, checkpoint_every=3)
    assert "TS_AUDIT_CHECKPOINT_EVERY" in str(info.value) and info.value.seq == 0


# --------------------------------------------------------------------------- CLI


@pytest.fixture
def pub(tmp_path: Path, verifying_key: HybridVerifyingKey) -> str:
    path = tmp_path / "audit.pub"
    path.write_bytes(verifying_key.public_bytes())
    return str(path)


def _run(argv: list[str], capsys: pytest.CaptureFixture[str]) -> tuple[int, str, str]:
    code = main(argv)
    out, err = capsys.readouterr()
    return code, out, err


def test_cli_detects_deleted_checkpoints_and_rewrite(
    audit_db: AuditDB, pub: str, capsys: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch
) -> None:
    _chain(audit_db, 12)
    verify = ["audit", "verify", "--database-url", audit_db.url, "--public-key", pub, "--allow-unsigned-tail"]
    code, out, err = _run([*verify, "--checkpoint-every", "5"], capsys)
    assert code == 0, err
    assert "at most 5 records between checkpoints" in out
    sql(audit_db.engine, "DELETE FROM audit_checkpoints WHERE tenant_id = 'acme'")
    sql(
        audit_db.engine,
        "UPDATE audit_records SET action = 'data.delete' WHERE tenant_id = 'acme' AND seq = 4",
    )
    rehash_from(audit_db.engine, 4)
    code, _, err = _run([*verify, "--checkpoint-every", "5"], capsys)
    assert code == 3 and "follow the newest signed checkpoint" in err and err.count("\n") == 1
    # The interval comes from the deployment's variable when the flag is absent.
    monkeypatch.setenv("TS_AUDIT_CHECKPOINT_EVERY", "5")
    code, _, err = _run(verify, capsys)
    assert code == 3 and "at most 4 may" in err
    # Usage errors: one line, exit 1.
    code, _, err = _run([*verify, "--checkpoint-every", "0"], capsys)
    assert code == 1 and "--checkpoint-every must be a positive integer" in err
    monkeypatch.setenv("TS_AUDIT_CHECKPOINT_EVERY", "many")
    code, _, err = _run(verify, capsys)
    assert code == 1 and "TS_AUDIT_CHECKPOINT_EVERY" in err


def test_cli_verify_bundle_applies_the_interval(
    audit_db: AuditDB, pub: str, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    _chain(audit_db, 12)
    sql(audit_db.engine, "DELETE FROM audit_checkpoints WHERE tenant_id = 'acme' AND length = 10")
    bundle = tmp_path / "b.json"
    code, _, err = _run(
        ["audit", "export", "--database-url", audit_db.url, "--tenant", "acme", "--out", str(bundle)], capsys
    )
    assert code == 0, err
    args = ["audit", "verify-bundle", str(bundle), "--public-key", pub, "--allow-unsigned-tail"]
    code, _, err = _run([*args, "--checkpoint-every", "5"], capsys)
    assert code == 3 and "records seq 5..11 (7 records) follow the newest" in err
    code, _, err = _run([*args, "--checkpoint-every", "8"], capsys)
    assert code == 0, err


def test_create_checkpoint_in_a_transaction_counts_for_the_writer(
    audit_db: AuditDB, signing_key: HybridSigningKey
) -> None:
    with audit_db.sessions.begin() as session:
        for _ in range(4):
            append_record(
                session, tenant="acme", actor="a", action="x", signer=signing_key, checkpoint_every=5
            )
        create_checkpoint(session, tenant="acme", signer=signing_key)
        for _ in range(5):
            append_record(
                session, tenant="acme", actor="a", action="x", signer=signing_key, checkpoint_every=5
            )
    with audit_db.sessions.begin() as session:
        assert [c.length for c in list_checkpoints(session, tenant="acme")] == [4, 9]
