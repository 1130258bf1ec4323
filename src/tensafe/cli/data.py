"""``tensafe data``: synthesise and check fine-tuning datasets; verify dataset commitments.

``synth`` and ``check`` print the plain ``dataset_sha256`` of a file, for its owner only (it
must not be published: a low-entropy field can be recovered from it by hashing candidates).
``commitment`` computes or verifies the keyed commitment (``hmac-sha256/v2``) that training
evidence records, with the run's ``dataset_commitment.key``.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

__all__ = ["register"]


def _positive(value: str) -> int:
    try:
        number = int(value)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected an integer, got {value!r}") from None
    if number < 1:
        raise argparse.ArgumentTypeError(f"must be at least 1, got {number}")
    return number


def _non_negative(value: str) -> int:
    try:
        number = int(value)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected an integer, got {value!r}") from None
    if number < 0:
        raise argparse.ArgumentTypeError(f"must be at least 0, got {number}")
    return number


def register(subparsers: argparse._SubParsersAction[argparse.ArgumentParser]) -> None:
    """Add the ``data`` command group."""
    parser = subparsers.add_parser(
        "data",
        help="synthesise and check datasets",
        description="Synthesise and check JSONL fine-tuning datasets.",
    )
    sub = parser.add_subparsers(dest="data_command", metavar="ACTION")

    synth = sub.add_parser(
        "synth",
        help="write a synthetic sensitive dataset (Faker) with optional secret canaries",
        description="Write a synthetic dataset of clinical notes or support tickets full of fake personal "
        "data, with a structured target a small model learns quickly. Canaries are random 9-digit "
        "secrets appended to the completions of chosen records and written to a separate file.",
    )
    synth.add_argument("--kind", choices=("clinical", "support"), required=True, help="kind of records")
    synth.add_argument("--n", type=_positive, required=True, help="number of records")
    synth.add_argument("--out", type=Path, required=True, help="output JSONL file (written atomically)")
    synth.add_argument(
        "--canaries", type=_non_negative, default=0, help="number of secret canaries (default 0)"
    )
    synth.add_argument(
        "--canary-repeats", type=_positive, default=1, help="records each canary is inserted into (default 1)"
    )
    synth.add_argument(
        "--canary-out",
        type=Path,
        default=None,
        help="canary file (default: OUT with suffix .canaries.json); mode 0600",
    )
    synth.add_argument("--seed", type=int, default=None, help="seed (default: random, printed)")
    synth.add_argument(
        "--format",
        dest="fmt",
        choices=("prompt", "chat"),
        default="prompt",
        help="prompt/completion records or chat messages (default prompt)",
    )
    synth.add_argument("--json", action="store_true", help="print a JSON summary as the last line")
    synth.set_defaults(handler=_synth)

    check = sub.add_parser(
        "check",
        help="validate a JSONL dataset and print its plain SHA-256 (keep it private)",
        description="Validate a JSONL dataset; with --model also tokenise it with the "
        "model's chat template and report token statistics.",
    )
    check.add_argument("path", type=Path, help="JSONL dataset")
    check.add_argument("--model", default=None, help="tokenise with this model's tokenizer")
    check.add_argument("--max-length", type=_positive, default=512, help="truncation length (default 512)")
    check.add_argument("--json", action="store_true", help="print a JSON summary as the last line")
    check.set_defaults(handler=_check)

    commitment = sub.add_parser(
        "commitment",
        help="compute or verify the keyed dataset commitment of training evidence",
        description="Compute the keyed dataset commitment (hmac-sha256/v2) of a JSONL dataset with a "
        "run's dataset_commitment.key, or verify it against --expect VALUE or the evidence.json of the "
        "run. Exits 1 when it does not match. When the run held out part of the file (data.eval_fraction), "
        "give the same --eval-fraction and --split-seed: the commitment covers the training records only.",
    )
    commitment.add_argument("path", type=Path, help="JSONL dataset")
    commitment.add_argument(
        "--key", type=Path, required=True, help="the run's key file (OUTPUT_DIR/dataset_commitment.key)"
    )
    expected = commitment.add_mutually_exclusive_group()
    expected.add_argument("--expect", metavar="HEX", help="the commitment value to verify (64 hex digits)")
    expected.add_argument("--evidence", type=Path, help="verify against this evidence.json")
    commitment.add_argument(
        "--eval-fraction",
        type=float,
        default=None,
        help="the run's data.eval_fraction, when it held out part of this file",
    )
    commitment.add_argument("--split-seed", type=int, default=0, help="the run's data.split_seed (default 0)")
    commitment.add_argument("--json", action="store_true", help="print a JSON summary as the last line")
    commitment.set_defaults(handler=_commitment)

    parser.set_defaults(handler=lambda args: _usage(parser))


def _usage(parser: argparse.ArgumentParser) -> int:
    parser.print_help()
    return 2


def _synth(args: argparse.Namespace) -> int:
    from tensafe.cli._paths import output_path
    from tensafe.errors import ConfigurationError
    from tensafe.training.data import records_sha256
    from tensafe.training.synth import synthesize_dataset, write_canaries, write_jsonl

    out: Path = args.out
    canary_out: Path | None = args.canary_out
    if args.canaries and canary_out is None:
        canary_out = out.with_name(out.name.removesuffix(".jsonl") + ".canaries.json")
    if canary_out is not None and not args.canaries:
        raise ConfigurationError("--canary-out needs --canaries K with K >= 1")
    if canary_out is not None and canary_out.resolve() == out.resolve():
        raise ConfigurationError("--canary-out must differ from --out")
    output_path(out, flag="--out")
    if canary_out is not None:
        output_path(canary_out, flag="--canary-out", private=True)

    dataset = synthesize_dataset(
        args.kind,
        args.n,
        seed=args.seed,
        canaries=args.canaries,
        canary_repeats=args.canary_repeats,
        fmt=args.fmt,
    )
    digest = records_sha256(dataset.records)
    if canary_out is not None:
        write_canaries(canary_out, dataset, dataset_commitment=digest)
    write_jsonl(out, dataset.records)
    summary = {
        "out": str(out),
        "records": len(dataset.records),
        "kind": dataset.kind,
        "format": dataset.format,
        "seed": dataset.seed,
        "dataset_sha256": digest,
        "canaries": len(dataset.canaries),
        "canary_out": str(canary_out) if canary_out is not None else None,
    }
    print(
        f"wrote {len(dataset.records)} {dataset.kind} records to {out} (seed {dataset.seed})", file=sys.stderr
    )
    if canary_out is not None:
        print(f"wrote {len(dataset.canaries)} canaries to {canary_out} (keep it private)", file=sys.stderr)
    if args.json:
        print(json.dumps(summary))
    else:
        print(f"dataset sha256 (unkeyed; keep it private): {digest}")
    return 0


def _check(args: argparse.Namespace) -> int:
    from tensafe.training.data import load_jsonl, records_sha256

    records = load_jsonl(args.path)
    summary: dict[str, object] = {
        "path": str(args.path),
        "records": len(records),
        "dataset_sha256": records_sha256(records),
    }
    if args.model is not None:
        from tensafe.training.data import tokenize_examples
        from tensafe.training.models import load_tokenizer

        examples = tokenize_examples(records, load_tokenizer(args.model), max_length=args.max_length)
        lengths = sorted(e.length for e in examples)
        summary.update(
            examples=len(examples),
            dropped=len(records) - len(examples),
            max_length=args.max_length,
            tokens_mean=round(sum(lengths) / len(lengths), 1),
            tokens_max=lengths[-1],
            target_tokens_mean=round(sum(e.num_target_tokens for e in examples) / len(examples), 1),
        )
    if args.json:
        print(json.dumps(summary))
    else:
        for key, value in summary.items():
            print(f"{key}: {value}")
    return 0


def _evidence_commitment(path: Path) -> str:
    """The keyed commitment value recorded in an evidence.json (``tensafe.evidence/v2``)."""
    from tensafe.errors import ConfigurationError
    from tensafe.training.data import COMMITMENT_SCHEME

    try:
        raw = path.read_bytes()[: 1 << 20]
        doc = json.loads(raw.decode("utf-8"))
    except OSError as exc:
        raise ConfigurationError(f"cannot read {path}: {exc.strerror or type(exc).__name__}") from None
    except (UnicodeDecodeError, ValueError):
        raise ConfigurationError(f"{path} is not a JSON evidence file") from None
    entry = doc.get("dataset_commitment") if isinstance(doc, dict) else None
    if not isinstance(entry, dict):
        raise ConfigurationError(
            f"{path} holds no keyed dataset commitment (evidence before tensafe.evidence/v2 recorded a plain "
            "hash, which no key verifies)"
        )
    if entry.get("scheme") != COMMITMENT_SCHEME or not isinstance(entry.get("value"), str):
        raise ConfigurationError(
            f"{path}: unsupported dataset commitment scheme {str(entry.get('scheme'))[:40]!r}; this TenSafe "
            f"verifies {COMMITMENT_SCHEME!r}"
        )
    return str(entry["value"])


def _commitment(args: argparse.Namespace) -> int:
    import re

    from tensafe.errors import ConfigurationError
    from tensafe.training.data import (
        COMMITMENT_SCHEME,
        load_jsonl,
        read_commitment_key,
        records_commitment,
        train_eval_split,
        verify_records_commitment,
    )

    expected: str | None = args.expect
    if expected is not None and not re.fullmatch(r"[0-9a-f]{64}", expected):
        raise ConfigurationError("--expect must be the commitment's 64 lower-case hex digits")
    if args.evidence is not None:
        expected = _evidence_commitment(args.evidence)
    key = read_commitment_key(args.key)
    records = load_jsonl(args.path)
    if args.eval_fraction is not None:
        records, _ = train_eval_split(records, eval_fraction=args.eval_fraction, seed=args.split_seed)
    if expected is None:
        value = records_commitment(records, key=key)
    else:  # raises CommitmentMismatchError (exit 1) when it does not match
        value = verify_records_commitment(records, key=key, expected=expected)
    summary = {
        "path": str(args.path),
        "records": len(records),
        "scheme": COMMITMENT_SCHEME,
        "value": value,
        "verified": expected is not None,
    }
    if args.json:
        print(json.dumps(summary))
    elif expected is not None:
        print(f"dataset commitment matches ({COMMITMENT_SCHEME}, {len(records)} records): {value}")
    else:
        print(f"dataset commitment ({COMMITMENT_SCHEME}, {len(records)} records): {value}")
    return 0
