"""Helpers shared by the training-runtime tests: a DP policy, a session, datums, gradient capture."""

from __future__ import annotations

import pathlib
from typing import Any

import numpy as np
import pytest
import torch

from tensafe.privacy import DpPolicy
from tensafe.training.runtime import AdamParams, Datum, LoraTrainingSession

ADAM = AdamParams(learning_rate=1e-2)


def runtime_policy(**overrides: Any) -> DpPolicy:
    """A client-chosen-batches policy with a tiny clip norm (every datum gets clipped)."""
    values: dict[str, Any] = {
        "target_epsilon": 50.0,
        "delta": 1e-5,
        "clip_norm": 0.05,
        "noise_multiplier": 1.0,
        "dataset_size": 1000,
        "expected_batch_size": 4,
    }
    values.update(overrides)
    return DpPolicy(**values)


def runtime_session(model_dir: pathlib.Path, policy: DpPolicy | None, **kwargs: Any) -> LoraTrainingSession:
    """A rank-4 session (deterministic noise unless ``deterministic=False``) with random LoRA B."""
    kwargs.setdefault("deterministic", True)
    s = LoraTrainingSession.create(
        base_model=str(model_dir), rank=4, dp=policy, seed=3, allow_non_private=policy is None, **kwargs
    )
    g = torch.Generator().manual_seed(2)
    with torch.no_grad():
        for name, p in s.model.named_parameters():
            if p.requires_grad and "lora_B" in name:
                p.copy_(torch.randn(p.shape, generator=g) * 0.05)
    return s


def runtime_data(n: int, *, seed: int = 0) -> list[Datum]:
    """``n`` random cross-entropy datums of 3 to 6 tokens (the first target unweighted)."""
    rng = np.random.default_rng(seed)
    out = []
    for i in range(n):
        length = 3 + (i % 4)
        tokens = [int(x) for x in rng.integers(1, 300, size=length)]
        targets = np.array([*tokens[1:], int(rng.integers(1, 300))], dtype=np.int64)
        weights = np.ones(length, dtype=np.float32)
        weights[0] = 0.0
        out.append(Datum(model_input=tokens, loss_fn_inputs={"target_tokens": targets, "weights": weights}))
    return out


def trainable_weights(s: LoraTrainingSession) -> list[torch.Tensor]:
    """Copies of the session's trainable parameters."""
    return [p.detach().clone() for p in s.model.parameters() if p.requires_grad]


def capture_grads(s: LoraTrainingSession, monkeypatch: pytest.MonkeyPatch) -> list[list[torch.Tensor]]:
    """Record the gradient the optimizer receives at each step."""
    captured: list[list[torch.Tensor]] = []
    opt = s._optimizer
    original = opt.step

    def step(*args: Any, **kwargs: Any) -> Any:
        captured.append([p.grad.detach().clone() for p in s.model.parameters() if p.requires_grad])  # type: ignore[union-attr]
        return original(*args, **kwargs)

    monkeypatch.setattr(opt, "step", step)
    return captured
