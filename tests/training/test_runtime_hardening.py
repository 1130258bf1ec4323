"""Attacks on the runtime's privacy accounting by the party that sends the requests.

Each test performs what an adversarial client would try and checks that it is refused or
accounted for: repeating a privacy unit within one step, leaving partial clipped sums behind
with a failing request, redrawing a Poisson batch through a reload, rewinding the budget by
reloading an earlier state, and steering the noise with its own seed.
"""

from __future__ import annotations

import pathlib
from typing import Any

import numpy as np
import pytest
import torch

from tensafe.privacy import DpSgdEvent, compute_epsilon
from tensafe.training.runtime import (
    BudgetExceededError,
    Datum,
    InvalidRequestError,
    LoraTrainingSession,
    SessionStateError,
)
from training._dp_helpers import ZeroNoise
from training._runtime_helpers import ADAM, capture_grads, runtime_data, runtime_policy, runtime_session


def _reweighted(d: Datum, factor: float) -> Datum:
    inputs = dict(d.loss_fn_inputs)
    inputs["weights"] = np.asarray(inputs["weights"], dtype=np.float32) * factor
    return Datum(model_input=list(d.model_input), loss_fn_inputs=inputs)


# ---------------------------------------------------------------- one privacy unit, once per step


def test_duplicate_datum_within_one_request_is_refused(tiny_model_dir: pathlib.Path) -> None:
    s = runtime_session(tiny_model_dir, runtime_policy())
    a, b = runtime_data(2)
    with pytest.raises(InvalidRequestError, match="datum 2 repeats the tokens and targets of datum 0"):
        s.forward_backward([a, b, a], "cross_entropy")
    # Different weights do not make it another privacy unit.
    with pytest.raises(InvalidRequestError, match="datum 1 repeats"):
        s.forward_backward([a, _reweighted(a, 3.0)], "cross_entropy")
    s.forward_backward([a, b], "cross_entropy")  # nothing of the refused requests remained


def test_duplicate_datum_across_requests_of_one_step_is_refused(tiny_model_dir: pathlib.Path) -> None:
    s = runtime_session(tiny_model_dir, runtime_policy())
    a, b, c = runtime_data(3)
    s.forward_backward([a, b], "cross_entropy")
    with pytest.raises(InvalidRequestError, match="earlier forward_backward of this optimizer step"):
        s.forward_backward([c, _reweighted(b, 0.5)], "cross_entropy")
    s.forward_backward([c], "cross_entropy")  # c was not consumed by the refused request
    s.optim_step(ADAM)
    s.forward_backward([a, b, c], "cross_entropy")  # a new step: each unit may contribute again
    s.optim_step(ADAM)


