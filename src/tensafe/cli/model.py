"""``tensafe model``: list, prepare and inspect base models (never downloads)."""

from __future__ import annotations

import argparse
import json
import sys
from typing import Any

__all__ = ["register"]

_DEFAULT_MODEL = "HuggingFaceTB/SmolLM2-135M-Instruct"


def register(subparsers: argparse._SubParsersAction[argparse.ArgumentParser]) -> None:
    """Add the ``model`` command group."""
    parser = subparsers.add_parser(
        "model",
        help="list, prepare and inspect base models",
        description="Base models known to TenSafe. Nothing is ever downloaded: registered models are "
        "converted from files installed with pip, other models must be local directories.",
    )
    sub = parser.add_subparsers(dest="model_command", metavar="ACTION")

    p_list = sub.add_parser("list", help="list registered models and whether they are prepared")
    p_list.add_argument("--json", action="store_true", help="print one JSON object")
    p_list.set_defaults(handler=_list)

    p_prep = sub.add_parser("prepare", help="convert a registered model into the local cache (once)")
    p_prep.add_argument(
        "name", nargs="?", default=_DEFAULT_MODEL, help=f"model name (default {_DEFAULT_MODEL})"
    )
    p_prep.set_defaults(handler=_prepare)

    p_info = sub.add_parser("info", help="print a model's id, local path and weight hash")
    p_info.add_argument("name", help="registered name/alias or local model directory")
    p_info.add_argument("--json", action="store_true", help="print one JSON object")
    p_info.set_defaults(handler=_info)

    parser.set_defaults(handler=lambda args: _usage(parser))


def _usage(parser: argparse.ArgumentParser) -> int:
    parser.print_help()
    return 2


def _progress(message: str) -> None:
    print(f"tensafe: {message}", file=sys.stderr, flush=True)


def _list(args: argparse.Namespace) -> int:
    from tensafe.training.models import list_models, model_cache_root

    rows: list[dict[str, Any]] = [
        {
            "id": m.id,
            "aliases": list(m.aliases),
            "prepared": m.is_prepared(),
            "path": str(m.cache_path()),
            "description": m.description,
        }
        for m in list_models()
    ]
    if args.json:
        print(json.dumps({"cache": str(model_cache_root()), "models": rows}))
        return 0
    print(f"model cache: {model_cache_root()}")
    for row in rows:
        state = "prepared" if row["prepared"] else "not prepared (run `tensafe model prepare`)"
        print(f"{row['id']}  [{state}]")
        print(f"    aliases: {', '.join(row['aliases'])}")
        print(f"    {row['description']}")
    print("Any local Hugging Face model directory (config.json + *.safetensors) is accepted by path.")
    return 0


def _prepare(args: argparse.Namespace) -> int:
    from tensafe.training.models import prepare_model

    path = prepare_model(args.name, progress=_progress)
    print(path)
    return 0


def _info(args: argparse.Namespace) -> int:
    from tensafe.training.models import resolve_model

    spec = resolve_model(args.name, progress=_progress)
    if args.json:
        print(
            json.dumps(
                {"id": spec.id, "path": str(spec.path), "revision": spec.revision, "source": spec.source}
            )
        )
        return 0
    print(f"id:       {spec.id}")
    print(f"path:     {spec.path}")
    print(f"sha256:   {spec.revision}")
    print(f"source:   {spec.source}")
    return 0
