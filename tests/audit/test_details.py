"""The seat belt against secrets and raw data in audit details."""

from __future__ import annotations

from typing import Any

import pytest

from tensafe.audit import AuditError, check_details
from tensafe.audit.details import MAX_DETAILS_BYTES


@pytest.mark.parametrize(
    "details",
    [
        {"password": "x"},
        {"api_key": "x"},
        {"apiKey": "x"},
        {"API-KEY": "x"},
        {"secret": "x"},
        {"client_secret": "x"},
        {"token": "x"},
        {"access_token": "x"},
        {"key_material": "x"},
        {"private_key": "x"},
        {"passphrase": "x"},
        {"nested": {"deeper": [{"db_password": "x"}]}},
        {"hsm_pin": "1234"},
        {"blob": b"\x00\x01"},
        {"pem": "-----BEGIN PRIVATE KEY-----\nMII...\n-----END PRIVATE KEY-----"},
        {"pem": "-----BEGIN EC PRIVATE KEY-----"},
        {"epsilon": 1.83},
        {"big": "x" * (MAX_DETAILS_BYTES + 1)},
    ],
)
def test_refused(details: dict[str, Any]) -> None:
    with pytest.raises(AuditError):
        check_details(details)


def test_error_message_does_not_echo_the_value() -> None:
    with pytest.raises(AuditError) as info:
        check_details({"password": "hunter2-correct-horse"})
    assert "hunter2" not in str(info.value)
    assert "password" in str(info.value)


@pytest.mark.parametrize(
    "details",
    [
        {},
        {"key_id": "7f89dc98dd99ce322a6d4a0b3a6377be", "kek_version": 3},
        {"sha256": "ab" * 32, "num_tokens": 512, "tokens_seen": None},
        {"epsilon_spent": "1.83", "delta": "1e-5", "steps": 1000, "accountant": "rdp"},
        {"public_key_id": "abc", "keyring": "default", "monkey": "business"},
        {"nested": {"records": [1, 2, 3], "ok": True}},
    ],
)
def test_allowed(details: dict[str, Any]) -> None:
    assert check_details(details) == details


def test_none_means_empty() -> None:
    assert check_details(None) == {}


def test_not_a_mapping() -> None:
    with pytest.raises(AuditError):
        check_details(["a"])  # type: ignore[arg-type]
