"""Random sources for DP-SGD noise and Poisson sampling.

Two sources exist, with one code path on top of them:

* :func:`secure_random_source` (the default) reads every random byte from the operating
  system's CSPRNG (``os.urandom``, i.e. ``getrandom(2)`` on Linux). Nothing is kept between
  calls, so no generator state exists that could be recovered from earlier outputs.
* :func:`deterministic_random_source` derives the bytes for ``(purpose, step)`` from a
  seed with NumPy's PCG64 seeded by a :class:`numpy.random.SeedSequence`. It exists only
  for reproducible experiments and tests: PCG64 is **not** a cryptographic generator, and
  anybody who knows the seed knows the noise, which voids the privacy guarantee.

Gaussian noise is produced from uniform 53-bit doubles with the Box-Muller transform in
float64 and rounded to the parameter dtype at the end. Bernoulli draws for Poisson
sampling compare a uniform 64-bit integer with ``floor(q * 2**64)``.

:func:`random_source_from_env` applies the ``TS_DETERMINISTIC`` switch: ``1`` selects the
deterministic source and logs a loud warning; unset, empty or ``0`` keeps the secure one.
"""

from __future__ import annotations

import abc
import enum
import logging
import math
import os

import numpy as np
import torch

from tensafe.training.dp.errors import DPConfigError

__all__ = [
    "DETERMINISTIC_ENV",
    "Purpose",
    "RandomSource",
    "deterministic_random_source",
    "deterministic_requested",
    "random_source_from_env",
    "secure_random_source",
]

logger = logging.getLogger("tensafe.training.dp")

#: Environment variable that switches DP-SGD to reproducible, NON-private randomness.
DETERMINISTIC_ENV = "TS_DETERMINISTIC"

_MASK53 = (1 << 53) - 1
_TWO_POW_M53 = 2.0**-53


class Purpose(enum.IntEnum):
    """Domain separation for the deterministic source: each use gets its own stream."""

    NOISE = 1
    SAMPLING = 2


class RandomSource(abc.ABC):
    """Supplier of random bytes, and of Gaussian and Bernoulli draws built on them."""

    #: True when the bytes come from the operating system's CSPRNG.
    secure: bool

    @abc.abstractmethod
    def random_bytes(self, n: int, *, purpose: Purpose, step: int) -> bytes:
        """Return ``n`` random bytes for ``purpose`` at logical step ``step``."""

    def _uint64(self, n: int, *, purpose: Purpose, step: int) -> np.ndarray:
        raw = bytearray(self.random_bytes(8 * n, purpose=purpose, step=step))
        return np.frombuffer(raw, dtype="<u8", count=n)

    def standard_normal(self, n: int, *, step: int) -> torch.Tensor:
        """Return ``n`` independent N(0, 1) draws as a float64 tensor.

        Args:
            n: How many draws.
            step: The logical step they are for (used only by the deterministic source).
        """
        if n <= 0:
            return torch.empty(0, dtype=torch.float64)
        pairs = (n + 1) // 2
        words = torch.from_numpy(self._uint64(2 * pairs, purpose=Purpose.NOISE, step=step).view(np.int64))
        # Top 53 bits of each word -> a double in the open interval (0, 1).
        u = ((words >> 11) & _MASK53).to(torch.float64).add_(0.5).mul_(_TWO_POW_M53)
        radius = u[:pairs].log_().mul_(-2.0).sqrt_()
        angle = u[pairs:].mul_(2.0 * math.pi)
        out = torch.empty(2 * pairs, dtype=torch.float64)
        torch.mul(radius, torch.cos(angle), out=out[:pairs])
        torch.mul(radius, torch.sin(angle), out=out[pairs:])
        return out[:n]

    def bernoulli_indices(self, n: int, probability: float, *, step: int) -> list[int]:
        """Return the sorted indices ``i < n`` drawn independently with ``probability``.

        Args:
            n: Population size.
            probability: Inclusion probability in ``(0, 1]``.
            step: The logical step the draw is for.
        """
        if probability >= 1.0:
            return list(range(n))
        threshold = np.uint64(math.floor(probability * 2.0**64))
        words = self._uint64(n, purpose=Purpose.SAMPLING, step=step)
        return [int(i) for i in np.flatnonzero(words < threshold)]


class _SecureSource(RandomSource):
    secure = True

    def random_bytes(self, n: int, *, purpose: Purpose, step: int) -> bytes:
        return os.urandom(n)

    def __repr__(self) -> str:
        return "SecureRandomSource(os.urandom)"


class _DeterministicSource(RandomSource):
    secure = False

    def __init__(self, seed: int) -> None:
        self._seed = seed

    def random_bytes(self, n: int, *, purpose: Purpose, step: int) -> bytes:
        seq = np.random.SeedSequence(entropy=self._seed, spawn_key=(int(purpose), step))
        return np.random.Generator(np.random.PCG64(seq)).bytes(n)

    def __repr__(self) -> str:
        # The seed is withheld on purpose: it determines every noise draw.
        return "DeterministicRandomSource(PCG64, NOT PRIVATE)"


def secure_random_source() -> RandomSource:
    """Return the default source: every byte from ``os.urandom``."""
    return _SecureSource()


def deterministic_random_source(seed: int) -> RandomSource:
    """Return a reproducible, NON-private source derived from ``seed``.

    Args:
        seed: A non-negative integer.

    Raises:
        DPConfigError: If ``seed`` is negative or not an integer.
    """
    if isinstance(seed, bool) or not isinstance(seed, int) or seed < 0:
        raise DPConfigError(f"the deterministic seed must be a non-negative integer, got {seed!r}")
    return _DeterministicSource(seed)


def deterministic_requested() -> bool:
    """Return whether ``TS_DETERMINISTIC=1`` is set.

    Raises:
        DPConfigError: If the variable holds anything but ``""``, ``"0"`` or ``"1"``.
    """
    from tensafe import config

    try:
        return config.deterministic()  # the one parser (tensafe.config)
    except config.EnvironmentVariableError as exc:
        raise DPConfigError(str(exc)) from None


def random_source_from_env(*, seed: int | None, secure_rng: bool = True) -> RandomSource:
    """Pick the random source for a run.

    The secure source is used unless ``TS_DETERMINISTIC=1`` is set or ``secure_rng`` is
    False; either of those selects the deterministic source seeded by ``seed`` (0 when
    None) and logs a WARNING, because the resulting noise is predictable.

    Args:
        seed: The run's seed; only used by the deterministic source.
        secure_rng: False asks for the deterministic source explicitly.

    Raises:
        DPConfigError: If ``TS_DETERMINISTIC`` has an invalid value or the seed is invalid.
    """
    env = deterministic_requested()
    if not env and secure_rng:
        return secure_random_source()
    effective = 0 if seed is None else seed
    source = deterministic_random_source(effective)
    reason = f"{DETERMINISTIC_ENV}=1" if env else "secure_rng=False"
    logger.warning(
        "!!! DETERMINISTIC DP-SGD RANDOMNESS (%s): noise and Poisson sampling are derived from "
        "the configured seed with a non-cryptographic generator. Anyone who knows the seed can remove the "
        "noise: the run has NO differential-privacy guarantee. Use only for tests and "
        "debugging. !!!",
        reason,
    )
    return source
