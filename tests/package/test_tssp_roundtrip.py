"""Pack / verify / unpack round trips, trust, thresholds, recipients, rollback, expiry, policy."""

from __future__ import annotations

import filecmp
import json
import os
import stat
from collections.abc import Callable
from datetime import UTC, datetime, timedelta
from pathlib import Path

import pytest

from package.tssp_helpers import BASE_MODEL, Keys, certificate, make_adapter
from tensafe.crypto.signing import HybridSigningKey
from tensafe.package import (
    NotARecipientError,
    PackageExpiredError,
    PackageInputError,
    PolicyDeniedError,
    RollbackError,
    RollbackState,
    UntrustedSignerError,
    build_evidence,
    inspect,
    pack,
    unpack,
    verify,
)
from tensafe.policy import Policy

DEFAULT_POLICY = Path(__file__).parents[2] / "src/tensafe/policy/examples/default.rego"


def _only(parent: Path, *names: str) -> None:
    """Assert ``parent`` holds exactly ``names`` (no temporary leftovers)."""
    assert sorted(os.listdir(parent)) == sorted(names)


def test_roundtrip_restores_identical_files(tmp_path: Path, keys: Keys) -> None:
    adapter = make_adapter(
        tmp_path / "adapter",
        certificate=certificate(),
        extra={"tokenizer/special_tokens_map.json": b"{}", "README.md": b"# adapter\n", "empty.bin": b""},
    )
    out = tmp_path / "a.tssp"
    header = pack(
        adapter,
        out,
        name="demo",
        version="1.0.0",
        signing_keys=[keys.signers[0]],
        recipients=[keys.recipients[0].public_key()],
        chunk_size=1024,
    )
    state = RollbackState(tmp_path / "state.json")
    dest = tmp_path / "unpacked"
    info = unpack(
        out,
        dest,
        recipient_key=keys.recipients[0],
        trust=[keys.signers[0].verifying_key()],
        state=state,
        policy=Policy.from_file(DEFAULT_POLICY, package="tensafe.tssp"),
    )
    assert info.verified and info.header_sha256 == header
    assert info.trusted_signers == (keys.signers[0].key_id,)
    for rel in [
        "adapter_config.json",
        "adapter_model.safetensors",
        "tokenizer/special_tokens_map.json",
        "README.md",
        "empty.bin",
    ]:
        assert filecmp.cmp(adapter / rel, dest / rel, shallow=False), rel
    # Metadata is written next to the files; the certificate is the signed copy.
    assert json.loads((dest / "dp_certificate.json").read_text()) == certificate()
    assert json.loads((dest / "tssp_manifest.json").read_text())["name"] == "demo"
    assert json.loads((dest / "evidence.json").read_text())["schema"] == "tensafe.tssp.evidence/v1"
    assert stat.S_IMODE(os.stat(dest / "adapter_model.safetensors").st_mode) == 0o600
    assert stat.S_IMODE(os.stat(dest).st_mode) == 0o700
    _only(tmp_path, "adapter", "a.tssp", "state.json", "state.json.lock", "unpacked")


def test_inspect_is_marked_unverified(packer: Callable[..., Path]) -> None:
    info = inspect(packer())
    assert info.verified is False and info.trusted_signers == ()
    assert info.name == "demo" and info.base_model_id == BASE_MODEL
    assert info.dp_certificate is not None and info.dp_certificate["epsilon"] == 7.5


def test_evidence_from_directory_and_arguments(
    tmp_path: Path, keys: Keys, packer: Callable[..., Path]
) -> None:
    ev = {"schema": "custom/v1", "training_run_id": "run-7", "dataset_commitment": "ab" * 32}
    adapter = make_adapter(tmp_path / "ev", extra={"evidence.json": json.dumps(ev).encode()})
    info = inspect(packer(adapter))
    assert info.evidence == ev
    assert "evidence.json" not in [f.path for f in info.files]
    built = build_evidence(training_run_id="run-8", audit_chain_head="cd" * 32)
    info = inspect(packer(evidence=built))
    assert info.evidence["training_run_id"] == "run-8"
    assert info.evidence["library_versions"]["cryptography"]


