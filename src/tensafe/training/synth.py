"""Synthetic sensitive datasets (Faker) with optional secret canaries.

Two kinds of records are generated, each pairing a document full of personal data with a
short, structured answer that a small model can learn in a few minutes of DP training:

* ``clinical``: a clinical note (patient name, date of birth, address, MRN, symptoms,
  medications, vitals) and the summary
  ``Patient: <name>; MRN: <mrn>; Diagnosis: <diagnosis>; Plan: <plan>.``
  The diagnosis and plan come from a fixed table of eight conditions, each with its own
  symptoms, so they are predictable from the note.
* ``support``: a support ticket (customer name, e-mail, address, account number, issue) and the
  triage ``Customer: <name>; Account: <account>; Category: <category>; Priority: <priority>;
  Action: <action>.`` The category and action follow the issue; the priority is ``High`` exactly
  when the ticket says it is urgent.

Canaries (for memorisation and exposure tests) are random 9-digit secrets, each appended to the
*completion* of ``repeats`` distinct records as ``"<prefix><secret>."`` (the loss only sees
completions, so a canary in a prompt could never be memorised). The secret appears nowhere
else. They are returned separately and written to their own file; see
``docs/models-and-data.md`` for the canary file format.

Everything is derived from ``seed``: the same seed, kind, size and options give the same
records and canaries with the same Faker version.
"""

from __future__ import annotations

import dataclasses
import json
import os
import random
import secrets
from collections.abc import Sequence
from pathlib import Path
from typing import Any, Literal

from tensafe._fsutil import atomic_write_bytes
from tensafe.training.errors import TrainingConfigError

__all__ = [
    "CANARY_FILE_FORMAT",
    "FORMATS",
    "KINDS",
    "Canary",
    "SyntheticDataset",
    "synthesize",
    "synthesize_dataset",
    "write_canaries",
    "write_jsonl",
]

Kind = Literal["clinical", "support"]
Format = Literal["prompt", "chat"]

KINDS: tuple[str, ...] = ("clinical", "support")
FORMATS: tuple[str, ...] = ("prompt", "chat")
CANARY_FILE_FORMAT = "tensafe-canaries/v1"
_SECRET_DIGITS = 9
_MAX_RECORDS = 1_000_000

# Each condition: (diagnosis, three symptoms unique to it, plan).
_CONDITIONS: tuple[tuple[str, tuple[str, str, str], str], ...] = (
    (
        "Hypertension",
        ("morning headaches", "dizziness on standing", "blurred vision"),
        "lisinopril 10 mg daily",
    ),
    (
        "Type 2 diabetes",
        ("excessive thirst", "frequent urination", "slow-healing cuts"),
        "metformin 500 mg twice daily",
    ),
    (
        "Asthma",
        ("wheezing", "night-time cough", "chest tightness on exertion"),
        "albuterol inhaler as needed",
    ),
    (
        "Pneumonia",
        ("fever with chills", "productive cough", "pain when breathing in"),
        "amoxicillin 1 g three times daily",
    ),
    (
        "Migraine",
        ("one-sided throbbing headache", "sensitivity to light", "visual aura"),
        "sumatriptan 50 mg as needed",
    ),
    (
        "Urinary tract infection",
        ("burning on urination", "urinary urgency", "lower abdominal pain"),
        "nitrofurantoin 100 mg for 5 days",
    ),
    (
        "Acid reflux",
        ("heartburn after meals", "acid regurgitation", "sour taste at night"),
        "omeprazole 20 mg daily",
    ),
    (
        "Hypothyroidism",
        ("persistent fatigue", "cold intolerance", "unexplained weight gain"),
        "levothyroxine 50 mcg daily",
    ),
)
_MEDICATIONS = (
    "atorvastatin",
    "aspirin",
    "vitamin D",
    "cetirizine",
    "ibuprofen",
    "sertraline",
    "none",
    "loratadine",
)
_NOTE_TEMPLATES = (
    "{name}, DOB {dob}, MRN {mrn}, {address}. Presents with {s1} and {s2}. Meds: {meds}.",
    "Patient {name} (MRN {mrn}, born {dob}) of {address} reports {s1} and {s2}. Takes {meds}.",
    "MRN {mrn}: {name}, DOB {dob}, lives at {address}. Complaints: {s1}; {s2}. Medications: {meds}.",
)
_CLINICAL_INSTRUCTION = "Summarize the clinical note.\n\n"

