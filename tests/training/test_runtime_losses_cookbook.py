"""``gspo`` and ``stable_reinforce`` against naive per-token references written from their formulas.

The references are plain Python/NumPy loops in float64 over the formulas of
``docs/runtime.md`` (*Loss functions*); they share no code with
``tensafe.training.runtime.losses``. Gradients with respect to the learner log-probabilities
are checked against the closed forms below and against central finite differences of the
reference loss; the model-level test compares a session's ``forward`` and gradients with a
separate, unpadded float64 forward pass of each datum.

* gspo: ``s = exp(Σ m·(lp − q) / Σ m)``; loss ``−Σ_t m_t · min(s·A_t, clip(s, lo, hi)·A_t)``;
  ``∂/∂lp_t = −m_t · A_t · s`` where the unclipped term is the minimum, else 0.
* stable_reinforce: ``r_t = exp(lp_t − q_t)``; loss
  ``Σ_t M_t · (−min(r_t, C)·lp_t·A_t + kl·(r_t − 1 − (lp_t − q_t)))`` with ``min(r_t, C)`` a
  constant; ``∂/∂lp_t = M_t · (−min(r_t, C)·A_t + kl·(r_t − 1))``.
"""

from __future__ import annotations

import math
import pathlib

import numpy as np
import pytest
import torch
from hypothesis import assume, given, settings
from hypothesis import strategies as st

from tensafe.training.runtime import Datum, InvalidRequestError, LoraTrainingSession
from tensafe.training.runtime.losses import compute_loss, validate_config, validate_loss_inputs
from training._runtime_helpers import runtime_session

# --------------------------------------------------------------------------- references


def _gspo_ref(lp: list[float], q: list[float], a: list[float], m: list[float], lo: float, hi: float) -> float:
    count = sum(m)
    if count == 0:
        return 0.0
    s = math.exp(sum(mi * (x - y) for x, y, mi in zip(lp, q, m, strict=True)) / count)
    clipped = min(max(s, lo), hi)
    total = 0.0
    for ai, mi in zip(a, m, strict=True):
        if mi:
            total -= min(s * ai, clipped * ai)
    return total


def _gspo_grad_ref(
    lp: list[float], q: list[float], a: list[float], m: list[float], lo: float, hi: float
) -> list[float]:
    count = sum(m)
    if count == 0:
        return [0.0] * len(lp)
    s = math.exp(sum(mi * (x - y) for x, y, mi in zip(lp, q, m, strict=True)) / count)
    clipped = min(max(s, lo), hi)
    out = []
    for ai, mi in zip(a, m, strict=True):
        unclipped_active = s * ai < clipped * ai or lo < s < hi
        out.append(-mi * ai * s if (mi and unclipped_active) else 0.0)
    return out


def _sr_ref(
    lp: list[float], q: list[float], a: list[float], m: list[float], cap: float, kl: float
) -> tuple[float, list[float]]:
    """Loss value and closed-form gradient of stable_reinforce, one token at a time."""
    total = 0.0
    grad = []
    for x, y, ai, mi in zip(lp, q, a, m, strict=True):
        r = math.exp(x - y)
        w = min(r, cap)
        if mi:
            total += -w * x * ai + kl * (r - 1.0 - (x - y))
            grad.append(-w * ai + kl * (r - 1.0))
        else:
            grad.append(0.0)
    return total, grad


def _ours(
    loss_fn: str, lp: list[float], inputs: dict[str, np.ndarray], config: dict[str, float]
) -> tuple[float, list[float]]:
    n = len(lp)
    checked = validate_loss_inputs(
        loss_fn, {"target_tokens": np.zeros(n, dtype=np.int64), **inputs}, length=n, vocab_size=10, index=0
    )
    cfg = validate_config(loss_fn, config)
    x = torch.tensor(lp, dtype=torch.float64, requires_grad=True)
    loss = compute_loss(loss_fn, x, checked, cfg).sum()
    loss.backward()
    assert x.grad is not None
    return float(loss.detach()), [float(g) for g in x.grad]


