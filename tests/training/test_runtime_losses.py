"""Loss functions of the training runtime against naive per-token reference implementations.

The references below are written from the formulas of the Tinker wire protocol (section 4.4),
one token at a time on a separate, unpadded forward pass of each datum, in float64. They share
no code with ``tensafe.training.runtime.losses``.
"""

from __future__ import annotations

import math
import pathlib
import re
from collections.abc import Callable
from typing import Any

import numpy as np
import pytest
import torch

from tensafe.training.runtime import (
    USER_ERRORS,
    AdamParams,
    Datum,
    InvalidRequestError,
    LoraTrainingSession,
)

LOSSES = ("cross_entropy", "importance_sampling", "ppo", "cispo", "dro")


@pytest.fixture(scope="module")
def session(tiny_model_dir: pathlib.Path) -> LoraTrainingSession:
    s = LoraTrainingSession.create(
        base_model=str(tiny_model_dir), rank=4, dp=None, seed=0, allow_non_private=True
    )
    # Non-zero LoRA B matrices so that every adapter parameter gets a gradient.
    g = torch.Generator().manual_seed(1)
    with torch.no_grad():
        for name, p in s.model.named_parameters():
            if p.requires_grad and "lora_B" in name:
                p.copy_(torch.randn(p.shape, generator=g) * 0.05)
    return s


def _true_logprobs(model: Any, tokens: list[int], targets: np.ndarray) -> torch.Tensor:
    """Unpadded float64 forward of one datum: lp[t] = log p(targets[t] | tokens[:t+1])."""
    logits = model(input_ids=torch.tensor([tokens])).logits[0].to(torch.float64)
    logp = torch.log_softmax(logits, dim=-1)
    out = []
    for t in range(len(tokens)):
        row = targets[t]
        if np.ndim(row) == 0:
            out.append(logp[t, int(row)])
        else:
            out.append(torch.stack([logp[t, int(k)] for k in row]))
    return torch.stack(out)


def _reference_loss(
    loss_fn: str, lp: torch.Tensor, inputs: dict[str, np.ndarray], config: dict[str, float]
) -> torch.Tensor:
    """Naive per-token loop over the formulas of the protocol document."""
    total = torch.zeros((), dtype=torch.float64)
    lo_default = config.get("clip_low_threshold", 0.8)
    hi_default = config.get("clip_high_threshold", 1.2)
    flat_lp = lp.reshape(-1)
    for t in range(flat_lp.shape[0]):
        x = flat_lp[t]

        def val(key: str, t: int = t) -> float:
            return float(np.asarray(inputs[key], dtype=np.float64).reshape(-1)[t])

        if loss_fn == "cross_entropy":
            w = val("weights") if "weights" in inputs else 1.0
            total = total - x * w
            continue
        q, a = val("logprobs"), val("advantages")
        r = torch.exp(x - q)
        lo = val("clip_low_threshold") if "clip_low_threshold" in inputs else lo_default
        hi = val("clip_high_threshold") if "clip_high_threshold" in inputs else hi_default
        if loss_fn == "importance_sampling":
            total = total - r * a
        elif loss_fn == "ppo":
            clipped = min(max(float(r.detach()), lo), hi)
            unclipped_term = r * a
            clipped_term = clipped * a
            total = total - (
                unclipped_term if float(unclipped_term.detach()) <= clipped_term else clipped_term
            )
        elif loss_fn == "cispo":
            clipped = min(max(float(r.detach()), lo), hi)  # a constant: no gradient flows through the ratio
            total = total - clipped * x * a
        elif loss_fn == "dro":
            beta = config["beta"]
            total = total - (x * a - 0.5 * beta * (x - q) ** 2)
        else:  # pragma: no cover - guarded by LOSSES
            raise AssertionError(loss_fn)
    return total


def _make_data(
    session: LoraTrainingSession,
    loss_fn: str,
    *,
    seed: int,
    two_d: bool = False,
    per_token_clip: bool = False,
) -> list[Datum]:
    rng = np.random.default_rng(seed)
    vocab = session.model.config.vocab_size
    data = []
    for n in (5, 3, 7):
        tokens = [int(x) for x in rng.integers(1, 500, size=n)]
        shape: tuple[int, ...] = (n, 3) if two_d else (n,)
        targets = rng.integers(0, vocab, size=shape)
        inputs: dict[str, np.ndarray] = {"target_tokens": targets.astype(np.int64)}
        if loss_fn == "cross_entropy":
            inputs["weights"] = rng.normal(size=shape).astype(np.float32)  # real-valued, not only 0/1
        else:
            with torch.no_grad():
                true_lp = _true_logprobs(session.model, tokens, targets).numpy()
            # Sampler logprobs near the learner's so that ratios straddle the clip thresholds.
            inputs["logprobs"] = (true_lp + rng.uniform(-0.5, 0.5, size=shape)).astype(np.float32)
            inputs["advantages"] = rng.normal(size=shape).astype(np.float32)
            if per_token_clip:
                inputs["clip_low_threshold"] = rng.uniform(0.7, 0.95, size=shape).astype(np.float32)
                inputs["clip_high_threshold"] = rng.uniform(1.05, 1.3, size=shape).astype(np.float32)
        data.append(Datum(model_input=tokens, loss_fn_inputs=inputs))
    return data