def test_sensitivity_per_step_is_one_clip_norm(
    tiny_model_dir: pathlib.Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The gradient sum of a step changes by at most C when one privacy unit is removed: the
    duplicate that would have doubled its influence never gets in."""
    data = runtime_data(4, seed=9)
    grads: list[list[torch.Tensor]] = []
    for batch in (data, data[1:]):
        s = runtime_session(tiny_model_dir, runtime_policy())
        s._dp.engine.random_source = ZeroNoise()  # type: ignore[union-attr]
        seen = capture_grads(s, monkeypatch)
        s.forward_backward(batch[:2], "cross_entropy")
        with pytest.raises(InvalidRequestError):
            s.forward_backward([*batch[2:], batch[0]], "cross_entropy")  # the attack: batch[0] again
        s.forward_backward(batch[2:], "cross_entropy")
        s.optim_step(ADAM)
        grads.append(seen[0])
    diff = torch.sqrt(sum((((a - b).double() * 4) ** 2).sum() for a, b in zip(*grads, strict=True)))
    assert float(diff) <= 0.05 * (1 + 1e-4)  # ≤ C, times the normaliser B = 4 undone above


# ---------------------------------------------------------------- atomic requests


def test_failed_request_leaves_no_partial_clipped_sum(
    tiny_model_dir: pathlib.Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    good, later = runtime_data(6, seed=1), runtime_data(2, seed=2)
    reference = runtime_session(tiny_model_dir, runtime_policy(), max_microbatch_size=2)
    reference._dp.engine.random_source = ZeroNoise()  # type: ignore[union-attr]
    ref_grads = capture_grads(reference, monkeypatch)
    reference.forward_backward(later, "cross_entropy")
    reference.optim_step(ADAM)

    s = runtime_session(tiny_model_dir, runtime_policy(), max_microbatch_size=2)
    s._dp.engine.random_source = ZeroNoise()  # type: ignore[union-attr]
    got = capture_grads(s, monkeypatch)
    original = s._micro_losses
    calls = {"n": 0}

    def flaky(*args: Any, **kwargs: Any) -> Any:
        calls["n"] += 1
        if calls["n"] == 3:  # the third micro-batch of the request fails, after two were clipped
            raise RuntimeError("simulated failure in the middle of a request")
        return original(*args, **kwargs)

    monkeypatch.setattr(s, "_micro_losses", flaky)
    with pytest.raises(RuntimeError, match="simulated"):
        s.forward_backward(good, "cross_entropy")
    monkeypatch.setattr(s, "_micro_losses", original)
    assert s._dp.engine.pending_examples == 0  # type: ignore[union-attr]
    # A request with a good datum before a bad one: refused before anything is computed.
    bad = Datum(model_input=[1, 2, 10**9], loss_fn_inputs=dict(good[0].loss_fn_inputs))
    with pytest.raises(InvalidRequestError):
        s.forward_backward([good[0], bad], "cross_entropy")
    s.forward_backward(later, "cross_entropy")
    metrics = s.optim_step(ADAM)
    assert metrics["examples:sum"] == 2.0
    for a, b in zip(got[0], ref_grads[0], strict=True):
        assert torch.equal(a, b)
    # The datums of the failed request were not counted as used in that step either.
    s.forward_backward(good, "cross_entropy")


def test_staged_request_commits_or_vanishes(
    tiny_model_dir: pathlib.Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    data = runtime_data(3, seed=5)
    runs: list[list[torch.Tensor]] = []
    for mode in ("direct", "staged-commit", "discard-then-direct"):
        s = runtime_session(tiny_model_dir, runtime_policy())
        s._dp.engine.random_source = ZeroNoise()  # type: ignore[union-attr]
        seen = capture_grads(s, monkeypatch)
        if mode == "direct":
            s.forward_backward(data, "cross_entropy")
        elif mode == "staged-commit":
            staged = s.stage_forward_backward(data, "cross_entropy")
            with pytest.raises(SessionStateError, match="staged"):
                s.optim_step(ADAM)
            staged.commit()
        else:
            s.stage_forward_backward(data, "cross_entropy").discard()
            s.forward_backward(data, "cross_entropy")  # not a duplicate: the discarded one left nothing
        s.optim_step(ADAM)
        runs.append(seen[0])
    for other in runs[1:]:
        assert all(torch.equal(a, b) for a, b in zip(runs[0], other, strict=True))


def test_non_private_request_is_atomic_too(
    tiny_model_dir: pathlib.Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    s = LoraTrainingSession.create(
        base_model=str(tiny_model_dir), rank=2, dp=None, allow_non_private=True, max_microbatch_size=1
    )
    s.forward_backward(runtime_data(1, seed=3), "cross_entropy")
    before = [None if p.grad is None else p.grad.clone() for p in s.model.parameters() if p.requires_grad]
    original = s._micro_losses
    calls = {"n": 0}

    def flaky(*args: Any, **kwargs: Any) -> Any:
        calls["n"] += 1
        if calls["n"] == 2:
            raise RuntimeError("boom")
        return original(*args, **kwargs)

    monkeypatch.setattr(s, "_micro_losses", flaky)
    with pytest.raises(RuntimeError):
        s.forward_backward(runtime_data(3, seed=4), "cross_entropy")
    after = [None if p.grad is None else p.grad for p in s.model.parameters() if p.requires_grad]
    for a, b in zip(before, after, strict=True):
        assert (a is None and b is None) or torch.equal(a, b)  # type: ignore[arg-type]


# ---------------------------------------------------------------- budget outside the restorable state


def test_sync_privacy_continues_from_the_ledger_total(tiny_model_dir: pathlib.Path) -> None:
    """A session restored from an early state, then told what the ledger holds, spends from the
    total: reloading an earlier state does not rewind the budget."""
    sigma, delta = 4.0, 1e-5
    policy = runtime_policy(
        noise_multiplier=sigma,
        target_epsilon=compute_epsilon(
            accountant="rdp", noise_multiplier=sigma, sample_rate=1.0, steps=5, delta=delta
        )
        * (1 + 1e-9),
    )
    s = runtime_session(tiny_model_dir, policy)
    s.forward_backward(runtime_data(2), "cross_entropy")
    s.optim_step(ADAM)
    early = s.state_bytes(include_optimizer=True)
    restored = LoraTrainingSession.from_state_bytes(early, deterministic=True)
    assert restored.privacy_spent()["steps"] == 1  # what the state alone says
    ledger = [DpSgdEvent(noise_multiplier=sigma, sample_rate=1.0, steps=4)]  # other runs spent 3 more
    restored.sync_privacy(ledger)
    assert restored.step_event() == DpSgdEvent(noise_multiplier=sigma, sample_rate=1.0, steps=1)
    restored.forward_backward(runtime_data(2, seed=1), "cross_entropy")
    metrics = restored.optim_step(ADAM)  # the 5th step on this data: the last one the budget allows
    assert metrics["dp_epsilon:max"] == pytest.approx(
        compute_epsilon(accountant="rdp", noise_multiplier=sigma, sample_rate=1.0, steps=5, delta=delta)
    )
    restored.forward_backward(runtime_data(2, seed=2), "cross_entropy")
    with pytest.raises(BudgetExceededError, match="step 6"):
        restored.optim_step(ADAM)
    cert = restored.privacy_certificate()
    assert cert.steps == 5 and cert.events == ({"noise_multiplier": sigma, "sample_rate": 1.0, "steps": 5},)


def test_sync_privacy_composes_other_mechanisms(tiny_model_dir: pathlib.Path) -> None:
    from dp_accounting import dp_event, rdp

    s = LoraTrainingSession.create(
        base_model=str(tiny_model_dir), rank=2, dp=runtime_policy(noise_multiplier=3.0)
    )
    s.sync_privacy([DpSgdEvent(noise_multiplier=1.5, sample_rate=0.01, steps=40)])
    s.forward_backward(runtime_data(2), "cross_entropy")
    s.optim_step(ADAM)
    cert = s.privacy_certificate()
    oracle = rdp.RdpAccountant()
    oracle.compose(dp_event.PoissonSampledDpEvent(0.01, dp_event.GaussianDpEvent(1.5)), 40)
    oracle.compose(dp_event.GaussianDpEvent(3.0), 1)
    assert cert.epsilon == pytest.approx(oracle.get_epsilon(1e-5), rel=1e-9)
    assert cert.steps == 41 and len(cert.events) == 2


# ---------------------------------------------------------------- the drawn Poisson batch is durable


def test_drawn_batch_survives_a_reload(tiny_model_dir: pathlib.Path) -> None:
    policy = runtime_policy(sampling="server_poisson", dataset_size=None, expected_batch_size=10)
    s = runtime_session(tiny_model_dir, policy)
    s.register_dataset(runtime_data(30, seed=6))
    batch = s.sample_batch()
    drawn = s.drawn_indices()
    assert drawn is not None and [tuple(d.model_input) for d in batch] == [
        tuple(s._dataset[i].model_input)
        for i in drawn  # type: ignore[index]
    ]
    restored = LoraTrainingSession.from_state_bytes(s.state_bytes(include_optimizer=True), deterministic=True)
    assert restored.drawn_indices() == drawn
    assert [tuple(d.model_input) for d in restored.sample_batch()] == [tuple(d.model_input) for d in batch]
    # An explicit restore of another batch for the same step is refused.
    other = [i for i in range(30) if i not in drawn][:2]
    with pytest.raises(SessionStateError, match="another batch is already drawn"):
        restored.restore_draw(other)


def test_register_dataset_refuses_duplicate_units(tiny_model_dir: pathlib.Path) -> None:
    policy = runtime_policy(sampling="server_poisson", dataset_size=None, expected_batch_size=2)
    s = runtime_session(tiny_model_dir, policy)
    data = runtime_data(5, seed=2)
    with pytest.raises(InvalidRequestError, match="example 5 repeats the tokens and targets of example 1"):
        s.register_dataset([*data, _reweighted(data[1], 2.0)])


# ---------------------------------------------------------------- noise never from the client's seed


def test_deterministic_noise_comes_from_the_noise_seed_not_the_init_seed(
    tiny_model_dir: pathlib.Path,
) -> None:
    def noise(seed: int, noise_seed: int | None) -> torch.Tensor:
        s = LoraTrainingSession.create(
            base_model=str(tiny_model_dir),
            rank=2,
            dp=runtime_policy(),
            seed=seed,
            deterministic=True,
            noise_seed=noise_seed,
        )
        return s._dp.source.standard_normal(16, step=0)  # type: ignore[union-attr]

    assert torch.equal(noise(1, 5), noise(2, 5))  # the LoRA seed (a client's choice) does not matter
    assert not torch.equal(noise(1, 5), noise(1, 6))
    assert torch.equal(noise(1, None), noise(7, 0))  # no noise seed: 0, whatever the client sent
