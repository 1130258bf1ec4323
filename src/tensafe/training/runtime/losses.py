"""Tinker's loss functions, per datum, as sums over tokens.

Notation: ``lp`` = the learner's log-probability of ``target_tokens``; ``q`` = the
``logprobs`` input (the sampler's log-probability); ``A`` = ``advantages``;
``r = exp(lp - q)``; ``sg`` = stop-gradient.

=====================  =====================================================
``cross_entropy``      ``Σ -lp · w``  (``weights`` default 1)
``importance_sampling`` ``-Σ r · A``
``ppo``                ``-Σ min(r · A, clip(r, lo, hi) · A)``
``cispo``              ``-Σ sg(clip(r, lo, hi)) · lp · A``
``dro``                ``-Σ (lp · A - ½ · beta · (lp - q)²)``
``gspo``               ``-Σ_t m_t · min(s_t · A_t, clip(s_t, lo, hi) · A_t)``
``stable_reinforce``   ``Σ_t M_t · (-sg(min(r_t, C)) · lp_t · A_t + kl · k3_t)``
=====================  =====================================================

``lo``/``hi`` come from ``loss_fn_config`` (``clip_low_threshold``, default 0.8;
``clip_high_threshold``, default 1.2) or, except for ``gspo``, from per-token
``loss_fn_inputs`` of those names; ``beta`` from ``loss_fn_config["beta"]`` (required).
Unknown inputs or config keys are refused, never ignored.

**gspo** (Group Sequence Policy Optimization, in its GSPO-token form). ``m`` =
``sequence_ratio_mask`` (0 or 1 per token). The sequence-level ratio is the geometric mean
of the token ratios over the masked tokens,
``s = exp(Σ_t m_t · (lp_t - q_t) / Σ_t m_t)``, and each token carries
``s_t = sg(s) · exp(lp_t - sg(lp_t))`` (its value is ``s``, its gradient ``s · ∇lp_t``).
Clipping is PPO's, applied to the sequence ratio: ``∂loss/∂lp_t = -m_t · A_t · s`` where the
unclipped term is the minimum (or ``s`` lies within ``[lo, hi]``), else 0. A datum without
masked tokens has loss 0. The loss is a sum over tokens, like every Tinker loss (the paper's
``1/|y|`` is left to the advantages or the learning rate).

**stable_reinforce** (TenSafe's definition: Tinker has not published its objective). ``M`` =
``sampled_mask``: 1 at the positions whose target is a token the sampler produced, 0 elsewhere
(prompt positions carry no loss); ``q`` = the sampler's log-probabilities **as recorded by the
server at sampling** (``record_stability_info``); ``C`` = ``loss_fn_config["ratio_cap"]``
(default 2.0); ``kl`` = ``loss_fn_config["kl_coeff"]`` (default 0). REINFORCE with truncated
importance sampling against the sampler, ``r_t = exp(lp_t - q_t)``, plus the low-variance
unbiased estimator of ``KL(sampler ‖ learner)`` for tokens drawn from the sampler,
``k3_t = r_t - 1 - (lp_t - q_t)``. Hence ``∂loss/∂lp_t = M_t · (-min(r_t, C) · A_t + kl · (r_t - 1))``.
In the server, ``sampled_mask`` and ``q`` are derived from the datum's provenance spans and the
recorded sequences (:mod:`tensafe.server.stability`); a client never sends them.

Every loss is a function of one datum's own inputs only (no batch statistics), so that
per-example clipping under DP-SGD bounds each datum's influence.
"""

from __future__ import annotations

import dataclasses
import math
from collections.abc import Callable, Mapping

import numpy as np
import torch

from tensafe.training.runtime.errors import InvalidRequestError

__all__ = [
    "DEFAULT_RATIO_CAP",
    "LOSS_FUNCTIONS",
    "LossSpec",
    "compute_loss",
    "validate_loss_inputs",
]

