"""DP-SGD noise scale, random sources, TS_DETERMINISTIC and Poisson sampling."""

from __future__ import annotations

import logging

import pytest
import torch
from scipy import stats as sps
from torch import nn

from tensafe.training.dp import (
    DETERMINISTIC_ENV,
    DPConfig,
    DPConfigError,
    DPGradientEngine,
    PoissonSampler,
    deterministic_random_source,
    random_source_from_env,
    secure_random_source,
    split_microbatches,
)
from training._dp_helpers import make_batch, per_example_loss, tiny_lora_llama


def _wide_model() -> nn.Module:
    model = nn.Linear(500, 401)  # 200,901 trainable entries in one step
    return model


def _grads(model: nn.Module) -> torch.Tensor:
    return torch.cat([p.grad.reshape(-1) for p in model.parameters()])


@pytest.mark.parametrize("source", ["secure", "deterministic"])
def test_noise_has_the_stated_scale(source):
    rs = secure_random_source() if source == "secure" else deterministic_random_source(7)
    model = _wide_model()
    sigma, clip, expected = 1.3, 0.7, 25.0
    engine = DPGradientEngine(
        model, clip_norm=clip, noise_multiplier=sigma, expected_batch_size=expected, random_source=rs
    )
    stats = engine.finalize_step()  # an empty logical batch: pure noise
    g = _grads(model).double()
    target = sigma * clip / expected
    assert stats.noise_std == pytest.approx(target)
    assert g.numel() > 200_000
    assert float(g.std()) == pytest.approx(target, rel=0.02)
    assert abs(float(g.mean())) < 5 * target / g.numel() ** 0.5
    # Shape of the distribution, not only its moments (fails for e.g. uniform noise).
    assert sps.kstest((g / target).numpy(), "norm").pvalue > 1e-4


def test_noise_added_once_per_logical_step_not_per_microbatch():
    model = tiny_lora_llama()
    ids, mask, labels = make_batch([6, 5, 7, 4], [1, 1, 2, 1])
    sigma, clip, expected = 2.0, 1e-6, 4.0  # all clipped: the signal is negligible
    spread = []
    for micro in (4, 1):
        engine = DPGradientEngine(
            model,
            clip_norm=clip,
            noise_multiplier=sigma,
            expected_batch_size=expected,
            random_source=secure_random_source(),
        )
        for lo in range(0, 4, micro):
            engine.accumulate(
                per_example_loss(model, ids[lo : lo + micro], mask[lo : lo + micro], labels[lo : lo + micro])
            )
        engine.finalize_step()
        engine.close()
        spread.append(
            float(torch.cat([p.grad.reshape(-1) for p in model.parameters() if p.requires_grad]).std())
        )
    for s in spread:
        assert s == pytest.approx(sigma * clip / expected, rel=0.1)


def test_secure_source_differs_run_to_run():
    a = secure_random_source().standard_normal(1000, step=0)
    b = secure_random_source().standard_normal(1000, step=0)
    assert not torch.equal(a, b)
    assert secure_random_source().secure is True


def test_deterministic_source_is_reproducible_and_separates_steps():
    a = deterministic_random_source(3).standard_normal(1001, step=5)
    b = deterministic_random_source(3).standard_normal(1001, step=5)
    c = deterministic_random_source(3).standard_normal(1001, step=6)
    d = deterministic_random_source(4).standard_normal(1001, step=5)
    assert torch.equal(a, b)
    assert not torch.equal(a, c)
    assert not torch.equal(a, d)
    assert a.shape == (1001,)
    assert "seed" not in repr(deterministic_random_source(3)).lower().replace("deterministic", "")


def _run_once(model_seed: int) -> tuple[list[list[int]], torch.Tensor]:
    model = nn.Linear(8, 8)
    engine, sampler = DPConfig(
        noise_multiplier=1.0, clip_norm=1.0, sample_rate=0.3, dataset_size=50, seed=11
    ).build(model)
    batches = [sampler.sample(step) for step in range(5)]
    engine.finalize_step()
    return batches, model.weight.grad.clone()


def test_ts_deterministic_reproduces_and_warns(monkeypatch, caplog):
    monkeypatch.setenv(DETERMINISTIC_ENV, "1")
    with caplog.at_level(logging.WARNING, logger="tensafe.training.dp"):
        first = _run_once(0)
        second = _run_once(1)
    assert first[0] == second[0]
    assert torch.equal(first[1], second[1])
    warnings = [
        r for r in caplog.records if r.levelno == logging.WARNING and "DETERMINISTIC" in r.getMessage()
    ]
    assert warnings and "NO differential-privacy guarantee" in warnings[0].getMessage()


