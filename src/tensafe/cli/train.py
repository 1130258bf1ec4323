"""``tensafe train CONFIG.yaml``: DP-SGD LoRA fine-tuning from a configuration file."""

from __future__ import annotations

import argparse
import json
from typing import Any

__all__ = ["register", "report"]


def register(subparsers: argparse._SubParsersAction[Any]) -> None:
    """Add the ``train`` command."""
    p = subparsers.add_parser(
        "train",
        help="fine-tune a LoRA adapter with DP-SGD from a YAML configuration",
        description=(
            "Fine-tune a LoRA adapter with DP-SGD. Writes a PEFT adapter, dp_certificate.json, "
            "metrics.jsonl, summary.json and training.png into the configured output_dir. "
            "Re-running the same command resumes from the last checkpoint."
        ),
    )
    p.add_argument("config", help="YAML configuration (see docs/training.md)")
    p.add_argument("--no-resume", action="store_true", help="refuse to continue an existing run")
    p.add_argument("--no-progress", action="store_true", help="no progress bar")
    p.add_argument("--sample-prompt", help="generate a greedy completion of this prompt at the end")
    p.add_argument("--json", action="store_true", help="print the run summary as JSON on the last line")
    p.set_defaults(handler=_run)


def report(result: Any) -> None:
    """Print the human summary of a finished run."""
    before, after = result.eval_loss_before, result.eval_loss_after
    if before is not None and after is not None:
        print(f"Held-out loss: before {before:.4f} -> after {after:.4f} ({after - before:+.4f})")
    print(
        f"Steps: {result.steps}" + (f" (resumed from {result.resumed_from})" if result.resumed_from else "")
    )
    print(f"Privacy: {result.certificate.statement}")
    print(f"Adapter: {result.adapter_dir}")
    print(f"Metrics: {result.metrics_path}" + (f"; plot: {result.plot_path}" if result.plot_path else ""))
    if result.sample is not None:
        print(f"Sample generation: {result.sample}")


def _run(args: argparse.Namespace) -> int:
    from tensafe.training.config import load_config
    from tensafe.training.trainer import train

    cfg = load_config(args.config)
    result = train(
        cfg, resume=not args.no_resume, show_progress=not args.no_progress, sample_prompt=args.sample_prompt
    )
    report(result)
    if cfg.package is not None:
        from tensafe.cli._packaging import package_run

        path = package_run(result.adapter_dir, cfg.package, base=cfg.source.parent if cfg.source else None)
        print(f"Package: {path}")
    if args.json:
        print(json.dumps(json.loads(result.summary_path.read_text(encoding="utf-8")), sort_keys=True))
    return 0
