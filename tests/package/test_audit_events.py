"""TSSP decisions become structured audit events: ids, severity, recoverable, the audit log."""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import replace
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

import pytest
from sqlalchemy.orm import Session

from package._forge import split
from package.tssp_helpers import Keys, certificate, make_adapter
from tensafe.audit import AuditLog, iter_records, verify_chain
from tensafe.cli.main import main
from tensafe.db import create_engine_from_url, ensure_tenant, make_session_factory, upgrade
from tensafe.package import (
    PACKAGE_EVENTS,
    AuditLogSink,
    AuditSink,
    NotARecipientError,
    PackageAuditError,
    PackageEvent,
    PackageExpiredError,
    PackageFormatError,
    PackageInputError,
    PolicyDeniedError,
    RollbackError,
    RollbackState,
    SignatureVerificationError,
    UntrustedSignerError,
    pack,
    unpack,
    verify,
)
from tensafe.package._format import SignatureEntry
from tensafe.policy import Policy

POLICY = Path(__file__).parents[2] / "src/tensafe/policy/examples/default.rego"


class ListSink:
    """Collects events; optionally records whether ``out`` existed when each arrived."""

    def __init__(self, watch: Path | None = None) -> None:
        self.events: list[PackageEvent] = []
        self.watch = watch
        self.out_existed: list[bool] = []

    def append(self, event: PackageEvent) -> None:
        self.events.append(event)
        if self.watch is not None:
            self.out_existed.append(self.watch.exists())


class BrokenSink:
    def append(self, event: PackageEvent) -> None:
        raise ConnectionError("audit database unreachable\nsecond line")


def _denied_package(tmp_path: Path, keys: Keys) -> Path:
    adapter = make_adapter(tmp_path / "adapter-denied", certificate=certificate(epsilon=9.5))
    pkg = tmp_path / "denied.tssp"
    pack(
        adapter,
        pkg,
        name="demo",
        version="1.0.0",
        signing_keys=[keys.signers[0]],
        recipients=[keys.recipients[0].public_key()],
        base_model_id="someone/else",
    )
    return pkg


def test_event_table_is_complete_and_well_formed() -> None:
    for event_id, (severity, recoverable) in PACKAGE_EVENTS.items():
        assert event_id.startswith("tssp.") and event_id.count(".") == 2
        assert severity in {"info", "warning", "error", "critical"} and isinstance(recoverable, bool)
    assert isinstance(ListSink(), AuditSink)


def test_verify_and_unpack_acceptance(tmp_path: Path, keys: Keys, packer: Callable[..., Path]) -> None:
    pkg = packer()
    trust = [keys.signers[0].verifying_key()]
    sink = ListSink()
    info = verify(pkg, trust=trust, state=None, audit=sink)
    (event,) = sink.events
    assert (event.event_id, event.severity, event.recoverable, event.operation) == (
        "tssp.verify.accepted",
        "info",
        True,
        "verify",
    )
    assert (event.package, event.version, event.header_sha256) == ("demo", "1.0.0", info.header_sha256)
    assert event.trusted_signers == (keys.signers[0].key_id,)
    assert event.resource == "tssp/demo@1.0.0"

    out = tmp_path / "out"
    sink = ListSink(watch=out)
    unpack(pkg, out, recipient_key=keys.recipients[0], trust=trust, state=None, audit=sink)
    assert [e.event_id for e in sink.events] == ["tssp.unpack.accepted"]
    assert sink.out_existed == [False]  # recorded before the output appears
    assert out.is_dir()


def test_policy_denial_carries_every_reason(tmp_path: Path, keys: Keys) -> None:
    pkg = _denied_package(tmp_path, keys)
    policy = Policy.from_file(POLICY, package="tensafe.tssp")
    trust = [keys.signers[0].verifying_key()]
    for operation in ("verify", "unpack"):
        sink = ListSink()
        with pytest.raises(PolicyDeniedError):
            if operation == "verify":
                verify(pkg, trust=trust, state=None, policy=policy, audit=sink)
            else:
                unpack(
                    pkg,
                    tmp_path / "o",
                    recipient_key=keys.recipients[0],
                    trust=trust,
                    state=None,
                    policy=policy,
                    audit=sink,
                )
        (event,) = sink.events
        assert event.event_id == "tssp.policy.denied" and event.operation == operation
        assert (event.severity, event.recoverable) == ("warning", True)
        assert set(event.reasons) == {
            "epsilon 9.5 exceeds the maximum 8",
            "base model someone/else is not allowed",
        }
        assert event.details()["reasons"] == list(event.reasons)
        assert event.package == "demo"
    assert not (tmp_path / "o").exists()