def test_wrong_recipient_cannot_decrypt(tmp_path: Path, keys: Keys, packer: Callable[..., Path]) -> None:
    pkg = packer()
    with pytest.raises(NotARecipientError):
        unpack(
            pkg,
            tmp_path / "o",
            recipient_key=keys.recipients[1],
            trust=[keys.signers[0].verifying_key()],
            state=None,
        )
    assert not (tmp_path / "o").exists()


def test_every_listed_recipient_can_decrypt(tmp_path: Path, keys: Keys, packer: Callable[..., Path]) -> None:
    pkg = packer(recipients=[r.public_key() for r in keys.recipients[:2]])
    for i, rk in enumerate(keys.recipients[:2]):
        unpack(pkg, tmp_path / f"o{i}", recipient_key=rk, trust=[keys.signers[0].verifying_key()], state=None)
    assert filecmp.cmp(
        tmp_path / "o0/adapter_model.safetensors", tmp_path / "o1/adapter_model.safetensors", shallow=False
    )


def test_untrusted_signer_rejected_even_though_key_is_embedded(
    keys: Keys, packer: Callable[..., Path]
) -> None:
    pkg = packer(signing_keys=[keys.signers[1]])
    with pytest.raises(UntrustedSignerError):
        verify(pkg, trust=[keys.signers[0].verifying_key()], state=None)
    with pytest.raises(PackageInputError):
        verify(pkg, trust=[], state=None)


def test_threshold_counts_distinct_trusted_signers(keys: Keys, packer: Callable[..., Path]) -> None:
    a, b, _ = keys.signers
    pkg = packer(signing_keys=[a, b])  # manifest threshold defaults to all signers (2)
    with pytest.raises(UntrustedSignerError, match="2 required"):
        verify(pkg, trust=[a.verifying_key()], state=None)
    # The same key twice in the trust store still counts once.
    with pytest.raises(UntrustedSignerError):
        verify(pkg, trust=[a.verifying_key(), a.verifying_key()], state=None)
    assert len(verify(pkg, trust=[a.verifying_key(), b.verifying_key()], state=None).trusted_signers) == 2

    pkg1 = packer(signing_keys=[a, b], threshold=1)
    verify(pkg1, trust=[b.verifying_key()], state=None)
    with pytest.raises(UntrustedSignerError):
        verify(pkg1, trust=[b.verifying_key()], state=None, threshold=2)
    verify(pkg1, trust=[a.verifying_key(), b.verifying_key()], state=None, threshold=2)


def test_classical_only_signing_key_refused(keys: Keys, packer: Callable[..., Path]) -> None:
    with pytest.warns(Warning):
        classical = HybridSigningKey.generate(classical_only=True)
    with pytest.raises(PackageInputError, match="classical-only"):
        packer(signing_keys=[classical])


def test_expiry(keys: Keys, packer: Callable[..., Path]) -> None:
    created = datetime(2026, 1, 1, tzinfo=UTC)
    pkg = packer(now=created, expires_in=timedelta(days=1))
    trust = [keys.signers[0].verifying_key()]
    verify(pkg, trust=trust, state=None, now=created + timedelta(hours=23))
    with pytest.raises(PackageExpiredError):
        verify(pkg, trust=trust, state=None, now=created + timedelta(days=1))
    with pytest.raises(PackageExpiredError):
        verify(pkg, trust=trust, state=None)  # the real clock is long past


