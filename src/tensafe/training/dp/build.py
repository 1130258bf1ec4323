"""The DP-SGD engine and sampler of a :class:`tensafe.privacy.DpPlan` (the torch half of the plan).

:func:`tensafe.privacy.plan_dp_sgd` decides σ, q and the budget without torch;
:func:`build_dp_sgd` attaches the engine to a model with exactly those numbers. ``tensafe
train`` and the training runtime both use the pair, so the chain σ → budget → engine →
sampler exists once.
"""

from __future__ import annotations

from torch import nn

from tensafe.privacy import DpPlan
from tensafe.training.dp.engine import DPGradientEngine
from tensafe.training.dp.rng import RandomSource
from tensafe.training.dp.sampler import PoissonSampler

__all__ = ["build_dp_sgd"]


def build_dp_sgd(
    plan: DpPlan, model: nn.Module, *, random_source: RandomSource
) -> tuple[DPGradientEngine, PoissonSampler | None]:
    """Attach a DP-SGD engine for ``plan`` to ``model``; add the Poisson sampler when the engine samples.

    The engine clips each example to ``plan.clip_norm``, adds noise of std
    ``plan.noise_multiplier * plan.clip_norm`` once per step and divides by exactly
    ``plan.expected_batch_size`` (B). The sampler (``server_poisson`` plans only; ``None`` for
    client-chosen batches) draws each example with probability ``plan.sample_rate`` = B/N.
    Engine and sampler share ``random_source`` (the OS CSPRNG unless deterministic mode).

    Raises:
        DPConfigError: If the model has no trainable parameter or a parameter is unsupported.
    """
    engine = DPGradientEngine(
        model,
        clip_norm=plan.clip_norm,
        noise_multiplier=plan.noise_multiplier,
        expected_batch_size=float(plan.expected_batch_size),
        random_source=random_source,
    )
    sampler = (
        PoissonSampler(plan.dataset_size, sample_rate=plan.sample_rate, random_source=random_source)
        if plan.engine_samples
        else None
    )
    return engine, sampler
