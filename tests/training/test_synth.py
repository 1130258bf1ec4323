"""Synthetic datasets, canaries and the ``tensafe data`` CLI."""

from __future__ import annotations

import json
import pathlib
import re
import stat
from typing import Any

import pytest

from tensafe.cli.main import main
from tensafe.training.data import dataset_sha256, load_jsonl, to_messages
from tensafe.training.errors import TrainingConfigError
from tensafe.training.synth import synthesize, synthesize_dataset

_CLINICAL = re.compile(
    r"^Patient: (?P<name>[^;]+); MRN: (?P<mrn>\d{7}); Diagnosis: (?P<dx>[^;]+); "
    r"Plan: (?P<plan>[^.]+ ?[^.]*)\.$"
)
_SUPPORT = re.compile(
    r"^Customer: (?P<name>[^;]+); Account: (?P<acct>ACCT-\d{8}); Category: (?P<cat>\w+); "
    r"Priority: (?P<prio>High|Normal); Action: (?P<action>[^.]+)\.$"
)


def test_clinical_shape_and_learnable_structure() -> None:
    records = synthesize("clinical", 300, seed=1)
    assert len(records) == 300
    dx_by_symptom: dict[str, set[str]] = {}
    plan_by_dx: dict[str, set[str]] = {}
    for r in records:
        assert set(r) == {"prompt", "completion"}
        m = _CLINICAL.match(r["completion"])
        assert m, r["completion"]
        # The name and MRN in the summary are copied from the note.
        assert m["name"] in r["prompt"] and m["mrn"] in r["prompt"]
        note = r["prompt"].split("\n\n", 1)[1]
        for symptom in re.findall(r"(?:with|reports|Complaints:) (.+?)(?: and |; )(.+?)\.", note)[0]:
            dx_by_symptom.setdefault(symptom, set()).add(m["dx"])
        plan_by_dx.setdefault(m["dx"], set()).add(m["plan"])
    # Every symptom implies one diagnosis, every diagnosis one plan: the target is learnable.
    assert all(len(v) == 1 for v in dx_by_symptom.values())
    assert all(len(v) == 1 for v in plan_by_dx.values())
    assert len(plan_by_dx) == 8


def test_support_shape_and_priority_rule() -> None:
    records = synthesize("support", 300, seed=2)
    priorities = set()
    for r in records:
        m = _SUPPORT.match(r["completion"])
        assert m, r["completion"]
        assert m["name"] in r["prompt"] and m["acct"] in r["prompt"]
        urgent = any(w in r["prompt"] for w in ("urgent", "Urgent", "ASAP"))
        assert (m["prio"] == "High") == urgent
        priorities.add(m["prio"])
    assert priorities == {"High", "Normal"}


def test_deterministic_by_seed_and_chat_format() -> None:
    assert synthesize("clinical", 20, seed=5) == synthesize("clinical", 20, seed=5)
    assert synthesize("clinical", 20, seed=5) != synthesize("clinical", 20, seed=6)
    prompt_form = synthesize("support", 10, seed=5, canaries=2)
    chat_form = synthesize("support", 10, seed=5, canaries=2, fmt="chat")
    for p, c in zip(prompt_form, chat_form):
        assert to_messages(c) == to_messages(p)
    random_seed = synthesize_dataset("clinical", 3)
    assert isinstance(random_seed.seed, int)
    assert synthesize("clinical", 3, seed=random_seed.seed) == random_seed.records


@pytest.mark.parametrize(("k", "repeats"), [(1, 1), (5, 1), (3, 4), (10, 10)])
def test_canaries_appear_exactly_as_specified(k: int, repeats: int) -> None:
    ds = synthesize_dataset("clinical", 100, seed=7, canaries=k, canary_repeats=repeats)
    plain = synthesize("clinical", 100, seed=7)
    assert len(ds.canaries) == k
    assert len({c.secret for c in ds.canaries}) == k
    lines = [json.dumps(r) for r in ds.records]
    chosen: set[int] = set()
    for c in ds.canaries:
        assert re.fullmatch(r"\d{9}", c.secret)
        assert c.text == c.prefix + c.secret
        assert len(c.record_indices) == repeats
        hits = [i for i, line in enumerate(lines) if c.secret in line]
        assert hits == list(c.record_indices)
        for i in c.record_indices:
            # Only the completion carries it, exactly once, appended to the normal summary.
            assert ds.records[i]["completion"] == plain[i]["completion"] + f" {c.text}."
            assert c.secret not in ds.records[i]["prompt"]
        assert chosen.isdisjoint(c.record_indices)
        chosen.update(c.record_indices)
        assert c.secret not in repr(c)
    # Records without a canary are unchanged.
    assert all(ds.records[i] == plain[i] for i in range(100) if i not in chosen)