def test_rollback_is_refused_and_persisted(tmp_path: Path, keys: Keys, packer: Callable[..., Path]) -> None:
    trust = [keys.signers[0].verifying_key()]
    old = packer(version="1.2.0")
    new = packer(version="1.10.0")  # numeric, not lexicographic, comparison
    pre = packer(version="1.10.0-rc.1")
    state_file = tmp_path / "st" / "state.json"
    verify(old, trust=trust, state=RollbackState(state_file))
    verify(new, trust=trust, state=RollbackState(state_file))
    verify(new, trust=trust, state=RollbackState(state_file))  # the same package again is fine
    fresh = RollbackState(state_file)  # a new process: state comes from disk
    with pytest.raises(RollbackError, match="older"):
        verify(old, trust=trust, state=fresh)
    with pytest.raises(RollbackError):
        verify(pre, trust=trust, state=fresh)  # 1.10.0-rc.1 < 1.10.0
    with pytest.raises(RollbackError):
        unpack(old, tmp_path / "o", recipient_key=keys.recipients[0], trust=trust, state=fresh)
    assert not (tmp_path / "o").exists()
    # Same version, different content: version re-use is refused.
    with pytest.raises(RollbackError, match="re-use"):
        verify(packer(version="1.10.0"), trust=trust, state=fresh)
    # Other names are independent.
    verify(packer(name="other", version="0.0.1"), trust=trust, state=fresh)
    doc = json.loads(state_file.read_text())
    assert doc["accepted"]["demo"]["version"] == "1.10.0"
    assert doc["accepted"]["other"]["version"] == "0.0.1"


def test_policy_deny_before_decryption(tmp_path: Path, keys: Keys) -> None:
    adapter = make_adapter(tmp_path / "adapter", certificate=certificate(epsilon=9.5))
    pkg = tmp_path / "p.tssp"
    pack(
        adapter,
        pkg,
        name="demo",
        version="1.0.0",
        signing_keys=[keys.signers[0]],
        recipients=[keys.recipients[0].public_key()],
        base_model_id="someone/else",
    )
    policy = Policy.from_file(DEFAULT_POLICY, package="tensafe.tssp")
    trust = [keys.signers[0].verifying_key()]
    with pytest.raises(PolicyDeniedError) as err:
        verify(pkg, trust=trust, state=None, policy=policy)
    assert set(err.value.reasons) == {
        "epsilon 9.5 exceeds the maximum 8",
        "base model someone/else is not allowed",
    }
    # Policy runs before the recipient key is even looked at: a non-recipient gets the policy error.
    with pytest.raises(PolicyDeniedError):
        unpack(pkg, tmp_path / "o", recipient_key=keys.recipients[1], trust=trust, state=None, policy=policy)
    _only(tmp_path, "adapter", "p.tssp")


def test_policy_sees_documented_input(tmp_path: Path, keys: Keys, packer: Callable[..., Path]) -> None:
    rego = """package tensafe.tssp
import rego.v1
deny contains sprintf("signers=%v", [input.signers.trusted]) if true
deny contains sprintf("name=%v", [input.manifest.name]) if true
deny contains sprintf("run=%v", [input.evidence.training_run_id]) if true
deny contains sprintf("eps=%v", [input.dp_certificate.epsilon]) if true
deny contains "now-set" if input.now
"""
    policy = Policy.from_text(rego, package="tensafe.tssp")
    pkg = packer(evidence=build_evidence(training_run_id="r1"))
    with pytest.raises(PolicyDeniedError) as err:
        verify(pkg, trust=[keys.signers[0].verifying_key()], state=None, policy=policy)
    assert set(err.value.reasons) == {
        f'signers=["{keys.signers[0].key_id}"]',
        "name=demo",
        "run=r1",
        "eps=7.5",
        "now-set",
    }


def test_policy_without_deny_rule_fails_closed(keys: Keys, packer: Callable[..., Path]) -> None:
    policy = Policy.from_text("package tensafe.tssp\nimport rego.v1\nallow if true\n", package="tensafe.tssp")
    with pytest.raises(PolicyDeniedError, match="defines no rule"):
        verify(packer(), trust=[keys.signers[0].verifying_key()], state=None, policy=policy)