_FLOAT_INPUTS = (
    "weights",
    "logprobs",
    "advantages",
    "clip_low_threshold",
    "clip_high_threshold",
    "sequence_ratio_mask",
    "sampled_mask",
)
#: Inputs that must hold only 0 and 1.
_MASK_INPUTS = ("sequence_ratio_mask", "sampled_mask")
#: ``stable_reinforce``'s default truncation cap of the importance ratio.
DEFAULT_RATIO_CAP = 2.0

LossFn = Callable[[torch.Tensor, Mapping[str, torch.Tensor], Mapping[str, float]], torch.Tensor]


@dataclasses.dataclass(frozen=True)
class LossSpec:
    """What a loss function needs and accepts."""

    required: tuple[str, ...]
    optional: tuple[str, ...]
    config: tuple[str, ...]
    fn: LossFn


def _thresholds(
    inputs: Mapping[str, torch.Tensor], config: Mapping[str, float]
) -> tuple[torch.Tensor | float, torch.Tensor | float]:
    lo: torch.Tensor | float = inputs.get("clip_low_threshold", config.get("clip_low_threshold", 0.8))
    hi: torch.Tensor | float = inputs.get("clip_high_threshold", config.get("clip_high_threshold", 1.2))
    return lo, hi


def _clip(r: torch.Tensor, lo: torch.Tensor | float, hi: torch.Tensor | float) -> torch.Tensor:
    lo_t = torch.as_tensor(lo, dtype=r.dtype)
    hi_t = torch.as_tensor(hi, dtype=r.dtype)
    return torch.minimum(torch.maximum(r, lo_t), hi_t)


def _cross_entropy(
    lp: torch.Tensor, inputs: Mapping[str, torch.Tensor], config: Mapping[str, float]
) -> torch.Tensor:
    w = inputs.get("weights")
    return -(lp * w) if w is not None else -lp


def _importance_sampling(
    lp: torch.Tensor, inputs: Mapping[str, torch.Tensor], config: Mapping[str, float]
) -> torch.Tensor:
    ratio = torch.exp(lp - inputs["logprobs"])
    return -(ratio * inputs["advantages"])


def _ppo(lp: torch.Tensor, inputs: Mapping[str, torch.Tensor], config: Mapping[str, float]) -> torch.Tensor:
    adv = inputs["advantages"]
    ratio = torch.exp(lp - inputs["logprobs"])
    lo, hi = _thresholds(inputs, config)
    return -torch.minimum(ratio * adv, _clip(ratio, lo, hi) * adv)


def _cispo(lp: torch.Tensor, inputs: Mapping[str, torch.Tensor], config: Mapping[str, float]) -> torch.Tensor:
    ratio = torch.exp(lp - inputs["logprobs"])
    lo, hi = _thresholds(inputs, config)
    return -(_clip(ratio, lo, hi).detach() * lp * inputs["advantages"])


def _dro(lp: torch.Tensor, inputs: Mapping[str, torch.Tensor], config: Mapping[str, float]) -> torch.Tensor:
    beta = config["beta"]
    diff = lp - inputs["logprobs"]
    return -(lp * inputs["advantages"] - 0.5 * beta * diff * diff)


def _gspo(lp: torch.Tensor, inputs: Mapping[str, torch.Tensor], config: Mapping[str, float]) -> torch.Tensor:
    mask = inputs["sequence_ratio_mask"]
    adv = inputs["advantages"]
    count = mask.sum()
    log_ratio = ((lp - inputs["logprobs"]) * mask).sum() / torch.clamp(count, min=1.0)
    seq_ratio = torch.exp(log_ratio).detach()
    token_ratio = seq_ratio * torch.exp(lp - lp.detach())  # value s, gradient s · ∇lp_t
    lo, hi = _thresholds({}, config)
    return -(mask * torch.minimum(token_ratio * adv, _clip(token_ratio, lo, hi) * adv))


