"""Poisson sampling of logical batches and their split into physical micro-batches."""

from __future__ import annotations

import math
from collections.abc import Iterator

from tensafe.training.dp.errors import DPConfigError
from tensafe.training.dp.rng import RandomSource, secure_random_source

__all__ = ["PoissonSampler", "split_microbatches"]


class PoissonSampler:
    """Draws the logical batches of DP-SGD by Poisson sampling.

    At every logical step each of the ``n`` examples is included independently with
    probability ``sample_rate``. Batch sizes therefore vary, and a batch may be empty: the
    engine must still take that step (noise only), because the privacy accountant assumes
    exactly this sampling. The draw for step ``t`` depends only on the random source and
    ``t``, so a resumed run continues with the right step index and, in deterministic mode,
    reproduces the same batches.

    Args:
        n: Dataset size (number of examples, the privacy unit).
        sample_rate: Inclusion probability ``q`` in ``(0, 1]``.
        random_source: Where the random bits come from; the OS CSPRNG by default.

    Raises:
        DPConfigError: If ``n`` is not positive or ``sample_rate`` is outside ``(0, 1]``.
    """

    def __init__(self, n: int, *, sample_rate: float, random_source: RandomSource | None = None) -> None:
        if isinstance(n, bool) or not isinstance(n, int) or n <= 0:
            raise DPConfigError(f"the dataset size must be a positive integer, got {n!r}")
        if not (isinstance(sample_rate, int | float) and math.isfinite(sample_rate)) or not (
            0.0 < sample_rate <= 1.0
        ):
            raise DPConfigError(f"the sample rate q must be in (0, 1], got {sample_rate!r}")
        self.n = n
        self.sample_rate = float(sample_rate)
        self.random_source = random_source if random_source is not None else secure_random_source()

    @property
    def expected_batch_size(self) -> float:
        """The expected logical batch size ``q * n``."""
        return self.sample_rate * self.n

    def sample(self, step: int) -> list[int]:
        """Return the sorted example indices of logical step ``step`` (possibly empty).

        Args:
            step: The 0-based logical step index.
        """
        if step < 0:
            raise DPConfigError(f"step must be non-negative, got {step}")
        return self.random_source.bernoulli_indices(self.n, self.sample_rate, step=step)

    def iter_steps(self, start: int, stop: int) -> Iterator[list[int]]:
        """Yield the batches of steps ``start`` (inclusive) to ``stop`` (exclusive)."""
        for step in range(start, stop):
            yield self.sample(step)

    def __repr__(self) -> str:
        return (
            f"PoissonSampler(n={self.n}, sample_rate={self.sample_rate}, "
            f"random_source={self.random_source!r})"
        )


def split_microbatches(indices: list[int], max_size: int) -> list[list[int]]:
    """Split one logical batch into physical micro-batches of at most ``max_size`` examples.

    An empty logical batch yields no micro-batch; the caller still finalizes the step.

    Args:
        indices: The example indices of one logical batch.
        max_size: The largest physical micro-batch the hardware can hold.

    Raises:
        DPConfigError: If ``max_size`` is not positive.
    """
    if isinstance(max_size, bool) or not isinstance(max_size, int) or max_size <= 0:
        raise DPConfigError(f"the micro-batch size must be a positive integer, got {max_size!r}")
    return [indices[i : i + max_size] for i in range(0, len(indices), max_size)]
