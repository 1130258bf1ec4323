"""Per-step cost of ``PrivacyBudget`` against a naive ε query every step, in one process.

The trainer asks the budget before every step whether one more step stays within the target.
The naive way recomputes ε for the new step count each time; the budget caches the boundary and
asks the accountant about log2(T) times per run. Prints a table, then one JSON line.

Usage: python bench/privacy_budget.py [--steps 2000] [--naive-steps 20]
"""

from __future__ import annotations

import argparse
import json
import logging
import time

from tensafe.privacy import PrivacyBudget, compute_epsilon
from tensafe.privacy.accountants import base


def run(steps: int, naive_steps: int) -> dict[str, dict[str, float]]:
    """Measure each accountant; returns per-accountant figures."""
    out: dict[str, dict[str, float]] = {}
    for acc in ("rdp", "pld", "prv"):
        base._cached_report.cache_clear()
        budget = PrivacyBudget(
            target_epsilon=100.0, delta=1e-5, accountant=acc, noise_multiplier=1.0, sample_rate=0.01
        )
        t = time.perf_counter()
        for _ in range(steps):
            budget.check_step()
            budget.record_step()
        budget_per_step = (time.perf_counter() - t) / steps
        base._cached_report.cache_clear()
        t = time.perf_counter()
        for n in range(steps - naive_steps, steps):
            compute_epsilon(accountant=acc, noise_multiplier=1.0, sample_rate=0.01, steps=n, delta=1e-5)
        naive_per_step = (time.perf_counter() - t) / naive_steps
        out[acc] = {
            "budget_ms_per_step": round(budget_per_step * 1e3, 3),
            "naive_ms_per_step": round(naive_per_step * 1e3, 1),
            "speedup": round(naive_per_step / budget_per_step, 1),
        }
        print(
            f"{acc:5s} budget {out[acc]['budget_ms_per_step']:8.3f} ms/step  "
            f"naive {out[acc]['naive_ms_per_step']:8.1f} ms/step  x{out[acc]['speedup']}",
            flush=True,
        )
    return out


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--steps", type=int, default=2000)
    parser.add_argument("--naive-steps", type=int, default=20)
    args = parser.parse_args()
    logging.getLogger("absl").setLevel(logging.ERROR)
    print(json.dumps(run(args.steps, args.naive_steps), sort_keys=True))


if __name__ == "__main__":
    main()
