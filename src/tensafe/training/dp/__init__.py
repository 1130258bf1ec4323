"""DP-SGD for LoRA fine-tuning: per-example clipping, Gaussian noise, Poisson sampling.

A training step looks like this::

    engine, sampler = DPConfig(noise_multiplier=1.0, clip_norm=1.0, sample_rate=0.01,
                               dataset_size=len(ds)).build(model)
    for step in range(engine.step, total_steps):
        for micro in split_microbatches(sampler.sample(step), max_size=16):
            engine.accumulate(per_example_loss(model, ds, micro))  # shape (B,)
        engine.finalize_step()        # noise once, / (q * N), writes .grad
        optimizer.step()

See ``docs/dp-sgd.md`` for the exact algorithm and its security notes.
"""

from __future__ import annotations

from tensafe.training.dp.build import build_dp_sgd
from tensafe.training.dp.config import DPConfig
from tensafe.training.dp.engine import CLIP_EPSILON, DPGradientEngine, MicroBatchStats, StepStats
from tensafe.training.dp.errors import DPConfigError, DPError, UnsupportedParameterError
from tensafe.training.dp.rng import (
    DETERMINISTIC_ENV,
    RandomSource,
    deterministic_random_source,
    deterministic_requested,
    random_source_from_env,
    secure_random_source,
)
from tensafe.training.dp.sampler import PoissonSampler, split_microbatches

__all__ = [
    "CLIP_EPSILON",
    "DETERMINISTIC_ENV",
    "DPConfig",
    "DPConfigError",
    "DPError",
    "DPGradientEngine",
    "MicroBatchStats",
    "PoissonSampler",
    "RandomSource",
    "StepStats",
    "UnsupportedParameterError",
    "build_dp_sgd",
    "deterministic_random_source",
    "deterministic_requested",
    "random_source_from_env",
    "secure_random_source",
    "split_microbatches",
]
