"""``tensafe data``: synthesise and check fine-tuning datasets."""

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
        help="validate a JSONL dataset and print its commitment",
        description="Validate a JSONL dataset; with --model also tokenise it with the "
        "model's chat template and report token statistics.",
    )
    check.add_argument("path", type=Path, help="JSONL dataset")
    check.add_argument("--model", default=None, help="tokenise with this model's tokenizer")
    check.add_argument("--max-length", type=_positive, default=512, help="truncation length (default 512)")
    check.add_argument("--json", action="store_true", help="print a JSON summary as the last line")
    check.set_defaults(handler=_check)

    parser.set_defaults(handler=lambda args: _usage(parser))


def _usage(parser: argparse.ArgumentParser) -> int:
    parser.print_help()
    return 2


def _synth(args: argparse.Namespace) -> int:
    from tensafe.errors import ConfigurationError
    from tensafe.training.data import records_commitment
    from tensafe.training.synth import synthesize_dataset, write_canaries, write_jsonl

    out: Path = args.out
    canary_out: Path | None = args.canary_out
    if args.canaries and canary_out is None:
        canary_out = out.with_name(out.name.removesuffix(".jsonl") + ".canaries.json")
    if canary_out is not None and not args.canaries:
        raise ConfigurationError("--canary-out needs --canaries K with K >= 1")
    for target in (out, canary_out):
        if target is not None and not target.parent.is_dir():
            raise ConfigurationError(f"directory {target.parent} does not exist")
    if canary_out is not None and canary_out.resolve() == out.resolve():
        raise ConfigurationError("--canary-out must differ from --out")

    dataset = synthesize_dataset(
        args.kind,
        args.n,
        seed=args.seed,
        canaries=args.canaries,
        canary_repeats=args.canary_repeats,
        fmt=args.fmt,
    )
    commitment = records_commitment(dataset.records)
    if canary_out is not None:
        write_canaries(canary_out, dataset, dataset_commitment=commitment)
    write_jsonl(out, dataset.records)
    summary = {
        "out": str(out),
        "records": len(dataset.records),
        "kind": dataset.kind,
        "format": dataset.format,
        "seed": dataset.seed,
        "dataset_commitment": commitment,
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
        print(f"dataset commitment (sha256): {commitment}")
    return 0


def _check(args: argparse.Namespace) -> int:
    from tensafe.training.data import load_jsonl, records_commitment

    records = load_jsonl(args.path)
    summary: dict[str, object] = {
        "path": str(args.path),
        "records": len(records),
        "dataset_commitment": records_commitment(records),
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
