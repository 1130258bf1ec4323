"""Export bundles verify offline with only the public key, fail when edited; parser fuzzing."""

from __future__ import annotations

import base64
import copy
import json
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest
from audit_helpers import AuditDB
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from tensafe.audit import (
    AuditError,
    AuditLog,
    AuditVerificationError,
    export_bundle,
    load_bundle,
    record_hash,
    verify_bundle,
)
from tensafe.crypto.signing import HybridSigningKey, HybridVerifyingKey
from tensafe.db import create_engine_from_url, ensure_tenant, make_session_factory, upgrade

N = 12


def _fill(log: AuditLog, n: int = N) -> None:
    for i in range(n):
        log.append(
            tenant="acme",
            actor="svc:trainer",
            action="privacy.spend",
            resource=f"job/{i}",
            details={"epsilon_spent": f"0.{i}", "step": i},
        )
    log.checkpoint(tenant="acme")


def test_export_verifies_offline(
    audit_db: AuditDB, verifying_key: HybridVerifyingKey, tmp_path: Path
) -> None:
    _fill(audit_db.log)
    out = tmp_path / "bundle.json"
    with audit_db.sessions.begin() as session:
        assert export_bundle(session, tenant="acme", out=out) == N
    # The third party has only the bundle and the public key file.
    public = HybridVerifyingKey.from_public_bytes(verifying_key.public_bytes())
    report = verify_bundle(out.read_bytes(), verifying_key=public)
    assert (report.length, report.checkpoints, report.unsigned_tail) == (N, 3, 0)
    bundle = load_bundle(out.read_bytes())
    assert bundle.public_key_ids == (verifying_key.key_id,)
    assert [r.seq for r in bundle.records] == list(range(N))
    assert not list(tmp_path.glob(".bundle.json.*"))  # no temporary file left behind


def test_export_errors(audit_db: AuditDB, tmp_path: Path) -> None:
    with audit_db.sessions.begin() as session, pytest.raises(AuditError, match="no audit log"):
        export_bundle(session, tenant="globex", out=tmp_path / "x.json")
    audit_db.log.append(tenant="acme", actor="a", action="x")
    with audit_db.sessions.begin() as session, pytest.raises(AuditError, match="cannot write"):
        export_bundle(session, tenant="acme", out=tmp_path / "missing-dir" / "x.json")


@pytest.fixture(scope="module")
def bundle_data(tmp_path_factory: pytest.TempPathFactory, signing_key: HybridSigningKey) -> bytes:
    tmp = tmp_path_factory.mktemp("bundle")
    url = f"sqlite:///{tmp / 'b.db'}"
    upgrade(url)
    engine = create_engine_from_url(url)
    sessions = make_session_factory(engine)
    with sessions.begin() as session:
        ensure_tenant(session, "acme")
    _fill(AuditLog(sessions, signer=signing_key, checkpoint_every=5))
    with sessions.begin() as session:
        export_bundle(session, tenant="acme", out=tmp / "bundle.json")
    engine.dispose()
    return (tmp / "bundle.json").read_bytes()


def _rehash(records: list[dict[str, Any]], start: int) -> None:
    prev = records[start - 1]["record_hash"] if start else "00" * 32
    for rec in records[start:]:
        rec["prev_hash"] = prev
        rec["record_hash"] = record_hash({k: v for k, v in rec.items() if k != "record_hash"})
        prev = rec["record_hash"]


Edit = Callable[[dict[str, Any]], None]


def _modify(b: dict[str, Any]) -> None:
    b["records"][3]["actor"] = "mallory"


def _modify_details(b: dict[str, Any]) -> None:
    b["records"][4]["details"]["epsilon_spent"] = "0.0"


def _delete(b: dict[str, Any]) -> None:
    del b["records"][6]


def _swap(b: dict[str, Any]) -> None:
    r = b["records"]
    r[2]["seq"], r[8]["seq"] = r[8]["seq"], r[2]["seq"]
    r[2], r[8] = r[8], r[2]


def _reorder_array(b: dict[str, Any]) -> None:
    r = b["records"]
    r[2], r[8] = r[8], r[2]


