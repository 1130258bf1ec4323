"""The DP-SGD plan of one training run: σ, sampling rate and budget, decided in one place.

``tensafe train`` and the training runtime (the server's sessions) both turn a
:class:`~tensafe.privacy.DpPolicy` and the size of the data set into the numbers a DP-SGD
run uses with :func:`plan_dp_sgd`, and nowhere else:

1. **Checks.** N is a positive integer and equals the policy's ``dataset_size`` when the
   policy states one; ``expected_batch_size`` B is at most N; δ is below 1/N.
2. **Sampling rate of the accounting.** ``q = B / N`` only when the engine draws every batch
   itself (``server_poisson``: amplification by Poisson subsampling). With batches the client
   chose, every privacy unit may be in every step, so ``q = 1`` (no amplification), whatever
   B and N say. This is a hard rule, not an option.
3. **σ.** A saved σ (a resumed run keeps the calibration of its first session, bit for bit),
   else the policy's ``noise_multiplier``, else the smallest σ that reaches
   ``target_epsilon`` after exactly ``max_steps`` steps at that q
   (:func:`~tensafe.privacy.calibrate_noise`).
4. **Budget.** :meth:`DpPlan.new_budget` returns a fresh :class:`~tensafe.privacy.PrivacyBudget`
   with that σ and q, refusing the step that would exceed ``target_epsilon``.

Every refusal is a :class:`~tensafe.privacy.DpPolicyError` whose message says what to change.
The torch half (the DP-SGD engine and the Poisson sampler built from a plan) is
:func:`tensafe.training.dp.build_dp_sgd`. This module never imports torch.
"""

from __future__ import annotations

import dataclasses
from typing import Literal

from tensafe.privacy._validation import validate_delta
from tensafe.privacy.budget import PrivacyBudget
from tensafe.privacy.calibration import calibrate_noise
from tensafe.privacy.errors import DpPolicyError, PrivacyError
from tensafe.privacy.events import DpSgdEvent
from tensafe.privacy.policy import DpPolicy, SamplingMode

__all__ = ["DpPlan", "NoiseOrigin", "plan_dp_sgd"]

#: Where a plan's σ came from.
NoiseOrigin = Literal["saved", "policy", "calibrated"]


@dataclasses.dataclass(frozen=True, kw_only=True)
class DpPlan:
    """The concrete DP-SGD parameters of one run (build it with :func:`plan_dp_sgd`).

    Attributes:
        policy: The policy the plan was made from.
        dataset_size: N, the number of privacy units of the run's data set.
        noise_multiplier: σ of every step (noise std ``σ · clip_norm`` on the clipped sum).
        sample_rate: q of the accounting: ``B / N`` when the engine samples, else ``1.0``.
        noise_origin: ``saved``, ``policy`` or ``calibrated``.
    """

    policy: DpPolicy
    dataset_size: int
    noise_multiplier: float
    sample_rate: float
    noise_origin: NoiseOrigin

    @property
    def sampling(self) -> SamplingMode:
        """Who draws the batches: ``server_poisson`` (the engine) or ``client_chosen_batches``."""
        return self.policy.sampling

    @property
    def engine_samples(self) -> bool:
        """Whether the engine draws every batch (and the accounting may claim amplification)."""
        return self.policy.sampling == "server_poisson"

    @property
    def clip_norm(self) -> float:
        """C, the per-example L2 clip norm."""
        return self.policy.clip_norm

    @property
    def expected_batch_size(self) -> int:
        """B, the exact normaliser of the noisy gradient sum (never the realised batch size)."""
        return self.policy.expected_batch_size

    def new_budget(self) -> PrivacyBudget:
        """Return a fresh budget at step 0 with this plan's σ, q, δ, accountant and target ε."""
        return PrivacyBudget(
            target_epsilon=self.policy.target_epsilon,
            delta=self.policy.delta,
            accountant=self.policy.accountant,
            noise_multiplier=self.noise_multiplier,
            sample_rate=self.sample_rate,
        )

    def step_event(self) -> DpSgdEvent:
        """The spending record of one step under this plan."""
        return DpSgdEvent(noise_multiplier=self.noise_multiplier, sample_rate=self.sample_rate, steps=1)


def plan_dp_sgd(
    *, policy: DpPolicy, dataset_size: int, saved_noise_multiplier: float | None = None
) -> DpPlan:
    """Decide σ, q and the budget of a run under ``policy`` on ``dataset_size`` privacy units.

    Args:
        policy: The enforced policy (its ``sampling`` decides whether q = B/N or q = 1).
        dataset_size: N, counted or registered by the caller.
        saved_noise_multiplier: The σ a previous session of the same run used (from its
            checkpoint); when given it is used as is, so a resumed run never recalibrates.

    Returns:
        The plan; nothing is allocated or drawn.

    Raises:
        DpPolicyError: N contradicts the policy or is not a positive integer, B > N, δ ≥ 1/N,
            or no σ reaches the target (the message says which).
    """
    if not isinstance(policy, DpPolicy):
        raise DpPolicyError("a DP plan needs a DpPolicy")
    n = dataset_size
    if isinstance(n, bool) or not isinstance(n, int) or n <= 0:
        raise DpPolicyError(f"the data set size must be a positive integer, got {n!r}")
    if policy.dataset_size is not None and policy.dataset_size != n:
        raise DpPolicyError(
            f"the registered data set has {n} examples but the DP policy says "
            f"dataset_size={policy.dataset_size}"
        )
    if policy.expected_batch_size > n:
        raise DpPolicyError(f"expected_batch_size {policy.expected_batch_size} exceeds the data set size {n}")
    try:
        validate_delta(policy.delta, n)
    except PrivacyError as exc:
        raise DpPolicyError(f"DP policy: {exc}") from None
    # Amplification by sampling holds only for batches the engine draws itself. With batches
    # the client chose, every privacy unit may be in every step: q = 1 (no amplification).
    q = policy.expected_batch_size / n if policy.sampling == "server_poisson" else 1.0
    origin: NoiseOrigin
    if saved_noise_multiplier is not None:
        sigma, origin = saved_noise_multiplier, "saved"
    elif policy.noise_multiplier is not None:
        sigma, origin = policy.noise_multiplier, "policy"
    else:
        assert policy.max_steps is not None  # DpPolicy requires one of the two
        try:
            sigma = calibrate_noise(
                target_epsilon=policy.target_epsilon,
                delta=policy.delta,
                sample_rate=q,
                steps=policy.max_steps,
                accountant=policy.accountant,
            )
        except PrivacyError as exc:
            raise DpPolicyError(f"cannot calibrate the noise for this policy: {exc}") from None
        origin = "calibrated"
    return DpPlan(
        policy=policy,
        dataset_size=n,
        noise_multiplier=float(sigma),
        sample_rate=q,
        noise_origin=origin,
    )
