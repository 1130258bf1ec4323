"""The keyed dataset commitment of training evidence (``hmac-sha256/v2``) and its key file.

The attack it stops: ``evidence.json`` travels with the adapter (and in every TSSP package's
header). With a plain hash of the training records there, anyone holding a package and all
but one low-entropy field of the data (which of eight diagnoses one patient has) recovers the
field by hashing the eight candidate data sets. With a keyed commitment whose key stays in
the run's ``output_dir`` that search finds nothing, while the data owner, holding the key,
still verifies the data set (``tensafe data commitment``).

Oracles: Python's own ``hmac``/``hashlib`` on the documented byte string, and the former
plain-hash formula for the attack that used to work.
"""

from __future__ import annotations

import hashlib
import hmac
import json
import os
import pathlib
import re
import stat
from typing import Any

import pytest
from _run_helpers import isolated_deployment, write_run
from hypothesis import given, settings
from hypothesis import strategies as st

from tensafe.cli.main import main
from tensafe.crypto.kem import HybridKemPrivateKey
from tensafe.crypto.signing import HybridSigningKey
from tensafe.package import RollbackState, inspect, pack, unpack
from tensafe.training.config import load_config
from tensafe.training.data import (
    COMMITMENT_KEY_FILENAME,
    CommitmentMismatchError,
    dataset_commitment,
    load_jsonl,
    new_commitment_key,
    read_commitment_key,
    records_commitment,
    records_sha256,
    verify_records_commitment,
    write_commitment_key,
)
from tensafe.training.errors import DataError, TrainingConfigError
from tensafe.training.synth import write_jsonl
from tensafe.training.trainer import train

_DIAGNOSIS = re.compile(r"Diagnosis: ([^;]+);")


def _oracle(records: list[dict[str, Any]], key: bytes) -> str:
    """HMAC-SHA256(key, "tensafe/dataset-commitment/v2" || 0x00 || c_1 || "\\n" || ...), stdlib only."""
    body = b"".join(
        json.dumps(r, sort_keys=True, separators=(",", ":"), ensure_ascii=False).encode("utf-8") + b"\n"
        for r in records
    )
    return hmac.new(key, b"tensafe/dataset-commitment/v2\x00" + body, hashlib.sha256).hexdigest()


def _plain_v1(records: list[dict[str, Any]]) -> str:
    """The former evidence value: a plain SHA-256 anyone can recompute."""
    body = b"".join(
        json.dumps(r, sort_keys=True, separators=(",", ":"), ensure_ascii=False).encode("utf-8") + b"\n"
        for r in records
    )
    return hashlib.sha256(b"tensafe/dataset-commitment/v1\n" + body).hexdigest()


# --------------------------------------------------------------------------- the scheme

_RECORDS = st.lists(
    st.fixed_dictionaries(
        {"prompt": st.text(max_size=20), "completion": st.text(min_size=1, max_size=20)},
        optional={"id": st.integers(-(2**40), 2**40)},
    ),
    min_size=1,
    max_size=6,
)


@settings(max_examples=60, deadline=None)
@given(records=_RECORDS, key=st.binary(min_size=32, max_size=32))
def test_commitment_is_the_documented_hmac(records: list[dict[str, Any]], key: bytes) -> None:
    assert records_commitment(records, key=key) == _oracle(records, key)


@settings(max_examples=40, deadline=None)
@given(records=_RECORDS, key=st.binary(min_size=32, max_size=32), other=st.binary(min_size=32, max_size=32))
def test_commitment_binds_records_order_and_key(
    records: list[dict[str, Any]], key: bytes, other: bytes
) -> None:
    value = records_commitment(records, key=key)
    assert verify_records_commitment(records, key=key, expected=value) == value
    changed = [*records[:-1], records[-1] | {"completion": records[-1]["completion"] + "x"}]
    with pytest.raises(CommitmentMismatchError):
        verify_records_commitment(changed, key=key, expected=value)
    with pytest.raises(CommitmentMismatchError):
        verify_records_commitment([*records, records[0]], key=key, expected=value)
    if other != key:
        with pytest.raises(CommitmentMismatchError):
            verify_records_commitment(records, key=other, expected=value)
    if len(records) > 1 and records[0] != records[-1]:
        with pytest.raises(CommitmentMismatchError):
            verify_records_commitment(list(reversed(records)), key=key, expected=value)