def _stable_reinforce(
    lp: torch.Tensor, inputs: Mapping[str, torch.Tensor], config: Mapping[str, float]
) -> torch.Tensor:
    mask = inputs["sampled_mask"]
    diff = lp - inputs["logprobs"]
    ratio = torch.exp(diff)
    cap = config.get("ratio_cap", DEFAULT_RATIO_CAP)
    weight = torch.clamp(ratio, max=cap).detach()
    loss = -(weight * lp * inputs["advantages"])
    kl = config.get("kl_coeff", 0.0)
    if kl:
        loss = loss + kl * (ratio - 1.0 - diff)
    return mask * loss


_RL = ("target_tokens", "logprobs", "advantages")
_CLIP_KEYS = ("clip_low_threshold", "clip_high_threshold")

#: Supported ``loss_fn`` names and their inputs.
LOSS_FUNCTIONS: dict[str, LossSpec] = {
    "cross_entropy": LossSpec(("target_tokens",), ("weights",), (), _cross_entropy),
    "importance_sampling": LossSpec(_RL, (), (), _importance_sampling),
    "ppo": LossSpec(_RL, _CLIP_KEYS, _CLIP_KEYS, _ppo),
    "cispo": LossSpec(_RL, _CLIP_KEYS, _CLIP_KEYS, _cispo),
    "dro": LossSpec(_RL, (), ("beta",), _dro),
    "gspo": LossSpec((*_RL, "sequence_ratio_mask"), (), _CLIP_KEYS, _gspo),
    "stable_reinforce": LossSpec((*_RL, "sampled_mask"), (), ("kl_coeff", "ratio_cap"), _stable_reinforce),
}


def spec_for(loss_fn: str) -> LossSpec:
    """Return the :class:`LossSpec` of ``loss_fn``.

    Raises:
        InvalidRequestError: If the loss function is unknown or unsupported.
    """
    spec = LOSS_FUNCTIONS.get(loss_fn) if isinstance(loss_fn, str) else None
    if spec is None:
        raise InvalidRequestError(
            f"unsupported loss_fn {loss_fn!r}; TenSafe supports {', '.join(LOSS_FUNCTIONS)}"
        )
    return spec


def validate_config(loss_fn: str, config: Mapping[str, object] | None) -> dict[str, float]:
    """Check ``loss_fn_config`` against the loss and return it as floats.

    Raises:
        InvalidRequestError: On an unknown key, a non-finite value or a missing ``beta``.
    """
    spec = spec_for(loss_fn)
    out: dict[str, float] = {}
    for key, value in (config or {}).items():
        if key not in spec.config:
            allowed = ", ".join(spec.config) or "none"
            raise InvalidRequestError(
                f"loss_fn_config key {key!r} is not used by {loss_fn} (accepted: {allowed})"
            )
        if isinstance(value, bool) or not isinstance(value, int | float) or not math.isfinite(value):
            raise InvalidRequestError(f"loss_fn_config[{key!r}] must be a finite number, got {value!r}")
        out[key] = float(value)
    if loss_fn == "dro" and "beta" not in out:
        raise InvalidRequestError("loss_fn 'dro' needs loss_fn_config['beta']")
    if out.get("kl_coeff", 0.0) < 0:
        raise InvalidRequestError("loss_fn_config['kl_coeff'] must be >= 0")
    if "ratio_cap" in out and out["ratio_cap"] <= 0:
        raise InvalidRequestError("loss_fn_config['ratio_cap'] must be > 0")
    if "clip_low_threshold" in out and "clip_high_threshold" in out:
        if out["clip_low_threshold"] > out["clip_high_threshold"]:
            raise InvalidRequestError("clip_low_threshold must not exceed clip_high_threshold")
    return out