def _refusal(call: Callable[[ListSink], Any], error: type[Exception]) -> PackageEvent:
    sink = ListSink()
    with pytest.raises(error):
        call(sink)
    (event,) = sink.events
    return event


def test_every_refusal_kind_has_its_event(tmp_path: Path, keys: Keys, packer: Callable[..., Path]) -> None:
    a, b, _ = keys.signers
    trust = [a.verifying_key()]

    # Signature failure: a flipped bit in the ML-DSA half of the only signature.
    parts = split(packer().read_bytes())
    sig = parts.signatures[0]
    blob = bytearray(sig.signature)
    blob[-1] ^= 1
    bad_sig = tmp_path / "badsig.tssp"
    bad_sig.write_bytes(replace(parts, signatures=(SignatureEntry(sig.key_id, bytes(blob)),)).encode())
    event = _refusal(lambda s: verify(bad_sig, trust=trust, state=None, audit=s), SignatureVerificationError)
    assert (event.event_id, event.severity, event.recoverable) == (
        "tssp.signature.invalid",
        "critical",
        False,
    )
    assert event.package == "demo" and "modified" in event.message

    good = packer()
    event = _refusal(
        lambda s: verify(good, trust=[b.verifying_key()], state=None, audit=s), UntrustedSignerError
    )
    assert (event.event_id, event.recoverable) == ("tssp.signer.untrusted", True)

    # Rollback: version 2.0.0 accepted, then 1.0.0 offered.
    state = RollbackState(tmp_path / "state.json")
    verify(packer(version="2.0.0"), trust=trust, state=state)
    old = packer(version="1.0.0")
    event = _refusal(lambda s: verify(old, trust=trust, state=state, audit=s), RollbackError)
    assert (event.event_id, event.severity, event.recoverable) == (
        "tssp.rollback.rejected",
        "critical",
        False,
    )
    assert event.version == "1.0.0"

    created = datetime(2026, 1, 1, tzinfo=UTC)
    short = packer(now=created, expires_in=timedelta(days=1))
    event = _refusal(
        lambda s: verify(short, trust=trust, state=None, now=created + timedelta(days=2), audit=s),
        PackageExpiredError,
    )
    assert (event.event_id, event.recoverable) == ("tssp.package.expired", False)

    garbage = tmp_path / "garbage.tssp"
    garbage.write_bytes(b"not a package at all" * 10)
    event = _refusal(lambda s: verify(garbage, trust=trust, state=None, audit=s), PackageFormatError)
    assert event.event_id == "tssp.format.invalid" and event.package is None
    assert event.resource == "tssp" and "package" not in event.details()

    event = _refusal(
        lambda s: verify(tmp_path / "missing.tssp", trust=trust, state=None, audit=s), PackageInputError
    )
    assert (event.event_id, event.recoverable) == ("tssp.input.invalid", True)

    event = _refusal(
        lambda s: unpack(
            good, tmp_path / "o", recipient_key=keys.recipients[1], trust=trust, state=None, audit=s
        ),
        NotARecipientError,
    )
    assert (event.event_id, event.operation) == ("tssp.recipient.unknown", "unpack")


def test_a_failing_sink_fails_closed(tmp_path: Path, keys: Keys, packer: Callable[..., Path]) -> None:
    pkg = packer()
    trust = [keys.signers[0].verifying_key()]
    state = RollbackState(tmp_path / "state.json")
    with pytest.raises(PackageAuditError, match="not accepted") as err:
        verify(pkg, trust=trust, state=state, audit=BrokenSink())
    assert err.value.exit_code == 8 and "\n" not in str(err.value)
    assert "audit database unreachable" in str(err.value)
    assert not (tmp_path / "state.json").exists()  # nothing was recorded as accepted
    out = tmp_path / "out"
    with pytest.raises(PackageAuditError):
        unpack(pkg, out, recipient_key=keys.recipients[0], trust=trust, state=state, audit=BrokenSink())
    assert not out.exists()
    assert sorted(p.name for p in tmp_path.iterdir() if p.name.startswith(".out")) == []
    # On a refusal the original error stays visible, as the message and the cause.
    with pytest.raises(PackageAuditError, match="was refused") as err:
        verify(pkg, trust=[keys.signers[1].verifying_key()], state=None, audit=BrokenSink())
    assert isinstance(err.value.__cause__, UntrustedSignerError)