def test_file_commitment_ignores_formatting(tmp_path: pathlib.Path) -> None:
    records = [
        {"prompt": "é ü", "completion": "b", "id": 1},
        {"messages": [{"role": "user", "content": "x"}, {"role": "assistant", "content": "y"}]},
    ]
    key = new_commitment_key()
    a = tmp_path / "a.jsonl"
    a.write_text("".join(json.dumps(r) + "\n" for r in records), encoding="utf-8")
    b = tmp_path / "b.jsonl"
    b.write_text(
        "\n"
        + json.dumps(records[0], sort_keys=True, ensure_ascii=True)
        + "\n  \n"
        + json.dumps(records[1], separators=(", ", " : "))
        + "\n",
        encoding="utf-8",
    )
    assert dataset_commitment(a, key=key) == dataset_commitment(b, key=key) == _oracle(records, key)


@pytest.mark.parametrize("key", [b"", b"k" * 31, b"k" * 33, "k" * 32])
def test_commitment_refuses_a_key_that_is_not_32_bytes(key: Any) -> None:
    with pytest.raises(TrainingConfigError, match="32"):
        records_commitment([{"prompt": "a", "completion": "b"}], key=key)


@pytest.mark.parametrize("expected", ["", "zz" * 32, "ab" * 31, "AB" * 32 + "x", 7])
def test_verify_refuses_a_malformed_expected_value(expected: Any) -> None:
    with pytest.raises(CommitmentMismatchError):
        verify_records_commitment([{"prompt": "a", "completion": "b"}], key=b"k" * 32, expected=expected)


def test_new_keys_are_fresh() -> None:
    keys = {new_commitment_key() for _ in range(64)}
    assert len(keys) == 64 and all(len(k) == 32 for k in keys)


# --------------------------------------------------------------------------- the key file


def test_key_file_is_owner_only_and_never_overwritten(tmp_path: pathlib.Path) -> None:
    key = new_commitment_key()
    path = write_commitment_key(tmp_path / "k.key", key)
    assert stat.S_IMODE(path.stat().st_mode) == 0o600
    assert read_commitment_key(path) == key
    doc = json.loads(path.read_text())
    assert doc == {
        "format": "tensafe.dataset-commitment-key/v1",
        "key": key.hex(),
        "scheme": "hmac-sha256/v2",
    }
    with pytest.raises(DataError, match="never overwritten"):
        write_commitment_key(path, new_commitment_key())
    assert read_commitment_key(path) == key
    assert [p.name for p in tmp_path.iterdir()] == ["k.key"]  # no temporary leftovers


def test_key_file_readable_by_others_is_refused(tmp_path: pathlib.Path) -> None:
    path = write_commitment_key(tmp_path / "k.key", new_commitment_key())
    os.chmod(path, 0o640)
    with pytest.raises(DataError, match="chmod 600"):
        read_commitment_key(path)


@pytest.mark.parametrize(
    "content",
    [
        b"",
        b"not json",
        b'{"format": "other", "scheme": "hmac-sha256/v2", "key": "' + b"ab" * 32 + b'"}',
        b'{"format": "tensafe.dataset-commitment-key/v1", "scheme": "hmac-sha256/v2", "key": "ab"}',
        b'{"format": "tensafe.dataset-commitment-key/v1", "scheme": "hmac-sha256/v2", "key": "'
        + b"zz" * 32
        + b'"}',
        b'{"format": "tensafe.dataset-commitment-key/v1", "scheme": "sha256/v1", "key": "'
        + b"ab" * 32
        + b'"}',
        b" " * 5000,
    ],
)
def test_malformed_key_file_is_refused(tmp_path: pathlib.Path, content: bytes) -> None:
    path = tmp_path / "k.key"
    path.write_bytes(content)
    os.chmod(path, 0o600)
    with pytest.raises(DataError):
        read_commitment_key(path)


def test_key_file_symlink_is_refused(tmp_path: pathlib.Path) -> None:
    real = write_commitment_key(tmp_path / "real.key", new_commitment_key())
    link = tmp_path / "link.key"
    link.symlink_to(real)
    with pytest.raises(DataError):
        read_commitment_key(link)


# --------------------------------------------------------------------------- the attack, end to end


def _with_diagnosis(records: list[dict[str, Any]], index: int, diagnosis: str) -> list[dict[str, Any]]:
    out = [dict(r) for r in records]
    out[index]["completion"] = _DIAGNOSIS.sub(f"Diagnosis: {diagnosis};", out[index]["completion"], count=1)
    return out


