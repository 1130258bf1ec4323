"""Tenant privacy policies: ``tensafe admin set-privacy-policy``, operator floor, client tightening."""

from __future__ import annotations

import argparse
from pathlib import Path

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from tensafe.cli import admin
from tensafe.db import create_engine_from_url, make_session_factory
from tensafe.privacy import DpPolicy
from tensafe.server.errors import BadRequestError, ServerConfigurationError, TenantAdminError
from tensafe.server.models import PrivacyPolicyRow
from tensafe.server.privacy import OperatorPrivacy, client_request, effective_policy


@pytest.fixture(autouse=True)
def _deployment_key_dir(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """Admin commands sign audit checkpoints with the deployment key (``KeyManager.from_environment``):
    keep the development KEK it creates in this test's directory, not in the working directory."""
    monkeypatch.setenv("TS_DATA_DIR", str(tmp_path / "ts-data"))


def _run(url: str, *argv: str) -> int:
    parser = argparse.ArgumentParser(prog="tensafe")
    admin.register(parser.add_subparsers(dest="command"))
    args = parser.parse_args(["admin", *argv, "--database-url", url])
    code: int = args.handler(args)
    return code


def test_cli_sets_and_shows_a_tenant_policy(
    migrated_database_url: str, capsys: pytest.CaptureFixture[str]
) -> None:
    url = migrated_database_url
    assert _run(url, "create-tenant", "acme") == 0
    assert _run(url, "show-privacy-policy", "--tenant", "acme") == 0
    assert "operator's TS_DP_* defaults apply" in capsys.readouterr().out
    argv = ["--tenant", "acme", "--target-epsilon", "3", "--delta", "1e-6", "--clip-norm", "0.5"]
    assert _run(url, "set-privacy-policy", *argv, "--dataset-size", "1000", "--max-steps", "100") == 0
    engine = create_engine_from_url(url)
    try:
        with make_session_factory(engine)() as s:
            row = s.get(PrivacyPolicyRow, "acme")
            assert row is not None
            assert (row.target_epsilon, row.delta, row.clip_norm, row.accountant) == (3.0, 1e-6, 0.5, "rdp")
            assert (row.dataset_size, row.expected_batch_size, row.max_steps) == (1000, None, 100)
            assert row.allow_non_private is False
            eff = effective_policy(OperatorPrivacy(), row)
    finally:
        engine.dispose()
    assert eff.policy.target_epsilon == 3.0 and eff.policy.dataset_size == 1000
    assert eff.policy.expected_batch_size == 256 and eff.policy.max_steps == 100
    assert eff.policy.sampling == "client_chosen_batches"
    with pytest.raises(TenantAdminError, match="delta"):
        _run(
            url,
            "set-privacy-policy",
            "--tenant",
            "acme",
            "--target-epsilon",
            "3",
            "--delta",
            "2",
            "--clip-norm",
            "1",
        )
    with pytest.raises(TenantAdminError, match="unknown tenant"):
        _run(
            url,
            "set-privacy-policy",
            "--tenant",
            "nobody",
            "--target-epsilon",
            "3",
            "--delta",
            "1e-6",
            "--clip-norm",
            "1",
        )


def test_operator_floor_from_environment() -> None:
    op = OperatorPrivacy.from_environment({"TS_DP_TARGET_EPSILON": "2.5", "TS_DP_MAX_STEPS": "7"})
    assert op.policy().target_epsilon == 2.5 and op.policy().max_steps == 7
    with pytest.raises(ServerConfigurationError, match="TS_DP_DELTA"):
        OperatorPrivacy.from_environment({"TS_DP_DELTA": "abc"})
    with pytest.raises(ServerConfigurationError, match="invalid"):
        OperatorPrivacy.from_environment({"TS_DP_DELTA": "0.5"})  # not below 1/N


def test_non_private_needs_operator_tenant_and_client() -> None:
    row = PrivacyPolicyRow(
        tenant_id="t", target_epsilon=4.0, delta=1e-6, clip_norm=1.0, accountant="rdp", allow_non_private=True
    )
    off = client_request({"tensafe.dp.enabled": "false"})
    with pytest.raises(BadRequestError, match="does not allow"):
        effective_policy(OperatorPrivacy(), row, off)  # operator forbids
    assert effective_policy(OperatorPrivacy(allow_non_private=True), row, off).policy is None
    row.allow_non_private = False
    with pytest.raises(BadRequestError, match="does not allow"):
        effective_policy(OperatorPrivacy(allow_non_private=True), row, off)
    with pytest.raises(BadRequestError, match="unknown privacy request"):
        client_request({"tensafe.dp.epsilon": "1"})
    with pytest.raises(BadRequestError, match="not a valid value"):
        client_request({"tensafe.dp.max_steps": "ten"})
    assert client_request({"renderer_name": "x", "tensafe.dp.clip_norm": "0.25"}) == {"clip_norm": 0.25}


@settings(max_examples=40, deadline=None)
@given(
    eps=st.floats(0.1, 100),
    tenant_eps=st.floats(0.1, 100),
    client_eps=st.floats(0.1, 100),
    clip=st.floats(0.01, 10),
)
def test_effective_policy_is_never_looser_than_operator_or_tenant(
    eps: float, tenant_eps: float, client_eps: float, clip: float
) -> None:
    operator = OperatorPrivacy(target_epsilon=eps)
    row = PrivacyPolicyRow(
        tenant_id="t",
        target_epsilon=tenant_eps,
        delta=1e-6,
        clip_norm=clip,
        accountant="rdp",
        allow_non_private=False,
    )
    request = {"target_epsilon": client_eps}
    floor = min(eps, tenant_eps)
    if client_eps > floor:
        with pytest.raises(BadRequestError, match="looser"):
            effective_policy(operator, row, request)
        return
    eff = effective_policy(operator, row, request).policy
    assert isinstance(eff, DpPolicy)
    assert eff.is_at_least_as_strict_as(operator.policy())
    assert eff.target_epsilon == client_eps and eff.clip_norm == min(clip, 1.0)