def _finite_difference(f: object, lp: list[float], eps: float = 1e-6) -> list[float]:
    assert callable(f)
    out = []
    for i in range(len(lp)):
        up, down = list(lp), list(lp)
        up[i] += eps
        down[i] -= eps
        out.append((f(up) - f(down)) / (2 * eps))
    return out


def _f32(values: list[float]) -> list[float]:
    """The values the runtime sees (inputs are converted to float32)."""
    return [float(v) for v in np.asarray(values, dtype=np.float32)]


_vals = st.floats(min_value=-3.0, max_value=0.0, allow_nan=False, width=32)


@st.composite
def _rl_inputs(draw: st.DrawFn) -> tuple[list[float], list[float], list[float], list[float]]:
    n = draw(st.integers(min_value=1, max_value=12))
    lp = draw(st.lists(_vals, min_size=n, max_size=n))
    # Sampler logprobs near the learner's, so that ratios straddle the clip thresholds and the cap.
    noise = draw(st.lists(st.floats(min_value=-1.0, max_value=1.0, width=32), min_size=n, max_size=n))
    q = _f32([x + d for x, d in zip(lp, noise, strict=True)])
    a = _f32(draw(st.lists(st.floats(min_value=-2.0, max_value=2.0, width=32), min_size=n, max_size=n)))
    m = [float(v) for v in draw(st.lists(st.sampled_from([0, 1]), min_size=n, max_size=n))]
    return lp, q, a, m


@settings(max_examples=200, deadline=None)
@given(
    data=_rl_inputs(),
    bounds=st.tuples(st.floats(0.5, 0.99), st.floats(1.01, 1.6)),
)
def test_gspo_matches_the_reference_value_and_gradient(
    data: tuple[list[float], list[float], list[float], list[float]], bounds: tuple[float, float]
) -> None:
    lp, q, a, m = data
    lo, hi = bounds
    if sum(m):  # the clip's kinks are a null set: stay off them (autograd splits ties there)
        s = math.exp(sum(mi * (x - y) for x, y, mi in zip(lp, q, m, strict=True)) / sum(m))
        assume(abs(s - lo) > 1e-6 and abs(s - hi) > 1e-6)
    inputs = {
        "logprobs": np.asarray(q, np.float32),
        "advantages": np.asarray(a, np.float32),
        "sequence_ratio_mask": np.asarray(m, np.float32),
    }
    value, grad = _ours("gspo", lp, inputs, {"clip_low_threshold": lo, "clip_high_threshold": hi})
    assert value == pytest.approx(_gspo_ref(lp, q, a, m, lo, hi), rel=1e-9, abs=1e-9)
    expected = _gspo_grad_ref(lp, q, a, m, lo, hi)
    np.testing.assert_allclose(grad, expected, rtol=1e-9, atol=1e-9)


def test_gspo_gradient_is_per_token_not_the_sequence_level_derivative() -> None:
    """GSPO-token: ∂/∂lp_t = −m_t·A_t·s (not −s·Σ_u m_u A_u / Σ m, which a plain sequence ratio gives)."""
    lp, q, a, m = [-1.0, -2.0, -0.5], [-1.1, -1.9, -0.5], [1.0, -1.0, 0.5], [1.0, 1.0, 0.0]
    inputs = {
        "logprobs": np.asarray(q, np.float32),
        "advantages": np.asarray(a, np.float32),
        "sequence_ratio_mask": np.asarray(m, np.float32),
    }
    _, grad = _ours("gspo", lp, inputs, {"clip_low_threshold": 0.5, "clip_high_threshold": 2.0})
    s = math.exp(((-1.0 - float(np.float32(-1.1))) + (-2.0 - float(np.float32(-1.9)))) / 2)
    np.testing.assert_allclose(grad, [-1.0 * s, 1.0 * s, 0.0], rtol=1e-6)


