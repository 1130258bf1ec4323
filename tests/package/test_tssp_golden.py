"""Frozen TSSP v1 packages (tests/vectors/tssp/) must verify and unpack in every later version."""

from __future__ import annotations

import hashlib
import json
from pathlib import Path

import pytest

from tensafe.crypto.kem import HybridKemPrivateKey
from tensafe.crypto.signing import HybridVerifyingKey
from tensafe.package import UntrustedSignerError, inspect, unpack, verify

VECTORS = Path(__file__).parents[1] / "vectors" / "tssp"
EXPECTED = json.loads((VECTORS / "expected.json").read_text())
SOURCES = {"v1-basic.tssp": "basic", "v1-multi.tssp": "multi"}


def _trust(names: list[str]) -> list[HybridVerifyingKey]:
    return [HybridVerifyingKey.from_public_bytes((VECTORS / "keys" / n).read_bytes()) for n in names]


@pytest.mark.parametrize("name", sorted(EXPECTED))
def test_golden_package_is_unchanged(name: str) -> None:
    exp = EXPECTED[name]
    assert hashlib.sha256((VECTORS / name).read_bytes()).hexdigest() == exp["package_sha256"]
    info = inspect(VECTORS / name)
    assert (info.name, info.version, info.header_sha256) == (
        exp["name"],
        exp["version"],
        exp["header_sha256"],
    )


@pytest.mark.parametrize("name", sorted(EXPECTED))
def test_golden_package_verifies_and_unpacks(tmp_path: Path, name: str) -> None:
    exp = EXPECTED[name]
    trust = _trust(exp["trust"])
    info = verify(VECTORS / name, trust=trust, state=None, threshold=exp["threshold"])
    assert sorted(info.trusted_signers) == sorted(k.key_id for k in trust)
    assert (info.dp_certificate is not None) == exp["has_dp_certificate"]
    for i, key_file in enumerate(exp["recipients"]):
        key = HybridKemPrivateKey.from_private_bytes(
            (VECTORS / "keys" / key_file).read_bytes(), passphrase=None
        )
        out = tmp_path / f"out{i}"
        unpack(VECTORS / name, out, recipient_key=key, trust=trust, state=None)
        source = VECTORS / "adapters" / SOURCES[name]
        for rel, digest in exp["files"].items():
            data = (out / rel).read_bytes()
            assert hashlib.sha256(data).hexdigest() == digest
            assert data == (source / rel).read_bytes()  # the committed source files are the oracle


def test_golden_multi_needs_both_signers() -> None:
    with pytest.raises(UntrustedSignerError):
        verify(VECTORS / "v1-multi.tssp", trust=_trust(["signer1.pub"]), state=None)


def test_golden_basic_v1_certificate_is_refused_by_the_example_policy() -> None:
    """The frozen package still verifies, but its v1 certificate (which could state an ε that held
    only if the client had Poisson-sampled) no longer passes the example admission policy."""
    from tensafe.package import PolicyDeniedError
    from tensafe.policy import Policy

    info = verify(VECTORS / "v1-basic.tssp", trust=_trust(["signer1.pub"]), state=None)
    assert info.dp_certificate is not None and info.dp_certificate["epsilon"] == 7.25
    assert info.dp_certificate["schema"] == "tensafe.dp_certificate/v1"
    policy = Policy.from_file(
        Path(__file__).parents[2] / "src/tensafe/policy/examples/default.rego", package="tensafe.tssp"
    )
    with pytest.raises(PolicyDeniedError, match=r"private is not true"):
        verify(VECTORS / "v1-basic.tssp", trust=_trust(["signer1.pub"]), state=None, policy=policy)
