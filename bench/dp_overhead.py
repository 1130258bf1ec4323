"""DP-SGD overhead on the real SmolLM2-135M-Instruct with LoRA (CPU).

Compares, on one fixed batch (16 sequences of 128 tokens, LoRA r=8 on the attention and
MLP projections, ``torch.set_num_threads(2)``):

* ``nonprivate``: plain LoRA training (mean loss, one backward, SGD step);
* ``tensafe``: :class:`tensafe.training.dp.DPGradientEngine` (per-example clipping over
  all LoRA matrices, noise from the OS CSPRNG, normalisation by the expected batch size);
* ``opacus_hooks`` and ``opacus_ghost``: Opacus 1.6 ``make_private`` with
  ``grad_sample_mode="hooks"`` and ``"ghost"`` (fast gradient clipping, two backward
  passes). The faster one is reported as Opacus' best mode.

Step time: every mode has its own model copy in this one process, and the modes take
their steps in interleaved rounds (so a change of machine load hits all of them alike);
warm-up rounds are excluded and the median of the timed rounds is reported, as wall-clock
time (the headline ratios) and as process CPU time (``*_cpu_time``, steadier on a shared
machine).

Peak memory: the RSS high-water mark (``VmHWM``) of one child process per mode (the same
script with ``--child MODE``), which loads the model once and takes warm-up + one step; a
process's high-water mark cannot be reset, so each mode needs its own process. The
children run first, before this process loads anything.

The last line printed is one JSON object with ``dp_over_nonprivate_time``,
``dp_over_nonprivate_memory``, ``tensafe_over_opacus_time`` and the raw figures.

Run: ``python bench/dp_overhead.py`` (about 35 minutes on 2 busy cores; the first run
also converts the bundled GGUF model, about a minute).
"""

from __future__ import annotations

import argparse
import copy
import json
import os
import statistics
import subprocess
import sys
import time
import warnings
from collections.abc import Callable
from typing import Any

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

import torch
from torch import nn

MODEL = "HuggingFaceTB/SmolLM2-135M-Instruct"
BATCH, SEQ, PROMPT = 16, 128, 16
RANK, ALPHA = 8, 16
TARGETS = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]
SIGMA, CLIP, LR = 1.0, 1.0, 1e-3
ALL_MODES = ["nonprivate", "tensafe", "opacus_hooks", "opacus_ghost"]

Step = Callable[[], None]