def validate_loss_inputs(
    loss_fn: str, inputs: Mapping[str, np.ndarray], *, length: int, vocab_size: int, index: int
) -> dict[str, np.ndarray]:
    """Check one datum's ``loss_fn_inputs`` and return them as contiguous arrays.

    Args:
        loss_fn: The loss function name.
        inputs: The datum's loss inputs.
        length: ``len(model_input)``.
        vocab_size: Target tokens must be in ``[0, vocab_size)``.
        index: The datum's position in the request (for messages).

    Raises:
        InvalidRequestError: On a missing or unknown key, a wrong shape, dtype or value.
    """
    spec = spec_for(loss_fn)
    where = f"datum {index}"
    if not isinstance(inputs, Mapping):
        raise InvalidRequestError(f"{where}: loss_fn_inputs must be a mapping of arrays")
    missing = [k for k in spec.required if k not in inputs]
    if missing:
        raise InvalidRequestError(f"{where}: loss_fn {loss_fn} needs loss_fn_inputs {', '.join(missing)}")
    unknown = sorted(set(inputs) - set(spec.required) - set(spec.optional))
    if unknown:
        accepted = ", ".join((*spec.required, *spec.optional))
        raise InvalidRequestError(
            f"{where}: loss_fn_inputs {', '.join(map(str, unknown))} not used by {loss_fn} "
            f"(accepted: {accepted})"
        )
    out: dict[str, np.ndarray] = {}
    try:
        targets = np.asarray(inputs["target_tokens"])
    except (TypeError, ValueError):
        raise InvalidRequestError(f"{where}: target_tokens is not an array") from None
    if targets.dtype.kind not in "iu":
        raise InvalidRequestError(f"{where}: target_tokens must be integers, got {targets.dtype}")
    if targets.ndim not in (1, 2) or targets.shape[0] != length:
        raise InvalidRequestError(
            f"{where}: target_tokens must have shape [N] or [N, K] with N = len(model_input) = {length}, "
            f"got {list(targets.shape)}"
        )
    if targets.size and (int(targets.min()) < 0 or int(targets.max()) >= vocab_size):
        raise InvalidRequestError(f"{where}: target_tokens must be in [0, {vocab_size})")
    out["target_tokens"] = np.ascontiguousarray(targets, dtype=np.int64)
    for key in inputs:
        if key == "target_tokens":
            continue
        try:
            arr = np.asarray(inputs[key])
        except (TypeError, ValueError):
            raise InvalidRequestError(f"{where}: {key} is not an array") from None
        if arr.dtype.kind not in "iuf":
            raise InvalidRequestError(f"{where}: {key} must be numeric, got {arr.dtype}")
        if arr.shape != targets.shape:
            raise InvalidRequestError(
                f"{where}: {key} must have the shape of target_tokens {list(targets.shape)}, "
                f"got {list(arr.shape)}"
            )
        arr = np.ascontiguousarray(arr, dtype=np.float32)
        if not np.isfinite(arr).all():
            raise InvalidRequestError(f"{where}: {key} contains NaN or infinite values")
        if key in _MASK_INPUTS and not np.isin(arr, (0.0, 1.0)).all():
            raise InvalidRequestError(f"{where}: {key} must hold only 0 and 1")
        out[key] = arr
    return out


def compute_loss(
    loss_fn: str, lp: torch.Tensor, inputs: Mapping[str, np.ndarray], config: Mapping[str, float]
) -> torch.Tensor:
    """Return the elementwise loss of one datum (sum it for the datum's loss).

    Args:
        loss_fn: A key of :data:`LOSS_FUNCTIONS`.
        lp: The learner log-probabilities of ``target_tokens``, same shape.
        inputs: The validated loss inputs (:func:`validate_loss_inputs`).
        config: The validated config (:func:`validate_config`).
    """
    spec = spec_for(loss_fn)
    tensors = {
        k: torch.from_numpy(v).to(dtype=lp.dtype, device=lp.device)
        for k, v in inputs.items()
        if k in _FLOAT_INPUTS
    }
    return spec.fn(lp, tensors, config)
