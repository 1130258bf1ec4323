"""Overhead of the training API: the official tinker SDK against a live server vs in-process calls.

The same supervised DP loop (tiny Llama, LoRA rank 8 on attention and MLP, batch 8,
cross-entropy, AdamW) runs in one process, interleaved (local, API, local, API, local; the
fastest run of each side counts, since the machine may be shared):

* **in-process**: ``LoraTrainingSession.forward_backward`` + ``optim_step`` directly;
* **API**: the official ``tinker==0.38.0`` SDK against ``tensafe server``'s application
  running in its own process, as deployed (uvicorn on a loopback port, SQLite, encrypted
  store, auto-checkpoint after every step, audit records),
  ``forward_backward(...).result()`` + ``optim_step(...).result()``.

It prints the steps/s of each, their ratio (API / in-process; the goal is >= 0.9) and the
latency the API adds per forward_backward + optim_step pair, for two client loops: waiting
for each result before the next request, and Tinker's recommended pattern of submitting
the next forward_backward + optim_step before waiting for the previous pair (same requests,
same order, same results). The last line is JSON.

Where the server's time goes: the server process times its stages (the runtime calls, the
state serialization and its encrypted write, the claim, the ledger charge, the completing
transaction, the wait for a pending commit) over every API run, and the JSON holds their
medians (``server_stage_median_ms``) next to the in-process medians of the same runtime
calls (``inprocess_stage_median_ms``).

Usage: ``python bench/api_overhead.py [--steps 20] [--batch 8] [--no-auto-checkpoint] [--model NAME]
[--postgres | --database-url URL]`` (default: a new SQLite file; ``--postgres`` starts a
private, durable PostgreSQL server with :func:`tensafe.db.testing.start_postgres`).
"""

from __future__ import annotations

import argparse
import contextlib
import dataclasses
import json
import os
import signal
import socket
import subprocess
import sys
import tempfile
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import numpy as np

TINY_MODEL = "bench/tiny-llama"
SENTENCE = [310, 4021, 77, 1500, 9, 2600]


def _tiny_model(directory: Path) -> None:
    import torch
    from transformers import LlamaConfig, LlamaForCausalLM

    from tensafe.training.models import load_tokenizer

    tokenizer = load_tokenizer("HuggingFaceTB/SmolLM2-135M-Instruct")
    config = LlamaConfig(
        vocab_size=len(tokenizer),
        hidden_size=32,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
        intermediate_size=64,
        max_position_embeddings=512,
        tie_word_embeddings=True,
        pad_token_id=tokenizer.pad_token_id,
        bos_token_id=1,
        eos_token_id=2,
    )
    torch.manual_seed(0)
    LlamaForCausalLM(config).to(torch.float32).save_pretrained(str(directory), safe_serialization=True)
    tokenizer.save_pretrained(str(directory))


def _examples(n: int, seed: int) -> list[tuple[list[int], list[int], list[float]]]:
    rng = np.random.default_rng(seed)
    out = []
    for _ in range(n):
        tokens = [int(x) for x in rng.integers(1000, 40000, size=2)] + SENTENCE
        out.append((tokens, [*tokens[1:], SENTENCE[0]], [0.0] + [1.0] * (len(tokens) - 1)))
    return out


def _port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port: int = s.getsockname()[1]
        return port


class _Timers:
    """Durations of named stages (seconds), recorded by wrapping the functions that run them."""

    def __init__(self) -> None:
        self.samples: dict[str, list[float]] = {}

    def wrap(self, owner: Any, attr: str, name: str) -> None:
        original = getattr(owner, attr)
        samples = self.samples.setdefault(name, [])

        def timed(*args: Any, **kwargs: Any) -> Any:
            t0 = time.perf_counter()
            try:
                return original(*args, **kwargs)
            finally:
                samples.append(time.perf_counter() - t0)

        setattr(owner, attr, timed)

    def medians_ms(self) -> dict[str, dict[str, float]]:
        return {
            name: {"median_ms": round(1000 * float(np.median(v)), 1), "count": len(v)}
            for name, v in sorted(self.samples.items())
            if v
        }


