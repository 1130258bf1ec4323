"""``tensafe train CONFIG.yaml``: DP-SGD LoRA fine-tuning from a configuration file.

The run's DP certificate is signed with the deployment signing key
(:mod:`tensafe.cli._certificate_signing`); when that key cannot be opened the command stops
before training, unless ``--unsigned`` asks for an unsigned certificate (loud warning, and
the report and ``summary.json`` say so).
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path
from typing import Any

__all__ = ["register", "report"]


def register(subparsers: argparse._SubParsersAction[Any]) -> None:
    """Add the ``train`` command."""
    p = subparsers.add_parser(
        "train",
        help="fine-tune a LoRA adapter with DP-SGD from a YAML configuration",
        description=(
            "Fine-tune a LoRA adapter with DP-SGD. Writes a PEFT adapter, dp_certificate.json "
            "(signed with the deployment signing key), evidence.json, dataset_commitment.key, "
            "metrics.jsonl, summary.json and training.png into the configured output_dir. "
            "Re-running the same command resumes from the last checkpoint."
        ),
    )
    p.add_argument("config", help="YAML configuration (see docs/training.md)")
    p.add_argument("--no-resume", action="store_true", help="refuse to continue an existing run")
    p.add_argument("--no-progress", action="store_true", help="no progress bar")
    p.add_argument("--sample-prompt", help="generate a greedy completion of this prompt at the end")
    p.add_argument("--json", action="store_true", help="print the run summary as JSON on the last line")
    p.add_argument(
        "--unsigned",
        action="store_true",
        help="write an UNSIGNED DP certificate instead of failing when the deployment signing key "
        "cannot be opened (nobody can then verify who issued it)",
    )
    p.set_defaults(handler=_run)


def report(result: Any, *, public_key: Path | None = None) -> None:
    """Print the human summary of a finished run.

    Args:
        result: The :class:`~tensafe.training.trainer.TrainResult`.
        public_key: Where the deployment public key was written, for the verification command.
    """
    cert = result.certificate
    before, after = result.eval_loss_before, result.eval_loss_after
    if before is not None and after is not None:
        print(f"Held-out loss: before {before:.4f} -> after {after:.4f} ({after - before:+.4f})")
    print(
        f"Steps: {result.steps}" + (f" (resumed from {result.resumed_from})" if result.resumed_from else "")
    )
    if not cert.private:
        why = (
            "DP-SGD was disabled"
            if not cert.dp_enabled
            else "the noise was deterministic (TS_DETERMINISTIC=1)"
        )
        print(f"WARNING: this run is NOT differentially private ({why}); it has no ε.")
    print(f"Privacy: {cert.statement}")
    certificate_path = result.output_dir / "dp_certificate.json"
    if result.signed_by is None:
        print(f"Certificate: {certificate_path} is UNSIGNED (--unsigned): nobody can verify who issued it.")
    else:
        pub = str(public_key) if public_key is not None else "deployment.pub"
        print(f"Certificate: {certificate_path}, signed by the deployment key {result.signed_by}.")
        if public_key is None:
            print("  Export the public key once: tensafe keys export-public-key --out deployment.pub")
        print(f"  Verify: tensafe privacy certificate {certificate_path} --verify --public-key {pub}")
    print(
        f"Evidence: {result.evidence_path}; its dataset commitment key is {result.commitment_key_path} "
        "(keep it with the data; never ship it)"
    )
    print(f"Adapter: {result.adapter_dir}")
    print(f"Metrics: {result.metrics_path}" + (f"; plot: {result.plot_path}" if result.plot_path else ""))
    if result.sample is not None:
        print(f"Sample generation: {result.sample}")


def _run(args: argparse.Namespace) -> int:
    from tensafe.training.config import load_config
    from tensafe.training.trainer import train

    cfg = load_config(args.config)
    signer = None
    if args.unsigned:
        print(
            "WARNING: --unsigned: the DP certificate of this run will NOT be signed; nobody can verify "
            "who issued it, and 'tensafe privacy certificate --verify' rejects it.",
            file=sys.stderr,
            flush=True,
        )
    else:
        from tensafe.cli._certificate_signing import deployment_certificate_signer

        signer = deployment_certificate_signer(actor="cli:train", unsigned_flag="--unsigned")
    result = train(
        cfg,
        signer=signer,
        resume=not args.no_resume,
        show_progress=not args.no_progress,
        sample_prompt=args.sample_prompt,
    )
    report(result)
    if cfg.package is not None:
        from tensafe.cli._packaging import package_run

        path = package_run(result.adapter_dir, cfg.package, base=cfg.source.parent if cfg.source else None)
        print(f"Package: {path}")
    if args.json:
        print(json.dumps(json.loads(result.summary_path.read_text(encoding="utf-8")), sort_keys=True))
    return 0