@settings(max_examples=200, deadline=None)
@given(
    data=_rl_inputs(),
    cap=st.floats(0.5, 3.0),
    kl=st.sampled_from([0.0, 0.01, 0.5]),
)
def test_stable_reinforce_matches_the_reference_value_and_gradient(
    data: tuple[list[float], list[float], list[float], list[float]], cap: float, kl: float
) -> None:
    lp, q, a, m = data
    inputs = {
        "logprobs": np.asarray(q, np.float32),
        "advantages": np.asarray(a, np.float32),
        "sampled_mask": np.asarray(m, np.float32),
    }
    value, grad = _ours("stable_reinforce", lp, inputs, {"ratio_cap": cap, "kl_coeff": kl})
    ref_value, ref_grad = _sr_ref(lp, q, a, m, cap, kl)
    assert value == pytest.approx(ref_value, rel=1e-9, abs=1e-9)
    np.testing.assert_allclose(grad, ref_grad, rtol=1e-9, atol=1e-9)


def test_stable_reinforce_gradient_agrees_with_finite_differences_of_the_surrogate() -> None:
    """Away from the cap, the closed form is the derivative of the reference with the weight frozen."""
    rng = np.random.default_rng(3)
    lp = [float(x) for x in rng.uniform(-3, -0.1, size=9)]
    q = _f32([x + float(d) for x, d in zip(lp, rng.uniform(-0.3, 0.3, size=9), strict=True)])
    a = _f32([float(x) for x in rng.normal(size=9)])
    m = [0.0, 0.0, 1.0, 1.0, 1.0, 1.0, 0.0, 1.0, 1.0]
    cap, kl = 10.0, 0.2  # the cap is not reached: min(r, C) = r, frozen in the surrogate
    weights = [math.exp(x - y) for x, y in zip(lp, q, strict=True)]

    def surrogate(x: list[float]) -> float:
        total = 0.0
        for xi, yi, ai, mi, wi in zip(x, q, a, m, weights, strict=True):
            if mi:
                total += -wi * xi * ai + kl * (math.exp(xi - yi) - 1.0 - (xi - yi))
        return total

    inputs = {
        "logprobs": np.asarray(q, np.float32),
        "advantages": np.asarray(a, np.float32),
        "sampled_mask": np.asarray(m, np.float32),
    }
    _, grad = _ours("stable_reinforce", lp, inputs, {"ratio_cap": cap, "kl_coeff": kl})
    np.testing.assert_allclose(grad, _finite_difference(surrogate, lp), rtol=1e-5, atol=1e-7)


def test_gspo_gradient_agrees_with_finite_differences_inside_the_clip_range() -> None:
    lp = [-1.0, -1.5, -0.7, -2.0]
    q = _f32([-1.05, -1.45, -0.72, -2.01])
    a = _f32([0.5, -0.25, 1.0, 2.0])
    m = [1.0, 1.0, 0.0, 1.0]
    lo, hi = 0.5, 2.0
    # Inside [lo, hi] the GSPO-token surrogate Σ −m_t A_t s · exp(lp_t − sg(lp_t)) has, at the
    # current point, the derivative of f(x) = −Σ m_t A_t s(x_frozen)·exp(x_t − lp_t).
    s0 = math.exp(sum(mi * (x - y) for x, y, mi in zip(lp, q, m, strict=True)) / sum(m))

    def surrogate(x: list[float]) -> float:
        return -sum(mi * ai * s0 * math.exp(xi - li) for xi, li, ai, mi in zip(x, lp, a, m, strict=True))

    inputs = {
        "logprobs": np.asarray(q, np.float32),
        "advantages": np.asarray(a, np.float32),
        "sequence_ratio_mask": np.asarray(m, np.float32),
    }
    _, grad = _ours("gspo", lp, inputs, {"clip_low_threshold": lo, "clip_high_threshold": hi})
    np.testing.assert_allclose(grad, _finite_difference(surrogate, lp), rtol=1e-6, atol=1e-8)