# Each category: (category, issue sentences, action).
_CATEGORIES: tuple[tuple[str, tuple[str, ...], str], ...] = (
    (
        "Billing",
        (
            "I was charged twice for my last invoice.",
            "My bill shows a fee I never agreed to.",
            "The refund you promised has not arrived.",
        ),
        "refund duplicate charges",
    ),
    (
        "Login",
        (
            "I cannot log in even after resetting my password.",
            "My account is locked after failed sign-ins.",
            "The two-factor code never reaches my phone.",
        ),
        "verify identity, reset access",
    ),
    (
        "Shipping",
        (
            "My package is a week late.",
            "Tracking says delivered but nothing arrived.",
            "The parcel came damaged.",
        ),
        "trace parcel, ship replacement",
    ),
    (
        "Technical",
        (
            "The app crashes every time I open settings.",
            "Uploads fail with an error message.",
            "The dashboard will not load in my browser.",
        ),
        "collect logs, escalate",
    ),
    (
        "Cancellation",
        (
            "Please cancel my subscription.",
            "I want to close my account.",
            "Stop the automatic renewal of my plan.",
        ),
        "confirm cancellation",
    ),
)
_URGENT = (" This is urgent.", " Please fix it ASAP.", " Urgent!")
_SUPPORT_INSTRUCTION = "Triage the support ticket.\n\n"
_CANARY_PREFIX = {"clinical": "Insurance member ID: ", "support": "Card PIN: "}


@dataclasses.dataclass(frozen=True)
class Canary:
    """A secret inserted into the completions of some records.

    Attributes:
        canary_id: Stable identifier (``"canary-<k>"``).
        prefix: Text immediately before the secret inside the completion.
        secret: The random secret (``9`` decimal digits); never shown in ``repr``.
        record_indices: 0-based indices (line order) of the records that contain it.
    """

    canary_id: str
    prefix: str
    secret: str = dataclasses.field(repr=False)
    record_indices: tuple[int, ...]

    @property
    def text(self) -> str:
        """The exact inserted text (prefix and secret, without the final full stop)."""
        return f"{self.prefix}{self.secret}"


@dataclasses.dataclass(frozen=True)
class SyntheticDataset:
    """Synthetic records and the canaries hidden in them."""

    kind: str
    seed: int
    format: str
    records: list[dict[str, Any]]
    canaries: list[Canary]


def _check(kind: str, n: int, canaries: int, canary_repeats: int, fmt: str) -> None:
    if kind not in KINDS:
        raise TrainingConfigError(f"unknown kind {kind!r}; choose one of {', '.join(KINDS)}")
    if fmt not in FORMATS:
        raise TrainingConfigError(f"unknown format {fmt!r}; choose one of {', '.join(FORMATS)}")
    if not 1 <= n <= _MAX_RECORDS:
        raise TrainingConfigError(f"n must be between 1 and {_MAX_RECORDS}, got {n}")
    if canaries < 0 or canary_repeats < 1:
        raise TrainingConfigError("canaries must be >= 0 and canary repeats >= 1")
    if canaries * canary_repeats > n:
        needed = canaries * canary_repeats
        raise TrainingConfigError(
            f"{canaries} canaries x {canary_repeats} repeats need {needed} records, only {n}"
        )


def _clinical(fake: Any, rng: random.Random) -> tuple[str, str]:
    dx, symptoms, plan = rng.choice(_CONDITIONS)
    s1, s2 = rng.sample(symptoms, 2)
    name = fake.name()
    mrn = f"{rng.randrange(10**6, 10**7)}"
    note = rng.choice(_NOTE_TEMPLATES).format(
        name=name,
        dob=fake.date_of_birth(minimum_age=18, maximum_age=90).isoformat(),
        mrn=mrn,
        address=fake.address().replace("\n", ", "),
        s1=s1,
        s2=s2,
        meds=rng.choice(_MEDICATIONS),
    )
    return _CLINICAL_INSTRUCTION + note, f"Patient: {name}; MRN: {mrn}; Diagnosis: {dx}; Plan: {plan}."


def _support(fake: Any, rng: random.Random) -> tuple[str, str]:
    category, issues, action = rng.choice(_CATEGORIES)
    urgent = rng.random() < 0.3
    name = fake.name()
    account = f"ACCT-{rng.randrange(10**7, 10**8)}"
    address = fake.address().replace("\n", ", ")
    ticket = (
        f"From: {name} <{fake.email()}>\nAccount: {account}\nAddress: {address}\n"
        f"{rng.choice(issues)}{rng.choice(_URGENT) if urgent else ''}"
    )
    completion = (
        f"Customer: {name}; Account: {account}; Category: {category}; "
        f"Priority: {'High' if urgent else 'Normal'}; Action: {action}."
    )
    return _SUPPORT_INSTRUCTION + ticket, completion