def test_audit_log_sink_writes_a_verifiable_chain(
    migrated_database_url: str, tmp_path: Path, keys: Keys, packer: Callable[..., Path]
) -> None:
    """On SQLite and PostgreSQL: events land in the tenant's chain as records."""
    engine = create_engine_from_url(migrated_database_url)
    try:
        factory = make_session_factory(engine)
        with factory.begin() as session:
            ensure_tenant(session, "edge")
        sink = AuditLogSink(
            AuditLog(factory, signer=None, checkpoint_every=None), tenant="edge", actor="service:edge-7"
        )
        trust = [keys.signers[0].verifying_key()]
        info = verify(packer(), trust=trust, state=None, audit=sink)
        policy = Policy.from_file(POLICY, package="tensafe.tssp")
        with pytest.raises(PolicyDeniedError):
            verify(_denied_package(tmp_path, keys), trust=trust, state=None, policy=policy, audit=sink)
        with Session(engine) as session, session.begin():
            records = list(iter_records(session, tenant="edge"))
            report = verify_chain(
                session,
                tenant="edge",
                verifying_key=keys.signers[2].verifying_key(),
                allow_unsigned_tail=True,
            )
        assert report.length == 2
        accepted, denied = records
        assert (accepted.action, accepted.actor, accepted.resource) == (
            "tssp.verify.accepted",
            "service:edge-7",
            "tssp/demo@1.0.0",
        )
        assert accepted.details["header_sha256"] == info.header_sha256
        assert accepted.details["severity"] == "info" and accepted.details["recoverable"] is True
        assert denied.action == "tssp.policy.denied"
        assert denied.details["severity"] == "warning"
        assert len(denied.details["reasons"]) == 2
    finally:
        engine.dispose()


@pytest.fixture(autouse=True)
def _deployment_key_dir(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """``--audit-db`` appends sign checkpoints with the deployment key (``KeyManager.from_environment``):
    keep the development KEK it creates in this test's directory, not in the working directory."""
    monkeypatch.setenv("TS_DATA_DIR", str(tmp_path / "ts-data"))


def test_cli_audit_options(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    url = f"sqlite:///{tmp_path / 'audit.db'}"
    upgrade(url)
    engine = create_engine_from_url(url)
    with make_session_factory(engine).begin() as session:
        ensure_tenant(session, "edge")
    for who in ("alice", "bob"):
        assert main(["tssp", "keygen", "--out", str(tmp_path / who)]) == 0
    adapter = make_adapter(tmp_path / "adapter", certificate=certificate())
    pkg = tmp_path / "a.tssp"
    assert (
        main(
            [
                "tssp",
                "pack",
                str(adapter),
                "--name",
                "demo",
                "--version",
                "1.0.0",
                "--signing-key",
                str(tmp_path / "alice/signing.key"),
                "--recipient",
                str(tmp_path / "bob/recipient.pub"),
                "--out",
                str(pkg),
            ]
        )
        == 0
    )
    common = ["--trust", str(tmp_path / "alice/signing.pub"), "--state", str(tmp_path / "state.json")]
    audit = ["--audit-db", url, "--audit-tenant", "edge", "--audit-actor", "user:ops"]
    assert main(["tssp", "verify", str(pkg), *common, *audit]) == 0
    out = tmp_path / "out"
    assert (
        main(
            [
                "tssp",
                "unpack",
                str(pkg),
                "--key",
                str(tmp_path / "bob/recipient.key"),
                "--out",
                str(out),
                *common,
                *audit,
            ]
        )
        == 0
    )
    wrong_trust = ["--trust", str(tmp_path / "bob/signing.pub")]
    assert main(["tssp", "verify", str(pkg), *wrong_trust, *audit]) == 4
    capsys.readouterr()
    with Session(engine) as session:
        records = list(iter_records(session, tenant="edge"))
    assert [r.action for r in records] == [
        "tssp.verify.accepted",
        "tssp.unpack.accepted",
        "tssp.signer.untrusted",
    ]
    assert {r.actor for r in records} == {"user:ops"}

    # Misuse: one line, non-zero exit, nothing verified.
    assert main(["tssp", "verify", str(pkg), *common, "--audit-db", url]) == 2
    err = capsys.readouterr().err
    assert err.startswith("tensafe: error:") and "together" in err and err.count("\n") == 1
    assert main(["tssp", "verify", str(pkg), *common, "--audit-db", url, "--audit-tenant", "nobody"]) == 8
    err = capsys.readouterr().err
    assert "unknown tenant" in err and err.count("\n") == 1
    empty = f"sqlite:///{tmp_path / 'empty.db'}"
    assert main(["tssp", "verify", str(pkg), *common, "--audit-db", empty, "--audit-tenant", "edge"]) == 2
    assert "tensafe db upgrade" in capsys.readouterr().err
    engine.dispose()