def _instrument_server(timers: _Timers) -> None:
    from tensafe.server.jobs import Worker
    from tensafe.server.ops import ComputeOps
    from tensafe.storage import EncryptedArtifactStore
    from tensafe.training.runtime import LoraTrainingSession, state

    for owner, attr, name in (
        (LoraTrainingSession, "stage_forward_backward", "runtime.forward_backward"),
        (LoraTrainingSession, "optim_step", "runtime.optim_step"),
        (LoraTrainingSession, "snapshot", "state.snapshot (no copy)"),
        (state, "encode_snapshot_parts", "state.serialize (header, digest)"),
        (EncryptedArtifactStore, "put", "store.put (every write: copy, encrypt, write, fsync)"),
        (ComputeOps, "_training_session", "ops.session_lookup (2 reads)"),
        (ComputeOps, "_charge", "ops.ledger_charge (1 commit)"),
        (ComputeOps, "forward_backward", "ops.forward_backward (handler)"),
        (ComputeOps, "optim_step", "ops.optim_step (handler)"),
        (Worker, "_claim", "worker.claim (1 commit)"),
        (Worker, "_context", "worker.open_payload"),
        (Worker, "_await_turn", "worker.wait_for_pending_commit"),
        (Worker, "_commit_result", "worker.complete (seal+digest+1 commit+audit)"),
        (Worker, "_execute", "worker.execute (all of a request)"),
    ):
        timers.wrap(owner, attr, name)


