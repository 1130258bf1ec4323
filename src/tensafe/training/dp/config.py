"""The DP-SGD settings of one training run."""

from __future__ import annotations

import dataclasses
import math

from torch import nn

from tensafe.training.dp.engine import DPGradientEngine
from tensafe.training.dp.errors import DPConfigError
from tensafe.training.dp.rng import RandomSource, random_source_from_env
from tensafe.training.dp.sampler import PoissonSampler

__all__ = ["DPConfig"]


@dataclasses.dataclass(frozen=True, kw_only=True)
class DPConfig:
    """Privacy parameters of a DP-SGD run (all keyword-only).

    Attributes:
        noise_multiplier: ``sigma``; the noise added to each logical batch's sum of
            clipped gradients has standard deviation ``sigma * clip_norm``.
        clip_norm: ``C``, the per-example L2 clip norm over all trainable parameters.
        sample_rate: ``q``, the Poisson inclusion probability of each example per step.
        dataset_size: ``N``, the number of examples (privacy units).
        max_microbatch_size: The largest physical micro-batch (memory bound only; it has
            no effect on privacy).
        secure_rng: Draw noise and batches from the OS CSPRNG. False (or
            ``TS_DETERMINISTIC=1``) makes them reproducible from ``seed`` and NON-private.
        seed: Seed of the deterministic mode; ignored in secure mode.
    """

    noise_multiplier: float
    clip_norm: float
    sample_rate: float
    dataset_size: int
    max_microbatch_size: int = 16
    secure_rng: bool = True
    seed: int | None = None

    def __post_init__(self) -> None:
        for name in ("noise_multiplier", "clip_norm"):
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, int | float) or not math.isfinite(value):
                raise DPConfigError(f"{name} must be a finite number, got {value!r}")
            if value <= 0:
                raise DPConfigError(f"{name} must be > 0, got {value!r}")
        q = self.sample_rate
        if isinstance(q, bool) or not isinstance(q, int | float) or not math.isfinite(q) or not 0 < q <= 1:
            raise DPConfigError(f"sample_rate q must be in (0, 1], got {q!r}")
        for name in ("dataset_size", "max_microbatch_size"):
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, int) or value <= 0:
                raise DPConfigError(f"{name} must be a positive integer, got {value!r}")
        seed = self.seed
        if seed is not None and (isinstance(seed, bool) or not isinstance(seed, int) or seed < 0):
            raise DPConfigError(f"seed must be a non-negative integer, got {self.seed!r}")

    @property
    def expected_batch_size(self) -> float:
        """``q * N``, the normaliser of the noisy gradient sum."""
        return self.sample_rate * self.dataset_size

    def random_source(self) -> RandomSource:
        """Return the run's random source (secure unless deterministic mode is requested)."""
        return random_source_from_env(seed=self.seed, secure_rng=self.secure_rng)

    def build(self, model: nn.Module) -> tuple[DPGradientEngine, PoissonSampler]:
        """Create the engine and the Poisson sampler for ``model``, sharing one random source."""
        source = self.random_source()
        engine = DPGradientEngine(
            model,
            clip_norm=self.clip_norm,
            noise_multiplier=self.noise_multiplier,
            expected_batch_size=self.expected_batch_size,
            random_source=source,
        )
        sampler = PoissonSampler(self.dataset_size, sample_rate=self.sample_rate, random_source=source)
        return engine, sampler