@pytest.mark.parametrize(
    ("kwargs", "fragment"),
    [
        ({"kind": "legal", "n": 3}, "unknown kind"),
        ({"kind": "clinical", "n": 0}, "between 1"),
        ({"kind": "clinical", "n": 3, "canaries": 2, "canary_repeats": 2}, "need 4 records"),
        ({"kind": "clinical", "n": 3, "fmt": "xml"}, "unknown format"),
    ],
)
def test_bad_arguments(kwargs: dict[str, Any], fragment: str) -> None:
    kind, n = kwargs.pop("kind"), kwargs.pop("n")
    with pytest.raises(TrainingConfigError, match=fragment):
        synthesize_dataset(kind, n, seed=0, **kwargs)


# ----------------------------------------------------------------- CLI


def test_cli_synth_writes_data_and_private_canary_file(
    tmp_path: pathlib.Path, capsys: pytest.CaptureFixture[str]
) -> None:
    out = tmp_path / "train.jsonl"
    rc = main(
        [
            "data",
            "synth",
            "--kind",
            "support",
            "--n",
            "40",
            "--out",
            str(out),
            "--canaries",
            "3",
            "--canary-repeats",
            "2",
            "--seed",
            "11",
            "--format",
            "chat",
            "--json",
        ]
    )
    assert rc == 0
    captured = capsys.readouterr()
    summary = json.loads(captured.out.strip().splitlines()[-1])
    canary_path = tmp_path / "train.canaries.json"
    assert summary["canary_out"] == str(canary_path)
    records = load_jsonl(out)
    assert len(records) == 40 and all("messages" in r for r in records)
    assert summary["dataset_sha256"] == dataset_sha256(out)
    canary_file = json.loads(canary_path.read_text())
    assert stat.S_IMODE(canary_path.stat().st_mode) == 0o600
    assert canary_file["format"] == "tensafe-canaries/v1"
    assert canary_file["dataset_commitment"] == dataset_sha256(out)
    text = out.read_text()
    for c in canary_file["canaries"]:
        assert text.count(c["text"]) == 2 == len(c["record_indices"])
        for i in c["record_indices"]:
            assert c["text"] in records[i]["messages"][-1]["content"]
        # Secrets never reach the console.
        assert c["secret"] not in captured.out + captured.err
    assert not [p for p in tmp_path.iterdir() if p.name.startswith(".")]  # No temporary leftovers.


@pytest.mark.parametrize(
    "argv",
    [
        ["--n", "0"],
        ["--n", "ten"],
        ["--n", "5", "--canaries", "6"],
        ["--n", "5", "--canary-out", "X"],
        ["--n", "5", "--out", "F/out.jsonl"],  # a regular file where the directory should be
    ],
)
def test_cli_synth_bad_input_is_one_line(
    tmp_path: pathlib.Path, capsys: pytest.CaptureFixture[str], argv: list[str]
) -> None:
    base = ["data", "synth", "--kind", "clinical"]
    if "--out" not in argv:
        argv = [*argv, "--out", str(tmp_path / "o.jsonl")]
    argv = [a if a != "X" else str(tmp_path / "c.json") for a in argv]
    (tmp_path / "F").write_text("a file, not a directory")
    argv = [str(tmp_path / a) if a.startswith("F/") else a for a in argv]
    try:
        rc = main(base + argv)
    except SystemExit as exc:  # argparse type errors
        rc = int(exc.code or 0)
    assert rc == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert err and ("error:" in err[-1])
    assert "Traceback" not in "\n".join(err)
    assert not (tmp_path / "o.jsonl").exists()


def test_cli_check(tmp_path: pathlib.Path, capsys: pytest.CaptureFixture[str], tiny_tokenizer: Any) -> None:
    out = tmp_path / "d.jsonl"
    assert main(["data", "synth", "--kind", "clinical", "--n", "12", "--out", str(out), "--seed", "1"]) == 0
    capsys.readouterr()
    assert main(["data", "check", str(out), "--model", "smollm2-135m-instruct", "--json"]) == 0
    summary = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    assert summary["records"] == summary["examples"] == 12
    assert summary["dataset_sha256"] == dataset_sha256(out)
    assert 0 < summary["target_tokens_mean"] < summary["tokens_mean"] <= summary["tokens_max"]
    bad = tmp_path / "bad.jsonl"
    bad.write_text('{"prompt": "a", "completion": "b"}\n{oops\n')
    assert main(["data", "check", str(bad)]) == 2
    assert capsys.readouterr().err.strip().startswith(f"tensafe: error: {bad}:2: invalid JSON")
