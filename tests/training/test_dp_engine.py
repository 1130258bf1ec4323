"""DP-SGD engine: clipped per-example gradient sums against a naive per-example loop."""

from __future__ import annotations

import pytest
import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from torch import nn

from tensafe.training.dp import DPError, DPGradientEngine, UnsupportedParameterError
from tensafe.training.errors import TrainingError
from training._dp_helpers import (
    ZeroNoise,
    flat_grads,
    make_batch,
    naive_clipped_sum,
    per_example_loss,
    tiny_lora_llama,
    trainable,
)

LENGTHS = [9, 4, 12, 6]
PROMPTS = [3, 1, 5, 2]


def _engine_sum(model, batches, clip, expected=1.0):
    engine = DPGradientEngine(
        model, clip_norm=clip, noise_multiplier=1.0, expected_batch_size=expected, random_source=ZeroNoise()
    )
    norms = []
    for batch in batches:
        norms.append(engine.accumulate(per_example_loss(model, *batch)).grad_norms)
    stats = engine.finalize_step()
    engine.close()
    return flat_grads(model) * expected, torch.cat(norms), stats


@pytest.mark.parametrize("clip", [6.0, 1e6, 1e-4], ids=["some-clipped", "none-clipped", "all-clipped"])
def test_clipped_sum_matches_naive_loop(clip):
    model = tiny_lora_llama()
    batch = make_batch(LENGTHS, PROMPTS)
    oracle, oracle_norms = naive_clipped_sum(model, batch, clip)
    got, norms, stats = _engine_sum(model, [batch], clip)
    torch.testing.assert_close(norms.double(), oracle_norms, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(got, oracle, rtol=1e-5, atol=1e-5)
    assert stats.num_examples == len(LENGTHS)
    assert stats.num_clipped == int((oracle_norms > clip).sum())
    if clip == 6.0:  # the parametrisation really exercises a mix
        assert 0 < stats.num_clipped < len(LENGTHS)


def test_no_clipping_equals_plain_batch_gradient():
    model = tiny_lora_llama()
    batch = make_batch(LENGTHS, PROMPTS)
    per_example_loss(model, *batch).sum().backward()
    plain = flat_grads(model)
    model.zero_grad(set_to_none=True)
    got, _, _ = _engine_sum(model, [batch], clip=1e9)
    torch.testing.assert_close(got, plain, rtol=1e-5, atol=1e-5)


def test_all_clipped_sum_has_norm_at_most_b_times_c():
    model = tiny_lora_llama()
    batch = make_batch(LENGTHS, PROMPTS)
    got, norms, stats = _engine_sum(model, [batch], clip=1e-3)
    assert stats.num_clipped == len(LENGTHS)
    assert bool((norms > 1e-3).all())
    assert float(got.norm()) <= len(LENGTHS) * 1e-3 * (1 + 1e-5)


def test_padding_contributes_nothing():
    model = tiny_lora_llama()
    base, _, _ = _engine_sum(model, [make_batch(LENGTHS, PROMPTS)], clip=6.0)
    padded, _, _ = _engine_sum(model, [make_batch(LENGTHS, PROMPTS, extra_pad=7)], clip=6.0)
    torch.testing.assert_close(padded, base, rtol=1e-5, atol=1e-5)


def test_microbatch_accumulation_equals_single_batch():
    model = tiny_lora_llama()
    ids, mask, labels = make_batch([*LENGTHS, 7], [*PROMPTS, 2])
    whole, _, _ = _engine_sum(model, [(ids, mask, labels)], clip=6.0, expected=3.5)
    micro = [(ids[i : i + 2], mask[i : i + 2], labels[i : i + 2]) for i in range(0, 5, 2)]
    split, _, stats = _engine_sum(model, micro, clip=6.0, expected=3.5)
    torch.testing.assert_close(split, whole, rtol=1e-5, atol=1e-5)
    assert stats.num_examples == 5


def test_normalises_by_expected_batch_size_not_realised():
    model = tiny_lora_llama()
    batch = make_batch(LENGTHS, PROMPTS)
    oracle, _ = naive_clipped_sum(model, batch, 6.0)
    engine = DPGradientEngine(
        model, clip_norm=6.0, noise_multiplier=1.0, expected_batch_size=10.0, random_source=ZeroNoise()
    )
    engine.accumulate(per_example_loss(model, *batch))
    engine.finalize_step()
    torch.testing.assert_close(flat_grads(model), oracle / 10.0, rtol=1e-5, atol=1e-7)


def test_lora_dropout_in_train_mode_is_consistent_with_autograd():
    # With dropout the per-example path cannot be replayed one example at a time, but the
    # engine's built-in cross-check (sum of per-example gradients == autograd's batch
    # gradient) must hold, and the masks must reach the gradient (it differs from eval).
    model = tiny_lora_llama(dropout=0.5)
    batch = make_batch(LENGTHS, PROMPTS)
    model.eval()
    eval_sum, _, _ = _engine_sum(model, [batch], clip=1e9)
    model.train()
    torch.manual_seed(123)
    train_sum, _, _ = _engine_sum(model, [batch], clip=1e9)
    model.zero_grad(set_to_none=True)
    torch.manual_seed(123)
    per_example_loss(model, *batch).sum().backward()
    torch.testing.assert_close(train_sum, flat_grads(model), rtol=1e-5, atol=1e-5)
    assert not torch.allclose(train_sum, eval_sum)


@settings(max_examples=8, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(
    data=st.lists(
        st.tuples(st.integers(2, 10), st.integers(0, 9)).map(lambda t: (t[0], min(t[1], t[0] - 1))),
        min_size=1,
        max_size=4,
    ),
    clip=st.sampled_from([1e-3, 3.0, 6.0, 1e6]),
    seed=st.integers(0, 3),
    extra_pad=st.integers(0, 3),
)
def test_property_matches_naive_loop(data, clip, seed, extra_pad):
    lengths = [n for n, _ in data]
    prompts = [p for _, p in data]
    model = tiny_lora_llama(seed=seed)
    batch = make_batch(lengths, prompts, seed=seed, extra_pad=extra_pad)
    oracle, oracle_norms = naive_clipped_sum(model, batch, clip)
    got, norms, _ = _engine_sum(model, [batch], clip)
    torch.testing.assert_close(norms.double(), oracle_norms, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(got, oracle, rtol=1e-5, atol=1e-5)


class _Mlp(nn.Module):
    """Trainable full Linear layers with biases, applied per token."""

    def __init__(self) -> None:
        super().__init__()
        torch.manual_seed(1)
        self.first = nn.Linear(5, 7)
        self.second = nn.Linear(7, 3)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.second(torch.tanh(self.first(x)))


def test_full_linear_with_bias_and_reused_layer_matches_naive():
    model = _Mlp()
    x = torch.randn(6, 4, 5, generator=torch.Generator().manual_seed(2))
    target = torch.randn(6, 4, 3, generator=torch.Generator().manual_seed(3))

    def loss_fn(xb, tb):
        h = model(xb)
        h = model.second(torch.tanh(model.first(xb))) + h  # the same layers used twice
        return (h - tb).pow(2).sum(dim=(1, 2))

    params = trainable(model)
    oracle = torch.zeros(sum(p.numel() for p in params), dtype=torch.float64)
    for i in range(6):
        grads = torch.autograd.grad(loss_fn(x[i : i + 1], target[i : i + 1]).sum(), params)
        flat = torch.cat([g.reshape(-1) for g in grads]).double()
        oracle += flat * min(1.0, 0.7 / (float(flat.norm()) + 1e-6))
    engine = DPGradientEngine(
        model, clip_norm=0.7, noise_multiplier=1.0, expected_batch_size=1.0, random_source=ZeroNoise()
    )
    engine.accumulate(loss_fn(x, target))
    engine.finalize_step()
    torch.testing.assert_close(flat_grads(model), oracle, rtol=1e-5, atol=1e-5)


def test_trainable_embedding_is_refused_by_name():
    model = tiny_lora_llama()
    model.get_input_embeddings().weight.requires_grad_(True)
    with pytest.raises(UnsupportedParameterError, match="embed_tokens") as info:
        DPGradientEngine(model, clip_norm=1.0, noise_multiplier=1.0, expected_batch_size=4.0)
    assert isinstance(info.value, TrainingError)


def test_trainable_norm_weight_is_refused_by_name():
    model = tiny_lora_llama()
    norm = model.base_model.model.model.norm
    norm.weight.requires_grad_(True)
    with pytest.raises(UnsupportedParameterError, match=r"model\.norm\.weight.*LlamaRMSNorm"):
        DPGradientEngine(model, clip_norm=1.0, noise_multiplier=1.0, expected_batch_size=4.0)


def test_functional_use_of_a_linear_weight_is_detected():
    class Sneaky(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.lin = nn.Linear(4, 4, bias=False)

        def forward(self, x: torch.Tensor) -> torch.Tensor:
            # A second use of the weight that bypasses the layer's forward (and its hooks).
            return self.lin(x) + nn.functional.linear(x, self.lin.weight)

    model = Sneaky()
    engine = DPGradientEngine(model, clip_norm=1.0, noise_multiplier=1.0, expected_batch_size=2.0)
    x = torch.randn(3, 2, 4)
    with pytest.raises(UnsupportedParameterError, match=r"lin\.weight"):
        engine.accumulate(model(x).pow(2).sum(dim=(1, 2)))


def test_batchnorm_is_refused():
    model = nn.Sequential(nn.Linear(3, 3), nn.BatchNorm1d(3))
    with pytest.raises(UnsupportedParameterError, match="BatchNorm1d"):
        DPGradientEngine(model, clip_norm=1.0, noise_multiplier=1.0, expected_batch_size=2.0)


def test_loss_must_be_a_vector():
    model = tiny_lora_llama()
    engine = DPGradientEngine(model, clip_norm=1.0, noise_multiplier=1.0, expected_batch_size=2.0)
    loss = per_example_loss(model, *make_batch([5, 6], [1, 2]))
    with pytest.raises(DPError, match=r"shape \(B,\)"):
        engine.accumulate(loss.sum())


@pytest.mark.parametrize(
    "kwargs",
    [
        {"clip_norm": 0.0},
        {"clip_norm": float("nan")},
        {"noise_multiplier": 0.0},
        {"noise_multiplier": -1.0},
        {"expected_batch_size": 0.0},
        {"expected_batch_size": float("inf")},
    ],
)
def test_invalid_engine_parameters(kwargs):
    params = {"clip_norm": 1.0, "noise_multiplier": 1.0, "expected_batch_size": 2.0} | kwargs
    with pytest.raises(DPError):
        DPGradientEngine(tiny_lora_llama(), **params)


def test_plain_backward_outside_accumulate_is_unchanged_and_close_restores():
    model = tiny_lora_llama()
    batch = make_batch(LENGTHS, PROMPTS)
    per_example_loss(model, *batch).sum().backward()
    reference = flat_grads(model)
    model.zero_grad(set_to_none=True)
    engine = DPGradientEngine(model, clip_norm=1.0, noise_multiplier=1.0, expected_batch_size=2.0)
    # A backward the engine did not start (evaluation or plain code) gets the usual
    # gradients and records nothing.
    per_example_loss(model, *batch).sum().backward()
    torch.testing.assert_close(flat_grads(model), reference, rtol=1e-5, atol=1e-6)
    assert engine.pending_examples == 0
    patched = [m for m in model.modules() if "forward" in m.__dict__]
    assert len(patched) == 2 * 7 * 2  # lora_A and lora_B of 7 projections in 2 layers
    engine.close()
    assert not [m for m in model.modules() if "forward" in m.__dict__]


def test_two_engines_on_one_model_are_refused():
    model = tiny_lora_llama()
    DPGradientEngine(model, clip_norm=1.0, noise_multiplier=1.0, expected_batch_size=2.0)
    with pytest.raises(UnsupportedParameterError, match="one DP engine per model"):
        DPGradientEngine(model, clip_norm=1.0, noise_multiplier=1.0, expected_batch_size=2.0)


def test_state_dict_round_trip_and_refusal_mid_step():
    model = tiny_lora_llama()
    engine = DPGradientEngine(model, clip_norm=1.0, noise_multiplier=1.0, expected_batch_size=2.0)
    engine.finalize_step()
    engine.finalize_step()
    assert engine.state_dict() == {"step": 2}
    other = DPGradientEngine(tiny_lora_llama(), clip_norm=1.0, noise_multiplier=1.0, expected_batch_size=2.0)
    other.load_state_dict(engine.state_dict())
    assert other.step == 2
    engine.accumulate(per_example_loss(model, *make_batch([5], [1])))
    with pytest.raises(DPError, match="middle of a logical step"):
        engine.load_state_dict({"step": 0})
    with pytest.raises(DPError, match="malformed"):
        other.load_state_dict({"step": -1})


def test_non_finite_gradient_is_refused_and_not_added():
    model = nn.Linear(3, 2)
    engine = DPGradientEngine(
        model, clip_norm=1.0, noise_multiplier=1.0, expected_batch_size=1.0, random_source=ZeroNoise()
    )
    x = torch.tensor([[1.0, 2.0, 3.0], [float("nan"), 0.0, 0.0]])
    with pytest.raises(DPError, match="not finite"):
        engine.accumulate(model(x).sum(dim=1))
    assert engine.pending_examples == 0
    engine.finalize_step()
    assert bool((model.weight.grad == 0).all())