def _serve(config_path: str) -> int:
    """Run the server of one benchmark (a child process: the SDK client stays in the parent)."""
    import uvicorn

    from tensafe.db import create_engine_from_url
    from tensafe.keys import KeyManager, LocalKekProvider
    from tensafe.server import CatalogEntry, ModelCatalog, ServerSettings, create_app
    from tensafe.server.privacy import OperatorPrivacy
    from tensafe.storage import EncryptedArtifactStore, LocalFilesystemBackend

    config = json.loads(Path(config_path).read_text())
    timers = _Timers()
    _instrument_server(timers)
    tmp = Path(config["tmp"])
    engine = create_engine_from_url(config["url"])
    keys = KeyManager(engine, LocalKekProvider.open(tmp / "kek.json", passphrase=b"bench passphrase 1234"))
    store = EncryptedArtifactStore(LocalFilesystemBackend(tmp / "artifacts"), keys)
    settings = ServerSettings(
        database_url=config["url"],
        data_dir=tmp,
        catalog=ModelCatalog({TINY_MODEL: CatalogEntry(name=TINY_MODEL, source=config["model_dir"])}),
        poll_interval_seconds=0.05,
        privacy=OperatorPrivacy(**config["privacy"]),
        auto_checkpoint=config["auto_checkpoint"],
    )
    app = create_app(settings, store=store, key_manager=keys)

    class Server(uvicorn.Server):
        @contextlib.contextmanager
        def capture_signals(self) -> Iterator[None]:  # uvicorn re-raises SIGTERM after shutdown
            yield

    server = Server(uvicorn.Config(app, host="127.0.0.1", port=config["port"], log_level="warning"))
    signal.signal(signal.SIGTERM, lambda *_: setattr(server, "should_exit", True))
    server.run()
    Path(config["timers"]).write_text(json.dumps(timers.medians_ms()))
    return 0


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--steps", type=int, default=20)
    parser.add_argument("--batch", type=int, default=8)
    parser.add_argument("--no-auto-checkpoint", action="store_true")
    parser.add_argument(
        "--model",
        default=None,
        metavar="NAME",
        help="a registered model (e.g. HuggingFaceTB/SmolLM2-135M-Instruct) instead of the tiny Llama",
    )
    database = parser.add_mutually_exclusive_group()
    database.add_argument("--postgres", action="store_true", help="a private, durable PostgreSQL server")
    database.add_argument("--database-url", metavar="URL", help="an empty database (default: SQLite)")
    parser.add_argument("--serve", metavar="CONFIG", help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    if args.serve:
        return _serve(args.serve)

    import tinker

    from tensafe.crypto.kdf import Argon2idParams
    from tensafe.db import create_engine_from_url, make_session_factory, upgrade
    from tensafe.keys import LocalKekProvider
    from tensafe.privacy import DpPolicy
    from tensafe.server.privacy import OperatorPrivacy
    from tensafe.server.tenants import create_api_key, create_tenant
    from tensafe.training._heap import settle_heap
    from tensafe.training.runtime import AdamParams, Datum, LoraTrainingSession

    n = 1024
    data = _examples(n, 0)
    operator = OperatorPrivacy(
        target_epsilon=8.0,
        delta=1e-5,
        clip_norm=1.0,
        dataset_size=n,
        expected_batch_size=args.batch,
        max_steps=args.steps,
    )
    rng = np.random.default_rng(1)
    batches = [rng.choice(n, size=args.batch, replace=False) for _ in range(args.steps)]

    with tempfile.TemporaryDirectory(prefix="tensafe-bench-") as tmp_name:
        tmp = Path(tmp_name)
        if args.model is None:
            model_dir = tmp / "model"
            _tiny_model(model_dir)
        else:
            from tensafe.training.models import prepare_model

            model_dir = prepare_model(args.model)

        # -- in-process baseline (run before and after the API loop; the faster one counts) --
        def local_batch(idx: np.ndarray) -> list[Datum]:
            return [
                Datum(data[i][0], {"target_tokens": np.array(data[i][1]), "weights": np.array(data[i][2])})
                for i in idx
            ]

        local_timers = _Timers()
        inprocess_cpu: list[float] = []

        def run_local() -> float:
            session = LoraTrainingSession.create(
                base_model=str(model_dir), rank=8, dp=operator.policy(), seed=0, train_unembed=False
            )
            settle_heap()  # as the server does after loading a model
            assert isinstance(session.policy, DpPolicy)
            session.forward(local_batch(batches[0]), "cross_entropy")  # warm-up
            fb_times = local_timers.samples.setdefault("runtime.forward_backward", [])
            step_times = local_timers.samples.setdefault("runtime.optim_step", [])
            t0, cpu0 = time.perf_counter(), time.process_time()
            for idx in batches:
                t1 = time.perf_counter()
                session.forward_backward(local_batch(idx), "cross_entropy")
                t2 = time.perf_counter()
                session.optim_step(AdamParams(learning_rate=0.05))
                fb_times.append(t2 - t1)
                step_times.append(time.perf_counter() - t2)
            elapsed = time.perf_counter() - t0
            inprocess_cpu.append((time.process_time() - cpu0) / args.steps)
            session.close()
            return elapsed

        local_runs = [run_local()]

        # -- through the API: the server in its own process, as deployed -------------------
        stop_postgres = None
        if args.postgres:
            from tensafe.db.testing import start_postgres

            url, stop_postgres = start_postgres(durable=True, database="tensafe_bench")
        else:
            url = args.database_url or f"sqlite:///{tmp / 'bench.db'}"
        upgrade(url)
        engine = create_engine_from_url(url)
        LocalKekProvider.create(
            tmp / "kek.json", passphrase=b"bench passphrase 1234", params=Argon2idParams.minimum()
        ).close()
        with make_session_factory(engine).begin() as s:
            create_tenant(s, "bench")
            key, _ = create_api_key(s, "bench")
        engine.dispose()
        port = _port()
        config = tmp / "serve.json"
        config.write_text(
            json.dumps(
                {
                    "tmp": str(tmp),
                    "url": url,
                    "model_dir": str(model_dir),
                    "port": port,
                    "auto_checkpoint": not args.no_auto_checkpoint,
                    "privacy": dataclasses.asdict(operator),
                    "timers": str(tmp / "timers.json"),
                }
            )
        )
        server = subprocess.Popen([sys.executable, __file__, "--serve", str(config)])
        deadline = time.monotonic() + 120
        while True:
            try:
                with socket.create_connection(("127.0.0.1", port), timeout=1):
                    break
            except OSError:
                if server.poll() is not None or time.monotonic() > deadline:
                    raise SystemExit("the benchmark server did not start") from None
                time.sleep(0.1)
        service = tinker.ServiceClient(base_url=f"http://127.0.0.1:{port}", api_key=key)
        try:

            def api_batch(idx: np.ndarray) -> list[Any]:
                return [
                    tinker.types.Datum(
                        model_input=tinker.types.ModelInput.from_ints(data[i][0]),
                        loss_fn_inputs={"target_tokens": data[i][1], "weights": data[i][2]},
                    )
                    for i in idx
                ]

            cpu: dict[str, list[float]] = {"client": [], "server": []}

            def server_cpu_s() -> float:
                # utime + stime of the server process (all its threads), in seconds.
                fields = Path(f"/proc/{server.pid}/stat").read_text().rsplit(")", 1)[1].split()
                return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")

            def run_api(*, pipelined: bool) -> float:
                client0, server0 = time.process_time(), server_cpu_s()
                try:
                    return _run_api(pipelined=pipelined)
                finally:
                    if not pipelined:
                        cpu["client"].append((time.process_time() - client0) / args.steps)
                        cpu["server"].append((server_cpu_s() - server0) / args.steps)

            def _run_api(*, pipelined: bool) -> float:
                training = service.create_lora_training_client(
                    base_model=TINY_MODEL, rank=8, seed=0, train_unembed=False
                ).result()
                training.forward(api_batch(batches[0]), "cross_entropy").result()  # warm-up
                t0 = time.perf_counter()
                pending: list[Any] = []
                for idx in batches:
                    fb = training.forward_backward(api_batch(idx), "cross_entropy")
                    if not pipelined:
                        fb.result()
                    step = training.optim_step(tinker.types.AdamParams(learning_rate=0.05))
                    if not pipelined:
                        step.result()
                        continue
                    # Tinker's recommended pattern: submit the next pair before waiting for
                    # the previous one, so the server always has the next request queued.
                    for future in pending:
                        future.result()
                    pending = [fb, step]
                for future in pending:
                    future.result()
                return time.perf_counter() - t0

            # Interleave with the in-process runs; the machine may be shared, so the
            # fastest run of each side counts.
            api_runs = [run_api(pipelined=False)]
            piped_runs = [run_api(pipelined=True)]
            local_runs.append(run_local())
            api_runs.append(run_api(pipelined=False))
            piped_runs.append(run_api(pipelined=True))
            api_s, piped_s = min(api_runs), min(piped_runs)
        finally:
            service.close("success").result()
            server.terminate()
            server.wait(60)
        timers_file = tmp / "timers.json"
        server_stages = json.loads(timers_file.read_text()) if timers_file.exists() else {}

        local_runs.append(run_local())
        if stop_postgres is not None:
            stop_postgres()
    local_s = min(local_runs)
    local_sps, api_sps, piped_sps = args.steps / local_s, args.steps / api_s, args.steps / piped_s
    figures = {
        "benchmark": "api_overhead",
        "steps": args.steps,
        "batch": args.batch,
        "auto_checkpoint": not args.no_auto_checkpoint,
        "model": args.model or "tiny-llama",
        "inprocess_steps_per_s": round(local_sps, 3),
        "api_steps_per_s": round(api_sps, 3),
        "ratio_api_over_inprocess": round(api_sps / local_sps, 3),
        "added_ms_per_fb_optim_pair": round(1000 * (api_s - local_s) / args.steps, 1),
        "api_pipelined_steps_per_s": round(piped_sps, 3),
        "ratio_pipelined_over_inprocess": round(piped_sps / local_sps, 3),
        "added_ms_per_pair_pipelined": round(1000 * (piped_s - local_s) / args.steps, 1),
        "database": "postgresql" if url.startswith("postgresql") else url.split(":", 1)[0],
        "server_stage_median_ms": server_stages,
        "inprocess_stage_median_ms": local_timers.medians_ms(),
        # CPU time per forward_backward + optim_step pair of the waiting loop (both cores count).
        "api_cpu_ms_per_pair": {side: round(1000 * min(values), 1) for side, values in cpu.items() if values},
        "inprocess_cpu_ms_per_pair": round(1000 * min(inprocess_cpu), 1),
        "load_average": [round(x, 2) for x in os.getloadavg()],
    }
    print(f"in-process: {local_sps:.2f} steps/s; API (official SDK): {api_sps:.2f} steps/s")
    print(
        f"ratio {figures['ratio_api_over_inprocess']}; "
        f"added {figures['added_ms_per_fb_optim_pair']} ms per pair"
    )
    print(
        f"API, next pair submitted before waiting: {piped_sps:.2f} steps/s, ratio "
        f"{figures['ratio_pipelined_over_inprocess']}"
    )
    print(json.dumps(figures, sort_keys=True))
    return 0


if __name__ == "__main__":
    sys.exit(main())