def _config(loss_fn: str) -> dict[str, float] | None:
    if loss_fn == "ppo":
        return {"clip_low_threshold": 0.85, "clip_high_threshold": 1.15}
    if loss_fn == "cispo":
        return {"clip_low_threshold": 0.9, "clip_high_threshold": 1.1}
    if loss_fn == "dro":
        return {"beta": 0.3}
    return None


def _trainable(session: LoraTrainingSession) -> list[torch.nn.Parameter]:
    return [p for p in session.model.parameters() if p.requires_grad]


def _check_against_reference(
    session: LoraTrainingSession,
    loss_fn: str,
    data: list[Datum],
    config: dict[str, float] | None,
) -> None:
    params = _trainable(session)
    for p in params:
        p.grad = None
    result = session.forward_backward(data, loss_fn, config)
    got_grads = [p.grad.clone() if p.grad is not None else torch.zeros_like(p) for p in params]
    for p in params:
        p.grad = None

    ref_total = torch.zeros((), dtype=torch.float64)
    for i, d in enumerate(data):
        targets = np.asarray(d.loss_fn_inputs["target_tokens"])
        lp = _true_logprobs(session.model, d.model_input, targets)
        np.testing.assert_allclose(
            result.loss_fn_outputs[i]["logprobs"], lp.detach().numpy(), rtol=1e-5, atol=1e-4
        )
        assert result.loss_fn_outputs[i]["logprobs"].dtype == np.float32
        assert result.loss_fn_outputs[i]["logprobs"].shape == targets.shape
        ref_total = ref_total + _reference_loss(loss_fn, lp, dict(d.loss_fn_inputs), config or {})
    ref_grads = torch.autograd.grad(ref_total, params, allow_unused=True)
    assert result.metrics["loss:sum"] == pytest.approx(float(ref_total.detach()), rel=1e-4, abs=1e-3)
    for got, ref, p in zip(got_grads, ref_grads, params, strict=True):
        expected = ref if ref is not None else torch.zeros_like(p)
        torch.testing.assert_close(got.to(torch.float64), expected.to(torch.float64), rtol=1e-3, atol=1e-5)
    assert any(float(g.abs().sum()) > 0 for g in got_grads)


@pytest.mark.parametrize("loss_fn", LOSSES)
def test_loss_value_logprobs_and_gradient_match_reference(session: LoraTrainingSession, loss_fn: str) -> None:
    data = _make_data(session, loss_fn, seed=hash(loss_fn) % 1000)
    _check_against_reference(session, loss_fn, data, _config(loss_fn))


@pytest.mark.parametrize("loss_fn", ["ppo", "cispo"])
def test_per_token_clip_thresholds(session: LoraTrainingSession, loss_fn: str) -> None:
    data = _make_data(session, loss_fn, seed=5, per_token_clip=True)
    _check_against_reference(session, loss_fn, data, None)


def test_ppo_default_thresholds(session: LoraTrainingSession) -> None:
    data = _make_data(session, "ppo", seed=6)
    _check_against_reference(session, "ppo", data, None)


def test_cross_entropy_with_2d_targets(session: LoraTrainingSession) -> None:
    data = _make_data(session, "cross_entropy", seed=7, two_d=True)
    _check_against_reference(session, "cross_entropy", data, None)


def test_cross_entropy_is_a_sum_over_tokens_and_datums(session: LoraTrainingSession) -> None:
    datum = _make_data(session, "cross_entropy", seed=8)[0]
    one = session.forward([datum], "cross_entropy").metrics["loss:sum"]
    three = session.forward([datum, datum, datum], "cross_entropy").metrics["loss:sum"]
    assert three == pytest.approx(3 * one, rel=1e-5)