def _batch(vocab: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(0)
    ids = torch.randint(0, vocab, (BATCH, SEQ), generator=g)
    mask = torch.ones_like(ids)
    labels = ids.clone()
    labels[:, :PROMPT] = -100
    return ids, mask, labels


def _per_example_loss(logits: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
    """Sum over each sequence's completion tokens of the next-token cross entropy, (B,)."""
    shift_logits = logits[:, :-1, :]
    shift_labels = labels[:, 1:]
    tok = nn.functional.cross_entropy(
        shift_logits.reshape(-1, shift_logits.shape[-1]),
        shift_labels.reshape(-1),
        reduction="none",
        ignore_index=-100,
    )
    return tok.view(shift_labels.shape).sum(dim=1)


def _lora(base: nn.Module) -> nn.Module:
    from peft import LoraConfig, get_peft_model

    torch.manual_seed(0)
    model = get_peft_model(
        copy.deepcopy(base), LoraConfig(r=RANK, lora_alpha=ALPHA, lora_dropout=0.0, target_modules=TARGETS)
    )
    model.train()
    return model


def _setup(mode: str, base: nn.Module, batch: tuple[torch.Tensor, ...]) -> Step:
    ids, mask, labels = batch
    model = _lora(base)
    params = [p for p in model.parameters() if p.requires_grad]
    optimizer = torch.optim.SGD(params, lr=LR)

    if mode == "nonprivate":

        def step() -> None:
            loss = _per_example_loss(model(input_ids=ids, attention_mask=mask).logits, labels).mean()
            loss.backward()
            optimizer.step()
            optimizer.zero_grad(set_to_none=True)

        return step

    if mode == "tensafe":
        from tensafe.training.dp import DPGradientEngine

        engine = DPGradientEngine(
            model, clip_norm=CLIP, noise_multiplier=SIGMA, expected_batch_size=float(BATCH)
        )

        def step() -> None:
            engine.accumulate(_per_example_loss(model(input_ids=ids, attention_mask=mask).logits, labels))
            engine.finalize_step()
            optimizer.step()
            optimizer.zero_grad(set_to_none=True)

        return step

    from opacus import PrivacyEngine
    from torch.utils.data import DataLoader, TensorDataset

    loader = DataLoader(TensorDataset(ids, mask, labels), batch_size=BATCH)
    privacy = PrivacyEngine(accountant="rdp")
    if mode == "opacus_hooks":
        dp_model, dp_opt, _ = privacy.make_private(
            module=model,
            optimizer=optimizer,
            data_loader=loader,
            noise_multiplier=SIGMA,
            max_grad_norm=CLIP,
            poisson_sampling=False,
            loss_reduction="sum",
            grad_sample_mode="hooks",
        )

        def step() -> None:
            loss = _per_example_loss(dp_model(input_ids=ids, attention_mask=mask).logits, labels).sum()
            loss.backward()
            dp_opt.step()
            dp_opt.zero_grad(set_to_none=True)

        return step

    if mode == "opacus_ghost":
        criterion = nn.CrossEntropyLoss(reduction="sum", ignore_index=-100)
        dp_model, dp_opt, dp_criterion, _ = privacy.make_private(
            module=model,
            optimizer=optimizer,
            data_loader=loader,
            criterion=criterion,
            noise_multiplier=SIGMA,
            max_grad_norm=CLIP,
            poisson_sampling=False,
            loss_reduction="sum",
            grad_sample_mode="ghost",
        )

        def step() -> None:
            logits = dp_model(input_ids=ids, attention_mask=mask).logits[:, :-1, :]
            shape = logits.shape
            loss = dp_criterion(logits.reshape(-1, shape[-1]), labels[:, 1:].reshape(-1), shape=shape)
            loss.backward()
            dp_opt.step()
            dp_opt.zero_grad(set_to_none=True)

        return step

    raise SystemExit(f"unknown mode {mode!r}")


def _load() -> tuple[nn.Module, tuple[torch.Tensor, ...]]:
    from tensafe.training.models import load_model_and_tokenizer

    model, tokenizer = load_model_and_tokenizer(MODEL)
    for p in model.parameters():
        p.requires_grad_(False)
    return model, _batch(len(tokenizer))


def _child(mode: str, warmup: int) -> None:
    base, batch = _load()
    step = _setup(mode, base, batch)
    del base
    times = []
    for _ in range(warmup + 1):
        t0 = time.perf_counter()
        step()
        times.append(time.perf_counter() - t0)
    print(json.dumps({"mode": mode, "peak_rss_mb": _vm_hwm_mib(), "step_s": times[-1]}))


def _vm_hwm_mib() -> float:
    """This process's RSS high-water mark (``VmHWM``), in MiB.

    ``getrusage().ru_maxrss`` is useless here: Linux carries it over from the parent across
    fork and exec, so every child would report at least the parent's peak. ``VmHWM`` belongs
    to the address space, which exec replaces.
    """
    with open("/proc/self/status", encoding="ascii") as status:
        for line in status:
            if line.startswith("VmHWM:"):
                return int(line.split()[1]) / 1024
    raise SystemExit("no VmHWM in /proc/self/status (Linux only)")


def _peak_memory(mode: str, warmup: int) -> dict[str, Any]:
    out = subprocess.run(
        [
            sys.executable,
            __file__,
            "--child",
            mode,
            "--warmup",
            str(warmup),
            "--threads",
            str(torch.get_num_threads()),
        ],
        check=True,
        capture_output=True,
        text=True,
    )
    result: dict[str, Any] = json.loads(out.stdout.strip().splitlines()[-1])
    return result


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--steps", type=int, default=3, help="timed rounds (default 3)")
    parser.add_argument("--warmup", type=int, default=1, help="warm-up rounds (default 1)")
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--modes", default=",".join(ALL_MODES))
    parser.add_argument("--no-memory", action="store_true", help="skip the per-mode child processes")
    parser.add_argument("--no-timing", action="store_true", help="only measure peak memory")
    parser.add_argument("--child", help=argparse.SUPPRESS)
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    warnings.filterwarnings("ignore")
    if args.child:
        _child(args.child, args.warmup)
        return

    modes = args.modes.split(",")
    memory: dict[str, float] = {}
    if not args.no_memory:
        for mode in modes:
            memory[mode] = float(_peak_memory(mode, args.warmup)["peak_rss_mb"])
            print(f"  peak RSS {mode:13s} {memory[mode]:8.0f} MiB", flush=True)
    median: dict[str, float] = {}
    median_cpu: dict[str, float] = {}
    times: dict[str, list[float]] = {}
    if not args.no_timing:
        median, median_cpu, times = _timing(modes, args.warmup, args.steps)
    _report(args, modes, memory, median, median_cpu, times)


def _timing(
    modes: list[str], warmup: int, rounds: int
) -> tuple[dict[str, float], dict[str, float], dict[str, list[float]]]:
    t0 = time.perf_counter()
    base, batch = _load()
    print(
        f"model loaded in {time.perf_counter() - t0:.1f} s; batch {BATCH} x {SEQ}, LoRA r={RANK}", flush=True
    )
    steps = {mode: _setup(mode, base, batch) for mode in modes}
    times: dict[str, list[float]] = {mode: [] for mode in modes}
    cpu: dict[str, list[float]] = {mode: [] for mode in modes}
    for rnd in range(warmup + rounds):
        for mode in modes:
            t, c = time.perf_counter(), time.process_time()
            steps[mode]()
            elapsed, cpu_s = time.perf_counter() - t, time.process_time() - c
            if rnd >= warmup:
                times[mode].append(elapsed)
                cpu[mode].append(cpu_s)
            kind = "warm-up" if rnd < warmup else "timed"
            print(f"  round {rnd} ({kind}) {mode:13s} wall {elapsed:7.2f} s  cpu {cpu_s:7.2f} s", flush=True)
    median = {mode: statistics.median(v) for mode, v in times.items()}
    median_cpu = {mode: statistics.median(v) for mode, v in cpu.items()}
    return median, median_cpu, times


def _report(
    args: argparse.Namespace,
    modes: list[str],
    memory: dict[str, float],
    median: dict[str, float],
    median_cpu: dict[str, float],
    times: dict[str, list[float]],
) -> None:
    opacus_modes = [m for m in ("opacus_hooks", "opacus_ghost") if m in median]
    best_opacus = min(opacus_modes, key=lambda m: median[m]) if opacus_modes else None
    if best_opacus is None:  # memory-only run: the fastest Opacus mode measured before was hooks
        best_opacus = next((m for m in ("opacus_hooks", "opacus_ghost") if m in memory), None)

    print()
    print(f"{'mode':14s} {'median wall s':>14s} {'median CPU s':>13s} {'peak RSS MiB':>13s}")
    for mode in modes:
        mem = f"{memory[mode]:13.0f}" if mode in memory else f"{'-':>13s}"
        wall = f"{median[mode]:14.2f}" if mode in median else f"{'-':>14s}"
        cpu = f"{median_cpu[mode]:13.2f}" if mode in median_cpu else f"{'-':>13s}"
        print(f"{mode:14s} {wall} {cpu} {mem}")

    figures: dict[str, Any] = {
        "model": MODEL,
        "batch": BATCH,
        "seq": SEQ,
        "lora_rank": RANK,
        "threads": args.threads,
        "timed_steps": args.steps,
        "median_step_s": median,
        "median_step_cpu_s": median_cpu,
        "all_step_s": times,
        "peak_rss_mb": memory,
        "opacus_best_mode": best_opacus,
    }
    if "tensafe" in median and "nonprivate" in median:
        figures["dp_over_nonprivate_time"] = median["tensafe"] / median["nonprivate"]
        figures["dp_over_nonprivate_cpu_time"] = median_cpu["tensafe"] / median_cpu["nonprivate"]
    if "tensafe" in memory and "nonprivate" in memory:
        figures["dp_over_nonprivate_memory"] = memory["tensafe"] / memory["nonprivate"]
    if best_opacus and "tensafe" in median:
        figures["tensafe_over_opacus_time"] = median["tensafe"] / median[best_opacus]
        figures["tensafe_over_opacus_cpu_time"] = median_cpu["tensafe"] / median_cpu[best_opacus]
    if best_opacus and best_opacus in memory and "tensafe" in memory:
        figures["tensafe_over_opacus_memory"] = memory["tensafe"] / memory[best_opacus]
    print(json.dumps(figures))


if __name__ == "__main__":
    main()