def test_evidence_no_longer_lets_anyone_recover_a_low_entropy_field(
    tmp_path: pathlib.Path,
    tiny_model_dir: pathlib.Path,
    monkeypatch: pytest.MonkeyPatch,
    capsys: pytest.CaptureFixture[str],
) -> None:
    isolated_deployment(monkeypatch, tmp_path / "deployment")
    config = write_run(tmp_path, tiny_model_dir, training__steps=2, training__checkpoint_every=2)
    train_file = tmp_path / "data" / "train.jsonl"
    data_b = load_jsonl(train_file)  # the data set actually trained on
    diagnoses = sorted({m for r in data_b for m in _DIAGNOSIS.findall(r["completion"])})
    assert len(diagnoses) >= 4  # a low-entropy field: a handful of values
    secret_index = 17
    truth = _DIAGNOSIS.findall(data_b[secret_index]["completion"])[0]
    data_a = _with_diagnosis(data_b, secret_index, next(d for d in diagnoses if d != truth))
    assert data_a != data_b

    def candidates() -> dict[str, list[dict[str, Any]]]:
        # The attacker knows every record except record 17's diagnosis.
        return {d: _with_diagnosis(data_b, secret_index, d) for d in diagnoses}

    # Before: evidence held the plain hash, and one candidate matches it: the field is recovered.
    old_evidence_value = _plain_v1(data_b)
    assert records_sha256(data_b) == old_evidence_value  # the formula evidence v1 used
    recovered = [d for d, recs in candidates().items() if _plain_v1(recs) == old_evidence_value]
    assert recovered == [truth]

    # Now: train for real and read what a package's recipients see.
    result = train(load_config(config), signer=HybridSigningKey.generate(), show_progress=False)
    evidence_text = (result.adapter_dir / "evidence.json").read_text(encoding="utf-8")
    evidence = json.loads(evidence_text)
    assert evidence["schema"] == "tensafe.evidence/v2"
    commitment = evidence["dataset_commitment"]
    assert commitment["scheme"] == "hmac-sha256/v2" and re.fullmatch(r"[0-9a-f]{64}", commitment["value"])
    public_guesses = [b"\x00" * 32, bytes.fromhex(evidence["config_sha256"]), hashlib.sha256(b"").digest()]
    for d, recs in candidates().items():
        assert _plain_v1(recs) not in evidence_text, d
        for guess in public_guesses:  # keys an attacker could derive from public information
            assert _oracle(recs, guess) != commitment["value"], d
    # Not even the exact training data, hashed without the key, appears anywhere in the evidence.
    assert _plain_v1(data_b) not in evidence_text and hashlib.sha256(
        train_file.read_bytes()
    ).hexdigest() not in (evidence_text)

    # The owner, with the key, verifies the data set, and tells it apart from the other diagnosis.
    key_file = result.commitment_key_path
    assert key_file == result.output_dir / COMMITMENT_KEY_FILENAME
    assert stat.S_IMODE(key_file.stat().st_mode) == 0o600
    assert result.adapter_dir not in key_file.parents
    evidence_path = result.adapter_dir / "evidence.json"
    assert (
        main(
            ["data", "commitment", str(train_file), "--key", str(key_file), "--evidence", str(evidence_path)]
        )
        == 0
    )
    assert "matches" in capsys.readouterr().out
    write_jsonl(tmp_path / "a.jsonl", data_a)
    args = ["data", "commitment", str(tmp_path / "a.jsonl"), "--key", str(key_file)]
    assert main([*args, "--expect", commitment["value"]]) == 1
    assert "does not match" in capsys.readouterr().err
    assert _oracle(data_b, read_commitment_key(key_file)) == commitment["value"]