def test_default_mode_differs_run_to_run(monkeypatch, caplog):
    monkeypatch.delenv(DETERMINISTIC_ENV, raising=False)
    with caplog.at_level(logging.WARNING, logger="tensafe.training.dp"):
        first = _run_once(0)
        second = _run_once(0)
    assert first[0] != second[0]
    assert not torch.equal(first[1], second[1])
    assert not [r for r in caplog.records if "DETERMINISTIC" in r.getMessage()]


def test_secure_rng_false_is_also_loud(monkeypatch, caplog):
    monkeypatch.delenv(DETERMINISTIC_ENV, raising=False)
    with caplog.at_level(logging.WARNING, logger="tensafe.training.dp"):
        source = random_source_from_env(seed=None, secure_rng=False)
    assert source.secure is False
    assert any("secure_rng=False" in r.getMessage() for r in caplog.records)


@pytest.mark.parametrize("value", ["yes", "2", "true"])
def test_invalid_ts_deterministic_value_is_refused(monkeypatch, value):
    monkeypatch.setenv(DETERMINISTIC_ENV, value)
    with pytest.raises(DPConfigError, match=DETERMINISTIC_ENV):
        random_source_from_env(seed=1)


@pytest.mark.parametrize("source", ["secure", "deterministic"])
def test_poisson_inclusion_rate(source):
    rs = secure_random_source() if source == "secure" else deterministic_random_source(1)
    n, q, steps = 5000, 0.05, 40
    sampler = PoissonSampler(n, sample_rate=q, random_source=rs)
    counts = torch.zeros(n)
    sizes = []
    for batch in sampler.iter_steps(0, steps):
        assert batch == sorted(set(batch))
        assert all(0 <= i < n for i in batch)
        counts[batch] += 1
        sizes.append(len(batch))
    rate = float(counts.sum()) / (n * steps)
    assert rate == pytest.approx(q, rel=0.05)
    assert len(set(sizes)) > 1  # batch sizes vary, as Poisson sampling must
    assert sampler.expected_batch_size == pytest.approx(250.0)


def test_empty_batches_are_produced_and_still_take_a_noisy_step():
    sampler = PoissonSampler(10, sample_rate=0.05, random_source=secure_random_source())
    model = nn.Linear(4, 3)
    engine = DPGradientEngine(model, clip_norm=1.0, noise_multiplier=1.0, expected_batch_size=0.5)
    empties = 0
    for step in range(60):
        batch = sampler.sample(step)
        micro = split_microbatches(batch, 4)
        if not batch:
            empties += 1
            assert micro == []
        x = torch.randn(len(batch), 4)
        for m in micro:
            engine.accumulate(model(x[: len(m)]).pow(2).sum(dim=1))
        stats = engine.finalize_step()
        assert stats.step == step
        assert stats.num_examples == len(batch)
        assert model.weight.grad is not None and bool(model.weight.grad.ne(0).all())
    assert empties > 0
    assert engine.step == 60


def test_full_sample_rate_takes_everyone():
    assert PoissonSampler(7, sample_rate=1.0).sample(0) == list(range(7))


def test_split_microbatches():
    assert split_microbatches(list(range(7)), 3) == [[0, 1, 2], [3, 4, 5], [6]]
    assert split_microbatches([], 3) == []
    with pytest.raises(DPConfigError):
        split_microbatches([1], 0)


@pytest.mark.parametrize(
    "kwargs",
    [
        {"sample_rate": 0.0},
        {"sample_rate": 1.5},
        {"sample_rate": float("nan")},
        {"noise_multiplier": 0.0},
        {"noise_multiplier": -1.0},
        {"clip_norm": 0.0},
        {"dataset_size": 0},
        {"max_microbatch_size": 0},
        {"seed": -3},
    ],
)
def test_invalid_config_is_refused(kwargs):
    base = {"noise_multiplier": 1.0, "clip_norm": 1.0, "sample_rate": 0.1, "dataset_size": 100}
    with pytest.raises(DPConfigError):
        DPConfig(**(base | kwargs))


def test_config_is_keyword_only_and_derives_expected_batch_size():
    with pytest.raises(TypeError):
        DPConfig(1.0, 1.0, 0.1, 100)  # type: ignore[misc]
    cfg = DPConfig(noise_multiplier=1.0, clip_norm=1.0, sample_rate=0.02, dataset_size=1000)
    assert cfg.expected_batch_size == pytest.approx(20.0)


@pytest.mark.parametrize("bad", [{"n": 0}, {"sample_rate": 0.0}, {"sample_rate": 2.0}])
def test_invalid_sampler_is_refused(bad):
    args = {"n": 10, "sample_rate": 0.5} | bad
    with pytest.raises(DPConfigError):
        PoissonSampler(args.pop("n"), **args)