def test_unpack_never_overwrites(tmp_path: Path, keys: Keys, packer: Callable[..., Path]) -> None:
    pkg = packer()
    dest = tmp_path / "exists"
    dest.mkdir()
    with pytest.raises(PackageInputError, match="already exists"):
        unpack(
            pkg, dest, recipient_key=keys.recipients[0], trust=[keys.signers[0].verifying_key()], state=None
        )
    with pytest.raises(PackageInputError, match="already exists"):
        pack(
            tmp_path / "adapter0",
            pkg,
            name="x",
            version="1.0.0",
            signing_keys=[keys.signers[0]],
            recipients=[keys.recipients[0].public_key()],
        )


@pytest.mark.parametrize(
    ("kwargs", "match"),
    [
        ({"name": "Bad Name"}, "name"),
        ({"version": "1.0"}, "semantic version"),
        ({"signing_keys": []}, "signing key"),
        ({"recipients": []}, "recipient"),
        ({"threshold": 2}, "threshold"),
        ({"expires_in": timedelta(0)}, "positive"),
        ({"dp_certificate": {"schema": "other"}}, "schema"),
        ({"evidence": {"x": float("nan")}}, "canonical JSON"),
    ],
)
def test_pack_rejects_bad_arguments(
    tmp_path: Path, keys: Keys, kwargs: dict[str, object], match: str
) -> None:
    adapter = make_adapter(tmp_path / "adapter")
    args: dict[str, object] = {
        "name": "demo",
        "version": "1.0.0",
        "signing_keys": [keys.signers[0]],
        "recipients": [keys.recipients[0].public_key()],
    }
    args.update(kwargs)
    with pytest.raises(PackageInputError, match=match):
        pack(adapter, tmp_path / "o.tssp", **args)  # type: ignore[arg-type]
    assert not (tmp_path / "o.tssp").exists()
    _only(tmp_path, "adapter")


def test_pack_refuses_symlinks_and_reserved_names(tmp_path: Path, keys: Keys) -> None:
    common = {
        "name": "demo",
        "version": "1.0.0",
        "signing_keys": [keys.signers[0]],
        "recipients": [keys.recipients[0].public_key()],
    }
    adapter = make_adapter(tmp_path / "a1")
    (adapter / "link").symlink_to(adapter / "adapter_config.json")
    with pytest.raises(PackageInputError, match="regular file"):
        pack(adapter, tmp_path / "o.tssp", **common)  # type: ignore[arg-type]
    adapter = make_adapter(tmp_path / "a2", extra={"tssp_manifest.json": b"{}"})
    with pytest.raises(PackageInputError, match="reserved"):
        pack(adapter, tmp_path / "o.tssp", **common)  # type: ignore[arg-type]
    with pytest.raises(PackageInputError, match="does not exist"):
        pack(tmp_path / "missing", tmp_path / "o.tssp", **common)  # type: ignore[arg-type]


@pytest.mark.parametrize("change", ["append", "rewrite", "replace"])
def test_file_changed_during_packing_aborts(
    tmp_path: Path, keys: Keys, monkeypatch: pytest.MonkeyPatch, change: str
) -> None:
    import tensafe.package._pack as packmod

    adapter = make_adapter(tmp_path / "adapter")
    original = packmod._sha256_file

    def hash_then_change(path: Path) -> object:
        result = original(path)
        if path.name == "adapter_model.safetensors":
            data = path.read_bytes()
            if change == "append":
                path.write_bytes(data + b"x")
            elif change == "rewrite":
                os.utime(path, ns=(0, 0))  # same bytes, but the file was touched
                path.write_bytes(bytes([data[0] ^ 1]) + data[1:])
            else:
                tmp = path.with_suffix(".new")
                tmp.write_bytes(data)
                os.replace(tmp, path)
        return result

    monkeypatch.setattr(packmod, "_sha256_file", hash_then_change)
    with pytest.raises(PackageInputError, match="changed while it was being packed"):
        pack(
            adapter,
            tmp_path / "p.tssp",
            name="demo",
            version="1.0.0",
            signing_keys=[keys.signers[0]],
            recipients=[keys.recipients[0].public_key()],
        )
    _only(tmp_path, "adapter")