def test_forward_does_not_touch_gradients_or_weights(session: LoraTrainingSession) -> None:
    params = _trainable(session)
    for p in params:
        p.grad = None
    before = [p.detach().clone() for p in params]
    data = _make_data(session, "importance_sampling", seed=9)
    fwd = session.forward(data, "importance_sampling")
    assert all(p.grad is None for p in params)
    assert all(torch.equal(a, p) for a, p in zip(before, params, strict=True))
    fb = session.forward_backward(data, "importance_sampling")
    assert fwd.metrics["loss:sum"] == pytest.approx(fb.metrics["loss:sum"], rel=1e-6)
    for p in params:
        p.grad = None


def test_non_private_gradients_accumulate_across_calls(session: LoraTrainingSession) -> None:
    data = _make_data(session, "cross_entropy", seed=10)
    params = _trainable(session)
    for p in params:
        p.grad = None
    session.forward_backward(data, "cross_entropy")
    together = [p.grad.clone() for p in params]  # type: ignore[union-attr]
    for p in params:
        p.grad = None
    session.forward_backward(data[:1], "cross_entropy")
    session.forward_backward(data[1:], "cross_entropy")
    for a, p in zip(together, params, strict=True):
        torch.testing.assert_close(p.grad, a, rtol=1e-4, atol=1e-6)
    for p in params:
        p.grad = None


BAD_CASES: list[tuple[str, Callable[[list[Datum]], list[Datum]], dict[str, Any] | None, str]] = [
    ("custom", lambda d: d, None, "unsupported loss_fn"),
    ("cross_entropy", lambda d: [Datum(d[0].model_input, {})], None, "needs loss_fn_inputs target_tokens"),
    (
        "cross_entropy",
        lambda d: [Datum(d[0].model_input, {**d[0].loss_fn_inputs, "mask": np.ones(5)})],
        None,
        "not used by cross_entropy",
    ),
    (
        "cross_entropy",
        lambda d: [Datum(d[0].model_input, {"target_tokens": np.arange(4)})],
        None,
        "N = len(model_input) = 5",
    ),
    (
        "cross_entropy",
        lambda d: [Datum(d[0].model_input, {"target_tokens": np.array([0, 1, 2, 3, 10**7])})],
        None,
        "target_tokens must be in",
    ),
    (
        "cross_entropy",
        lambda d: [Datum(d[0].model_input, {"target_tokens": np.arange(5.0)})],
        None,
        "must be integers",
    ),
    (
        "cross_entropy",
        lambda d: [
            Datum(
                d[0].model_input, {"target_tokens": np.arange(5), "weights": np.array([1, np.nan, 1, 1, 1])}
            )
        ],
        None,
        "NaN",
    ),
    ("cross_entropy", lambda d: [Datum([], {"target_tokens": np.arange(0)})], None, "is empty"),
    ("cross_entropy", lambda d: [Datum([1, -3], {"target_tokens": np.arange(2)})], None, "outside"),
    ("cross_entropy", lambda d: d, {"beta": 1.0}, "not used by cross_entropy"),
    ("dro", lambda d: d, None, "needs loss_fn_config['beta']"),
    ("ppo", lambda d: d, {"clip_low_threshold": float("nan")}, "finite"),
    ("ppo", lambda d: d, {"clip_low_threshold": 1.3, "clip_high_threshold": 1.1}, "must not exceed"),
]


@pytest.mark.parametrize(("loss_fn", "mutate", "config", "message"), BAD_CASES)
def test_bad_requests_are_user_errors(
    session: LoraTrainingSession,
    loss_fn: str,
    mutate: Callable[[list[Datum]], list[Datum]],
    config: dict[str, Any] | None,
    message: str,
) -> None:
    base_loss = loss_fn if loss_fn in LOSSES and loss_fn != "cross_entropy" else "cross_entropy"
    base = _make_data(session, base_loss, seed=11)
    data = mutate(base)
    params = _trainable(session)
    before = [p.detach().clone() for p in params]
    with pytest.raises(InvalidRequestError, match=re.escape(message)) as info:
        session.forward_backward(data, loss_fn, config)
    assert isinstance(info.value, USER_ERRORS)
    assert all(p.grad is None or float(p.grad.abs().sum()) == 0 for p in params)
    assert all(torch.equal(a, p) for a, p in zip(before, params, strict=True))


def test_adam_params_are_validated() -> None:
    with pytest.raises(InvalidRequestError):
        AdamParams(learning_rate=math.nan)
    with pytest.raises(InvalidRequestError):
        AdamParams(beta1=1.0)
    with pytest.raises(InvalidRequestError):
        AdamParams(eps=0.0)
    assert AdamParams().beta2 == 0.95
