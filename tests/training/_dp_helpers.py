"""Helpers shared by the DP-SGD tests: a tiny LoRA Llama, padded batches, a naive oracle."""

from __future__ import annotations

import torch
from peft import LoraConfig, get_peft_model
from torch import nn
from transformers import LlamaConfig, LlamaForCausalLM

from tensafe.training.dp import CLIP_EPSILON, RandomSource
from tensafe.training.dp.rng import Purpose

VOCAB = 97
PAD = 0


def tiny_lora_llama(*, seed: int = 0, dropout: float = 0.0, targets: list[str] | None = None) -> nn.Module:
    """Hidden 32, 2 layers, LoRA r=4 on attention and MLP with random A and B."""
    config = LlamaConfig(
        vocab_size=VOCAB,
        hidden_size=32,
        intermediate_size=48,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
        max_position_embeddings=128,
        tie_word_embeddings=True,
        pad_token_id=PAD,
    )
    torch.manual_seed(seed)
    model = LlamaForCausalLM(config).to(torch.float32)
    lora = LoraConfig(
        r=4,
        lora_alpha=8,
        lora_dropout=dropout,
        target_modules=targets
        or ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"],
        init_lora_weights=False,  # random A and B, so every LoRA matrix gets a gradient
    )
    peft_model = get_peft_model(model, lora)
    peft_model.eval()
    return peft_model


def make_batch(
    lengths: list[int], prompts: list[int], *, seed: int = 0, extra_pad: int = 0
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Right-padded ids, attention mask and labels (-100 on prompt and padding)."""
    g = torch.Generator().manual_seed(seed)
    width = max(lengths) + extra_pad
    ids = torch.full((len(lengths), width), PAD, dtype=torch.long)
    mask = torch.zeros((len(lengths), width), dtype=torch.long)
    labels = torch.full((len(lengths), width), -100, dtype=torch.long)
    for i, (n, p) in enumerate(zip(lengths, prompts)):
        ids[i, :n] = torch.randint(1, VOCAB, (n,), generator=g)
        mask[i, :n] = 1
        labels[i, p:n] = ids[i, p:n]
    return ids, mask, labels


def per_example_loss(
    model: nn.Module, ids: torch.Tensor, mask: torch.Tensor, labels: torch.Tensor
) -> torch.Tensor:
    """Sum over each example's completion tokens of the next-token cross entropy, shape (B,)."""
    logits = model(input_ids=ids, attention_mask=mask).logits
    shift_logits = logits[:, :-1, :]
    shift_labels = labels[:, 1:]
    tok = nn.functional.cross_entropy(
        shift_logits.reshape(-1, shift_logits.shape[-1]),
        shift_labels.reshape(-1),
        reduction="none",
        ignore_index=-100,
    )
    return tok.view(shift_labels.shape).sum(dim=1)


def trainable(model: nn.Module) -> list[nn.Parameter]:
    return [p for p in model.parameters() if p.requires_grad]


def naive_clipped_sum(
    model: nn.Module, batch: tuple[torch.Tensor, torch.Tensor, torch.Tensor], clip: float
) -> tuple[torch.Tensor, torch.Tensor]:
    """One backward per (unpadded) example; clip its flat gradient to ``clip``; sum.

    Returns the flat clipped sum and the per-example norms.
    """
    ids, mask, labels = batch
    params = trainable(model)
    total = torch.zeros(sum(p.numel() for p in params), dtype=torch.float64)
    norms = []
    for i in range(ids.shape[0]):
        n = int(mask[i].sum())
        loss = per_example_loss(model, ids[i : i + 1, :n], mask[i : i + 1, :n], labels[i : i + 1, :n])
        grads = torch.autograd.grad(loss.sum(), params, allow_unused=True)
        flat = torch.cat(
            [(g if g is not None else torch.zeros_like(p)).reshape(-1) for g, p in zip(grads, params)]
        )
        flat = flat.to(torch.float64)
        norm = flat.norm()
        norms.append(norm)
        total += flat * min(1.0, clip / (float(norm) + CLIP_EPSILON))
    return total, torch.stack(norms)


def flat_grads(model: nn.Module) -> torch.Tensor:
    return torch.cat([p.grad.reshape(-1).to(torch.float64) for p in trainable(model)])


class ZeroNoise(RandomSource):
    """A test-only source whose Gaussian draws are all zero, exposing the clipped sum."""

    secure = False

    def random_bytes(self, n: int, *, purpose: Purpose, step: int) -> bytes:
        return bytes(n)

    def standard_normal(self, n: int, *, step: int) -> torch.Tensor:
        return torch.zeros(n, dtype=torch.float64)
