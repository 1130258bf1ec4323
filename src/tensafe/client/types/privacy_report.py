"""``PrivacyReport``: the differential-privacy budget of a training run."""

from __future__ import annotations

from typing import Any

from tensafe.client.types._base import ResponseModel

__all__ = ["PrivacyReport"]


class PrivacyReport(ResponseModel):
    """What a run has spent of its privacy budget.

    Attributes:
        training_run_id: The run (model id).
        dp_enabled: Whether DP-SGD applies to the run.
        epsilon_spent: ε spent so far at ``delta``.
        target_epsilon: The budget (the run stops before exceeding it).
        delta: δ.
        accountant: The accountant that computed ε (``rdp``, ``prv``, ...).
        steps: Optimizer steps taken under DP.
        noise_multiplier: σ, when fixed.
        max_grad_norm: The per-example clipping norm.
        sampling: How batches were formed (``client_batches`` or ``server_poisson``).
    """

    training_run_id: str
    dp_enabled: bool = True
    epsilon_spent: float | None = None
    target_epsilon: float | None = None
    delta: float | None = None
    accountant: str | None = None
    steps: int = 0
    noise_multiplier: float | None = None
    max_grad_norm: float | None = None
    sampling: str | None = None
    extra: dict[str, Any] | None = None