def _insert_forged(b: dict[str, Any]) -> None:
    r = b["records"]
    forged = copy.deepcopy(r[3])
    forged["actor"] = "mallory"
    r.insert(3, forged)
    for seq, rec in enumerate(r):
        rec["seq"] = seq
    _rehash(r, 3)


def _append_forged(b: dict[str, Any]) -> None:
    r = b["records"]
    forged = copy.deepcopy(r[-1])
    forged["seq"] = len(r)
    r.append(forged)
    _rehash(r, len(r) - 1)


def _truncate(b: dict[str, Any]) -> None:
    del b["records"][8:]


def _truncate_and_drop_checkpoints(b: dict[str, Any]) -> None:
    del b["records"][8:]
    b["checkpoints"] = [c for c in b["checkpoints"] if c["length"] <= 5]


def _forge_checkpoint(b: dict[str, Any]) -> None:
    b["checkpoints"][1]["length"] = 9


def _checkpoint_signature_swap(b: dict[str, Any]) -> None:
    b["checkpoints"][0]["signature"] = b["checkpoints"][1]["signature"]


def _other_tenant(b: dict[str, Any]) -> None:
    b["tenant"] = "globex"


def _rewrite_all(b: dict[str, Any]) -> None:
    b["records"][7]["actor"] = "mallory"
    _rehash(b["records"], 7)


EDITS: list[tuple[str, Edit, int | None, str]] = [
    ("modify-field", _modify, 3, "record modified"),
    ("modify-details", _modify_details, 4, "record modified"),
    ("delete-record", _delete, 6, "missing"),
    ("swap-records", _swap, 2, "record modified"),
    ("reorder-array", _reorder_array, 2, "missing"),
    ("insert-forged", _insert_forged, 0, "were rewritten"),
    ("append-forged", _append_forged, N, "not covered by a signed checkpoint"),
    ("truncate", _truncate, 8, "truncated"),
    ("truncate-and-drop-checkpoints", _truncate_and_drop_checkpoints, 5, "not covered"),
    ("forge-checkpoint", _forge_checkpoint, None, "invalid signature"),
    ("swap-checkpoint-signature", _checkpoint_signature_swap, None, "invalid signature"),
    ("other-tenant", _other_tenant, None, "belongs to tenant"),
    ("rewrite-and-rehash", _rewrite_all, 5, "were rewritten"),
]


def test_unedited_bundle_verifies(bundle_data: bytes, verifying_key: HybridVerifyingKey) -> None:
    assert verify_bundle(bundle_data, verifying_key=verifying_key).length == N


@pytest.mark.parametrize(("name", "edit", "seq", "match"), EDITS, ids=[e[0] for e in EDITS])
def test_edited_bundle_fails(
    bundle_data: bytes, verifying_key: HybridVerifyingKey, name: str, edit: Edit, seq: int | None, match: str
) -> None:
    bundle = json.loads(bundle_data)
    edit(bundle)
    with pytest.raises(AuditVerificationError, match=match) as info:
        verify_bundle(json.dumps(bundle).encode(), verifying_key=verifying_key)
    assert info.value.seq == seq


def test_bundle_needs_the_public_key(bundle_data: bytes) -> None:
    with pytest.raises(AuditVerificationError, match="--public-key"):
        verify_bundle(bundle_data, verifying_key=None)  # type: ignore[arg-type]
    other = HybridSigningKey.generate().verifying_key()
    with pytest.raises(AuditVerificationError, match="not among the given public keys"):
        verify_bundle(bundle_data, verifying_key=other)


def test_unsigned_tail_in_bundle(bundle_data: bytes, verifying_key: HybridVerifyingKey) -> None:
    bundle = json.loads(bundle_data)
    bundle["checkpoints"] = [c for c in bundle["checkpoints"] if c["length"] <= 10]
    data = json.dumps(bundle).encode()
    with pytest.raises(AuditVerificationError, match="not covered") as info:
        verify_bundle(data, verifying_key=verifying_key)
    assert info.value.seq == 10
    assert verify_bundle(data, verifying_key=verifying_key, allow_unsigned_tail=True).unsigned_tail == 2