def test_every_run_draws_its_own_key_and_a_resumed_run_keeps_it(
    tmp_path: pathlib.Path, tiny_model_dir: pathlib.Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    isolated_deployment(monkeypatch, tmp_path / "deployment")
    signer = HybridSigningKey.generate()
    first = train(
        load_config(write_run(tmp_path / "one", tiny_model_dir, training__steps=1)),
        signer=signer,
        show_progress=False,
    )
    second = train(
        load_config(write_run(tmp_path / "two", tiny_model_dir, training__steps=1)),
        signer=signer,
        show_progress=False,
    )
    # Same records, different runs: the commitments do not even reveal that the data sets are equal.
    assert load_jsonl(tmp_path / "one" / "data" / "train.jsonl") == load_jsonl(
        tmp_path / "two" / "data" / "train.jsonl"
    )
    key_one = read_commitment_key(first.commitment_key_path)
    assert key_one != read_commitment_key(second.commitment_key_path)
    value_one = json.loads(first.evidence_path.read_text())["dataset_commitment"]["value"]
    assert value_one != json.loads(second.evidence_path.read_text())["dataset_commitment"]["value"]
    # Re-running the finished configuration resumes and keeps the key (the evidence stays verifiable).
    again = train(load_config(tmp_path / "one" / "config.yaml"), signer=signer, show_progress=False)
    assert read_commitment_key(again.commitment_key_path) == key_one
    assert json.loads(again.evidence_path.read_text())["dataset_commitment"]["value"] == value_one


def test_owner_verifies_a_run_that_held_out_part_of_the_file(
    tmp_path: pathlib.Path,
    tiny_model_dir: pathlib.Path,
    monkeypatch: pytest.MonkeyPatch,
    capsys: pytest.CaptureFixture[str],
) -> None:
    isolated_deployment(monkeypatch, tmp_path / "deployment")
    config = write_run(
        tmp_path,
        tiny_model_dir,
        data={"train": "data/train.jsonl", "eval_fraction": 0.2, "split_seed": 5, "max_length": 160},
        training__steps=1,
    )
    result = train(load_config(config), signer=HybridSigningKey.generate(), show_progress=False)
    argv = [
        "data",
        "commitment",
        str(tmp_path / "data" / "train.jsonl"),
        "--key",
        str(result.commitment_key_path),
        "--evidence",
        str(result.evidence_path),
    ]
    assert main(argv) == 1  # the whole file is not what was trained on
    capsys.readouterr()
    assert main([*argv, "--eval-fraction", "0.2", "--split-seed", "5", "--json"]) == 0
    summary = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    assert summary["verified"] is True and summary["records"] == 160


def test_key_is_not_in_a_package_packed_from_the_adapter(
    tmp_path: pathlib.Path, tiny_model_dir: pathlib.Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    isolated_deployment(monkeypatch, tmp_path / "deployment")
    result = train(
        load_config(write_run(tmp_path, tiny_model_dir, training__steps=1)),
        signer=HybridSigningKey.generate(),
        show_progress=False,
    )
    key = read_commitment_key(result.commitment_key_path)
    package_signer, recipient = HybridSigningKey.generate(), HybridKemPrivateKey.generate()
    package = tmp_path / "run.tssp"
    pack(
        result.adapter_dir,
        package,
        name="run",
        version="1.0.0",
        signing_keys=[package_signer],
        recipients=[recipient.public_key()],
    )
    info = inspect(package)
    assert COMMITMENT_KEY_FILENAME not in {f.path.rsplit("/", 1)[-1] for f in info.files}
    assert (
        info.evidence["dataset_commitment"]
        == json.loads(result.evidence_path.read_text())["dataset_commitment"]
    )
    unpack(
        package,
        tmp_path / "unpacked",
        recipient_key=recipient,
        trust=[package_signer.verifying_key()],
        state=RollbackState(tmp_path / "state.json"),
    )
    unpacked = [p for p in (tmp_path / "unpacked").rglob("*") if p.is_file()]
    assert unpacked
    for blob in [package.read_bytes(), *(p.read_bytes() for p in unpacked)]:
        assert key not in blob and key.hex().encode() not in blob


def test_evidence_without_a_keyed_commitment_is_refused(
    tmp_path: pathlib.Path, capsys: pytest.CaptureFixture[str]
) -> None:
    data = tmp_path / "d.jsonl"
    write_jsonl(data, [{"prompt": "a", "completion": "b"}])
    key_file = write_commitment_key(tmp_path / "k.key", new_commitment_key())
    old = tmp_path / "evidence.json"
    old.write_text(json.dumps({"schema": "tensafe.evidence/v1", "dataset_commitment": "ab" * 32}))
    assert main(["data", "commitment", str(data), "--key", str(key_file), "--evidence", str(old)]) == 2
    assert "no keyed dataset commitment" in capsys.readouterr().err
    assert main(["data", "commitment", str(data), "--key", str(key_file), "--expect", "XYZ"]) == 2
    assert "64 lower-case hex" in capsys.readouterr().err
    assert main(["data", "commitment", str(data), "--key", str(tmp_path / "missing.key")]) == 2
    assert "no such" in capsys.readouterr().err
    assert main(["data", "commitment", str(data), "--key", str(key_file), "--json"]) == 0
    summary = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    assert summary["value"] == _oracle([{"prompt": "a", "completion": "b"}], read_commitment_key(key_file))
    assert summary["verified"] is False


def test_pack_help_says_the_commitment_is_keyed(capsys: pytest.CaptureFixture[str]) -> None:
    with pytest.raises(SystemExit):
        main(["tssp", "pack", "--help"])
    text = " ".join(capsys.readouterr().out.split())
    assert "KEYED dataset commitment" in text and "never a plain hash" in text