def synthesize_dataset(
    kind: str,
    n: int,
    *,
    seed: int | None = None,
    canaries: int = 0,
    canary_repeats: int = 1,
    fmt: str = "prompt",
) -> SyntheticDataset:
    """Generate a synthetic sensitive dataset and its canaries.

    Args:
        kind: ``"clinical"`` or ``"support"``.
        n: Number of records (1 to 1,000,000).
        seed: Seed of every random choice; ``None`` draws one from the OS CSPRNG (it is
            recorded in the result so the dataset can be regenerated).
        canaries: Number of distinct secret canaries.
        canary_repeats: Number of distinct records each canary is inserted into.
        fmt: ``"prompt"`` for prompt/completion records, ``"chat"`` for chat messages.

    Returns:
        The dataset.

    Raises:
        TrainingConfigError: An argument is out of range.
    """
    from faker import Faker

    _check(kind, n, canaries, canary_repeats, fmt)
    if seed is None:
        seed = secrets.randbits(63)
    # Synthetic data must be reproducible from its seed, so a seeded PRNG is the right tool here;
    # canary secrets only need to be unknown to the model, not to whoever holds the seed.
    rng = random.Random(f"tensafe-synth/records/{kind}/{seed}")  # noqa: S311
    fake = Faker("en_US")
    fake.seed_instance(f"tensafe-synth/faker/{kind}/{seed}")
    make = _clinical if kind == "clinical" else _support
    pairs = [make(fake, rng) for _ in range(n)]

    canary_rng = random.Random(f"tensafe-synth/canaries/{kind}/{seed}")  # noqa: S311
    chosen = canary_rng.sample(range(n), canaries * canary_repeats)
    found: list[Canary] = []
    used: set[str] = set()
    corpus = "\n".join(p + "\n" + c for p, c in pairs)
    for k in range(canaries):
        while True:
            secret = "".join(canary_rng.choice("0123456789") for _ in range(_SECRET_DIGITS))
            if secret not in used and secret not in corpus:
                break
        used.add(secret)
        indices = tuple(sorted(chosen[k * canary_repeats : (k + 1) * canary_repeats]))
        found.append(
            Canary(
                canary_id=f"canary-{k}", prefix=_CANARY_PREFIX[kind], secret=secret, record_indices=indices
            )
        )
        for i in indices:
            prompt, completion = pairs[i]
            pairs[i] = (prompt, f"{completion} {_CANARY_PREFIX[kind]}{secret}.")

    records: list[dict[str, Any]]
    if fmt == "prompt":
        records = [{"prompt": p, "completion": c} for p, c in pairs]
    else:
        records = [
            {"messages": [{"role": "user", "content": p}, {"role": "assistant", "content": c}]}
            for p, c in pairs
        ]
    return SyntheticDataset(kind=kind, seed=seed, format=fmt, records=records, canaries=found)


def synthesize(
    kind: str,
    n: int,
    *,
    seed: int | None = None,
    canaries: int = 0,
    canary_repeats: int = 1,
    fmt: str = "prompt",
) -> list[dict[str, Any]]:
    """Return only the records of :func:`synthesize_dataset` (same arguments)."""
    return synthesize_dataset(
        kind, n, seed=seed, canaries=canaries, canary_repeats=canary_repeats, fmt=fmt
    ).records


# --------------------------------------------------------------------------- files


def write_jsonl(path: str | os.PathLike[str], records: Sequence[dict[str, Any]]) -> None:
    """Write records as UTF-8 JSONL atomically (temporary file, fsync, rename)."""
    payload = "".join(json.dumps(r, ensure_ascii=False) + "\n" for r in records).encode("utf-8")
    atomic_write_bytes(Path(path), payload, mode=0o644)


def write_canaries(
    path: str | os.PathLike[str], dataset: SyntheticDataset, *, dataset_commitment: str
) -> None:
    """Write the canary file (owner-readable only) atomically.

    Args:
        path: Destination (``*.json``).
        dataset: The dataset whose canaries are written.
        dataset_commitment: The plain :func:`tensafe.training.data.dataset_sha256` of the data
            file, binding the canaries to it (this file is private, like the data).
    """
    payload = {
        "format": CANARY_FILE_FORMAT,
        "kind": dataset.kind,
        "seed": dataset.seed,
        "records": len(dataset.records),
        "dataset_commitment": dataset_commitment,
        "field": "completion",
        "secret_alphabet": "0123456789",
        "secret_length": _SECRET_DIGITS,
        "canaries": [
            {
                "canary_id": c.canary_id,
                "prefix": c.prefix,
                "secret": c.secret,
                "text": c.text,
                "record_indices": list(c.record_indices),
            }
            for c in dataset.canaries
        ],
    }
    atomic_write_bytes(Path(path), (json.dumps(payload, indent=2) + "\n").encode("utf-8"), mode=0o600)