@pytest.mark.parametrize(
    ("loss_fn", "config", "inputs", "message"),
    [
        ("gspo", {}, {"sequence_ratio_mask": [0.5, 1.0]}, "only 0 and 1"),
        ("gspo", {"beta": 1.0}, {}, "not used by gspo"),
        ("gspo", {}, {"clip_low_threshold": [0.8, 0.8]}, "not used by gspo"),
        ("stable_reinforce", {"kl_coeff": -1.0}, {}, "kl_coeff"),
        ("stable_reinforce", {"ratio_cap": 0.0}, {}, "ratio_cap"),
        ("stable_reinforce", {"clip_low_threshold": 0.8}, {}, "not used by stable_reinforce"),
        ("stable_reinforce", {}, {"sampled_mask": [2.0, 1.0]}, "only 0 and 1"),
    ],
)
def test_bad_inputs_and_config_are_refused(
    loss_fn: str, config: dict[str, float], inputs: dict[str, list[float]], message: str
) -> None:
    base: dict[str, np.ndarray] = {
        "target_tokens": np.zeros(2, np.int64),
        "logprobs": np.zeros(2, np.float32),
        "advantages": np.ones(2, np.float32),
        ("sequence_ratio_mask" if loss_fn == "gspo" else "sampled_mask"): np.ones(2, np.float32),
    }
    base.update({k: np.asarray(v, np.float32) for k, v in inputs.items()})
    with pytest.raises(InvalidRequestError, match=message):
        validate_config(loss_fn, config)
        validate_loss_inputs(loss_fn, base, length=2, vocab_size=10, index=0)


# --------------------------------------------------------------------------- through a session


@pytest.fixture(scope="module")
def session(tiny_model_dir: pathlib.Path) -> LoraTrainingSession:
    return runtime_session(tiny_model_dir, None)


def _true_logprobs(model: object, tokens: list[int], targets: np.ndarray) -> list[float]:
    assert callable(model)
    with torch.no_grad():
        logits = model(input_ids=torch.tensor([tokens])).logits[0].to(torch.float64)
    logp = torch.log_softmax(logits, dim=-1)
    return [float(logp[t, int(targets[t])]) for t in range(len(tokens))]


@pytest.mark.parametrize("loss_fn", ["gspo", "stable_reinforce"])
def test_session_forward_matches_the_reference_on_the_model(
    session: LoraTrainingSession, loss_fn: str
) -> None:
    rng = np.random.default_rng(7)
    vocab = session.model.config.vocab_size
    data, expected = [], 0.0
    for n in (6, 4, 9):
        tokens = [int(x) for x in rng.integers(1, 500, size=n)]
        targets = rng.integers(0, vocab, size=n).astype(np.int64)
        lp = _true_logprobs(session.model, tokens, targets)
        q = _f32([x + float(d) for x, d in zip(lp, rng.uniform(-0.4, 0.4, size=n), strict=True)])
        a = _f32([float(x) for x in rng.normal(size=n)])
        m = [0.0] * 2 + [1.0] * (n - 2)
        mask_key = "sequence_ratio_mask" if loss_fn == "gspo" else "sampled_mask"
        inputs = {
            "target_tokens": targets,
            "logprobs": np.asarray(q, np.float32),
            "advantages": np.asarray(a, np.float32),
            mask_key: np.asarray(m, np.float32),
        }
        data.append(Datum(model_input=tokens, loss_fn_inputs=inputs))
        if loss_fn == "gspo":
            expected += _gspo_ref(lp, q, a, m, 0.8, 1.2)
        else:
            expected += _sr_ref(lp, q, a, m, 2.0, 0.1)[0]
    config = {"kl_coeff": 0.1} if loss_fn == "stable_reinforce" else None
    out = session.forward(data, loss_fn, loss_fn_config=config)
    assert out.metrics["loss:sum"] == pytest.approx(expected, rel=1e-4, abs=1e-4)
