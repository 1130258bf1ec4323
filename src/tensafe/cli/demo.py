"""``tensafe demo``: the main job, a DP fine-tune of the bundled model on synthetic records.

It synthesises a clinical-notes dataset (Faker, nothing downloaded), writes a training
configuration next to it, runs ``tensafe train`` on SmolLM2-135M-Instruct at ε ≤ 8,
δ = 1e-5, and prints the held-out loss before and after and a sample generation. It exits
non-zero when the adapter does not lower the held-out loss.

The DP certificate is signed with the deployment signing key on the embedded defaults
(SQLite ./tensafe.db, a development KEK under TS_DATA_DIR, both created on first use). The
public key is written to OUT/deployment.pub and the command that verifies the certificate
with it is printed.
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path
from typing import Any

__all__ = ["register"]

DEMO_MODEL = "HuggingFaceTB/SmolLM2-135M-Instruct"
SYSTEM_PROMPT = "You summarize clinical notes."


def register(subparsers: argparse._SubParsersAction[Any]) -> None:
    """Add the ``demo`` command."""
    p = subparsers.add_parser(
        "demo",
        help="run the main job: DP fine-tune of the bundled SmolLM2-135M on synthetic records",
        description=__doc__,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    p.add_argument("--out", default="runs/demo", help="run directory (default: runs/demo)")
    p.add_argument("--model", default=DEMO_MODEL, help=f"base model (default: {DEMO_MODEL})")
    p.add_argument("--records", type=int, default=800, help="synthetic training records (default: 800)")
    p.add_argument("--eval-records", type=int, default=24, help="held-out records (default: 24)")
    p.add_argument("--steps", type=int, default=16, help="DP-SGD steps (default: 16)")
    p.add_argument("--batch-size", type=int, default=32, help="expected logical batch size (default: 32)")
    p.add_argument("--epsilon", type=float, default=8.0, help="target ε (default: 8)")
    p.add_argument("--delta", type=float, default=1e-5, help="δ (default: 1e-5)")
    p.add_argument("--seed", type=int, default=7, help="data seed (default: 7)")
    p.add_argument("--lr", type=float, default=0.02, help="AdamW learning rate (default: 0.02)")
    p.add_argument("--rank", type=int, default=1, help="LoRA rank (default: 1)")
    p.add_argument("--clip-norm", type=float, default=0.5, help="per-example clip norm C (default: 0.5)")
    p.add_argument(
        "--top-layers", type=int, default=10, help="adapt only the top N transformer blocks (default: 10)"
    )
    p.add_argument("--no-progress", action="store_true", help="no progress bar")
    p.set_defaults(handler=_run)


def demo_config(args: argparse.Namespace, data_dir: Path) -> dict[str, Any]:
    """The training configuration the demo runs (also written to ``OUT/config.yaml``)."""
    return {
        "model": args.model,
        "output_dir": "run",
        "data": {
            "train": str(data_dir / "train.jsonl"),
            "eval": str(data_dir / "eval.jsonl"),
            "max_length": 160,
        },
        # Low-rank attention LoRA on the top blocks keeps the noise dimension small (DP noise is
        # added to every trainable coordinate) and ends back-propagation early (CPU time).
        "lora": {
            "rank": args.rank,
            "alpha": 16,
            "dropout": 0.0,
            "target_modules": ["q_proj", "v_proj"],
            "layers": list(range(max(0, _num_layers(args.model) - args.top_layers), _num_layers(args.model))),
        },
        "optimizer": {"learning_rate": args.lr},
        "training": {
            "steps": args.steps,
            "batch_size": args.batch_size,
            "micro_batch_size": 12,
            "checkpoint_every": 5,
            "log_every": 2,
            "seed": args.seed,
        },
        "privacy": {
            "enabled": True,
            "target_epsilon": args.epsilon,
            "delta": args.delta,
            "clip_norm": args.clip_norm,
            "accountant": "rdp",
        },
    }


def _num_layers(model: str) -> int:
    from tensafe.training.models import prepare_model

    config = json.loads((prepare_model(model) / "config.json").read_text(encoding="utf-8"))
    return int(config["num_hidden_layers"])


def _run(args: argparse.Namespace) -> int:
    import yaml

    from tensafe._fsutil import atomic_write_bytes
    from tensafe.cli._certificate_signing import deployment_certificate_signer
    from tensafe.cli.train import report
    from tensafe.errors import TenSafeError
    from tensafe.training.config import load_config
    from tensafe.training.dp.rng import deterministic_requested
    from tensafe.training.synth import synthesize_dataset, write_jsonl
    from tensafe.training.trainer import train

    out = Path(args.out).resolve()
    deterministic = deterministic_requested()  # a malformed TS_DETERMINISTIC fails here
    signer = deployment_certificate_signer(actor="cli:demo")  # before any work: fail closed
    data_dir = out / "data"
    data_dir.mkdir(parents=True, exist_ok=True)
    public_key = out / "deployment.pub"
    atomic_write_bytes(public_key, signer.verifying_key().public_bytes(), mode=0o644)
    if not (data_dir / "train.jsonl").exists():
        ds = synthesize_dataset("clinical", args.records + args.eval_records, seed=args.seed)
        # A short system turn replaces the template's default one: fewer tokens per example.
        records = [
            {
                "messages": [
                    {"role": "system", "content": SYSTEM_PROMPT},
                    {"role": "user", "content": r["prompt"]},
                    {"role": "assistant", "content": r["completion"]},
                ]
            }
            for r in ds.records
        ]
        write_jsonl(data_dir / "train.jsonl", records[: args.records])
        write_jsonl(data_dir / "eval.jsonl", records[args.records :])
        print(
            f"Synthesised {args.records} training and {args.eval_records} held-out clinical notes "
            f"in {data_dir}"
        )
    cfg_path = out / "config.yaml"
    cfg_path.write_text(yaml.safe_dump(demo_config(args, data_dir), sort_keys=False), encoding="utf-8")
    cfg = load_config(cfg_path)
    held_out = json.loads((data_dir / "eval.jsonl").read_text(encoding="utf-8").splitlines()[0])["messages"]
    if deterministic:
        print(
            f"Training {args.model} with DP-SGD on DETERMINISTIC noise (TS_DETERMINISTIC=1): this run is "
            f"NOT differentially private and has no ε -> {cfg.output_dir}"
        )
    else:
        print(
            f"Training {args.model} with DP-SGD (target ε={args.epsilon}, δ={args.delta}) -> {cfg.output_dir}"
        )
    result = train(cfg, signer=signer, show_progress=not args.no_progress, sample_prompt=held_out[:2])
    report(result, public_key=public_key)
    print(f"Held-out prompt: {held_out[1]['content']}")
    print(f"Reference completion: {held_out[2]['content']}")
    before, after = result.eval_loss_before, result.eval_loss_after
    if before is None or after is None or not after < before:
        raise TenSafeError(f"the adapter did not lower the held-out loss ({before} -> {after})")
    return 0