@pytest.mark.parametrize(
    ("edit", "match"),
    [
        (lambda b: b.update(format="tensafe.audit.bundle/v9"), "not a TenSafe audit bundle"),
        (lambda b: b.update(extra=1), "unknown field"),
        (lambda b: b.pop("records"), "lacks field"),
        (lambda b: b["records"][0].update(seq=-1), "non-negative"),
        (lambda b: b["records"][0].update(seq=True), "non-negative"),
        (lambda b: b["records"][0].update(details=[]), "JSON object"),
        (lambda b: b["records"][0].update(prev_hash="XYZ"), "hex"),
        (lambda b: b["records"][0].update(timestamp="yesterday"), "timestamp"),
        (lambda b: b["checkpoints"][0].update(signature="***"), "base64"),
        (lambda b: b.update(records={}), "must be lists"),
    ],
)
def test_malformed_bundles_are_refused(bundle_data: bytes, edit: Callable[[Any], Any], match: str) -> None:
    bundle = json.loads(bundle_data)
    edit(bundle)
    with pytest.raises(AuditError, match=match):
        load_bundle(json.dumps(bundle).encode())


def test_size_limit(bundle_data: bytes, verifying_key: HybridVerifyingKey) -> None:
    with pytest.raises(AuditError, match="larger than"):
        verify_bundle(bundle_data, verifying_key=verifying_key, max_bytes=100)


# --------------------------------------------------------------------------- fuzzing

_FUZZ = settings(max_examples=300, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])


def _only_audit_errors(data: bytes, key: HybridVerifyingKey) -> None:
    try:
        verify_bundle(data, verifying_key=key)
    except AuditError:
        pass


@_FUZZ
@given(st.binary(max_size=2000))
def test_fuzz_random_bytes(data: bytes) -> None:
    key = _KEY.verifying_key()
    with pytest.raises(AuditError):
        verify_bundle(data, verifying_key=key)


@_FUZZ
@given(data=st.data())
def test_fuzz_mutated_bundles(
    bundle_data: bytes, verifying_key: HybridVerifyingKey, data: st.DataObject
) -> None:
    buf = bytearray(bundle_data)
    for _ in range(data.draw(st.integers(1, 4))):
        kind = data.draw(st.sampled_from(["flip", "delete", "insert", "truncate"]))
        pos = data.draw(st.integers(0, max(0, len(buf) - 1)))
        if kind == "flip" and buf:
            buf[pos] ^= 1 << data.draw(st.integers(0, 7))
        elif kind == "delete":
            del buf[pos : pos + data.draw(st.integers(1, 50))]
        elif kind == "insert":
            buf[pos:pos] = data.draw(st.binary(min_size=1, max_size=20))
        else:
            del buf[pos:]
    _only_audit_errors(bytes(buf), verifying_key)


_json = st.recursive(
    st.none() | st.booleans() | st.integers() | st.floats() | st.text(max_size=10),
    lambda c: st.lists(c, max_size=4) | st.dictionaries(st.text(max_size=10), c, max_size=4),
    max_leaves=15,
)


@_FUZZ
@given(
    field=st.sampled_from(["format", "tenant", "exported_at", "public_key_ids", "checkpoints", "records"]),
    value=_json,
    where=st.sampled_from(["top", "record", "checkpoint"]),
)
def test_fuzz_structured_values(
    bundle_data: bytes, verifying_key: HybridVerifyingKey, field: str, value: Any, where: str
) -> None:
    bundle = json.loads(bundle_data)
    if where == "top":
        bundle[field] = value
    elif where == "record":
        bundle["records"][1][field if field in bundle["records"][1] else "details"] = value
    else:
        bundle["checkpoints"][0][field if field in bundle["checkpoints"][0] else "length"] = value
    try:
        text = json.dumps(bundle, allow_nan=True)
    except (TypeError, ValueError):
        return
    _only_audit_errors(text.encode(), verifying_key)


_KEY = HybridSigningKey.generate()


def test_signature_field_is_base64_of_the_stored_blob(bundle_data: bytes) -> None:
    bundle = json.loads(bundle_data)
    assert all(base64.b64decode(c["signature"], validate=True) for c in bundle["checkpoints"])
