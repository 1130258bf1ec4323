"""Per-example clipping, noise and normalisation for DP-SGD on (LoRA) linear layers.

The engine replaces the ``forward`` of every ``nn.Linear`` that owns a trainable parameter
with the same computation wrapped in a custom autograd function (restored by
:meth:`DPGradientEngine.close`). PEFT's LoRA adapters are such layers (``lora_A`` and
``lora_B`` are plain ``nn.Linear``), so LoRA dropout (applied to the input of ``lora_A``) and
the ``alpha / r`` scaling (applied to the output of ``lora_B``) are taken into account
automatically: the backward sees the tensor the layer actually received and the gradient
that actually reached its output.

For a linear layer ``y = x W^T + b`` applied to an example's ``T`` positions, that
example's gradient is ``sum_t g_t x_t^T`` for ``W`` and ``sum_t g_t`` for ``b``, where
``g_t`` is the gradient of the loss with respect to ``y_t``. The engine materialises these
per-example gradients (one batched matmul per layer; a ``B x r x d`` tensor for a LoRA
matrix), takes the L2 norm of each example's gradient over **all** trainable parameters
together, scales it by ``min(1, C / (norm + 1e-6))`` and adds the weighted sum to an
accumulator. Positions whose output gradient is zero (padding masked out of the loss)
contribute exactly zero.

While the engine records, the patched layers return no weight gradient to autograd (the
batch sum autograd would compute is not needed, which saves the work). Hence any ``.grad``
that still appears on a trainable parameter after the backward came from a use outside
the layer's forward (a functional call, weight sharing) and the micro-batch is refused.
Anything else that is trainable (embeddings, norm weights, DoRA magnitudes, a parameter
shared with a non-linear module) is refused by name when the engine is built.
"""

from __future__ import annotations

import dataclasses
import math
import types
from types import TracebackType
from typing import Any

import torch
from torch import nn

from tensafe.training.dp.errors import DPConfigError, DPError, UnsupportedParameterError
from tensafe.training.dp.rng import RandomSource, secure_random_source

__all__ = ["CLIP_EPSILON", "DPGradientEngine", "MicroBatchStats", "StepStats"]

#: Added to the per-example norm before dividing, as in Opacus: ``min(1, C / (norm + eps))``.
CLIP_EPSILON = 1e-6


class _DPLinearFunction(torch.autograd.Function):
    """``F.linear`` whose backward hands the layer's per-example gradients to the engine.

    While the engine records (inside :meth:`DPGradientEngine.accumulate`), the backward
    returns no gradient for the weight and bias (the engine builds the clipped sum
    itself, so autograd's batch sum would be wasted work); otherwise it returns the usual
    gradients, so plain training and evaluation code keep working on the patched model.
    """

    @staticmethod
    def forward(
        ctx: Any,
        x: torch.Tensor,
        weight: torch.Tensor,
        bias: torch.Tensor | None,
        engine: DPGradientEngine,
        module: nn.Linear,
    ) -> torch.Tensor:
        ctx.save_for_backward(x, weight)
        ctx.engine = engine
        ctx.module = module
        ctx.has_bias = bias is not None
        return nn.functional.linear(x, weight, bias)

    @staticmethod
    def backward(ctx: Any, *grads: torch.Tensor) -> tuple[torch.Tensor | None, ...]:
        (g,) = grads
        x, weight = ctx.saved_tensors
        grad_x = g.matmul(weight.to(g.dtype)) if ctx.needs_input_grad[0] else None
        engine: DPGradientEngine = ctx.engine
        if engine._recording:
            engine._record(ctx.module, x, g)
            return grad_x, None, None, None, None
        grad_w = grad_b = None
        if ctx.needs_input_grad[1]:
            grad_w = g.reshape(-1, g.shape[-1]).t().matmul(x.reshape(-1, x.shape[-1]).to(g.dtype))
        if ctx.has_bias and ctx.needs_input_grad[2]:
            grad_b = g.reshape(-1, g.shape[-1]).sum(dim=0)
        return grad_x, grad_w, grad_b, None, None


def _sq_norms(per_example: torch.Tensor) -> torch.Tensor:
    """Squared L2 norm of each example's slice, in float64, shape ``(B,)``."""
    # vector_norm is far faster on CPU than pow(2).sum(dtype=float64); square in float64.
    flat = per_example.reshape(per_example.shape[0], -1)
    norms: torch.Tensor = torch.linalg.vector_norm(flat, dim=1)
    return norms.to(torch.float64).square()


def _make_dp_forward(engine: DPGradientEngine) -> Any:
    def forward(self: nn.Linear, x: torch.Tensor) -> torch.Tensor:
        out: torch.Tensor = _DPLinearFunction.apply(x, self.weight, self.bias, engine, self)
        return out

    return forward


@dataclasses.dataclass(frozen=True)
class MicroBatchStats:
    """What :meth:`DPGradientEngine.accumulate` saw in one micro-batch.

    Attributes:
        grad_norms: Each example's unclipped gradient L2 norm, shape ``(B,)``, on CPU.
        num_clipped: How many examples had a norm above the clip norm.
    """

    grad_norms: torch.Tensor
    num_clipped: int


@dataclasses.dataclass(frozen=True)
class StepStats:
    """Summary of one finalized logical step.

    Attributes:
        step: The 0-based index of the step just finalized.
        num_examples: The realised logical batch size (0 for an empty Poisson batch).
        num_clipped: How many of those examples were clipped.
        noise_std: Standard deviation of the noise in each coordinate of the written
            gradient, ``noise_multiplier * clip_norm / expected_batch_size``.
    """

    step: int
    num_examples: int
    num_clipped: int
    noise_std: float


@dataclasses.dataclass
class _Target:
    """One trainable parameter and the layers that use it."""

    name: str
    param: nn.Parameter
    numel: int


def _check_positive(name: str, value: float) -> float:
    if isinstance(value, bool) or not isinstance(value, int | float):
        raise DPConfigError(f"{name} must be a finite number > 0, got {value!r}")
    if not math.isfinite(value) or value <= 0:
        raise DPConfigError(f"{name} must be a finite number > 0, got {value!r}")
    return float(value)


class DPGradientEngine:
    """Computes DP-SGD gradients for the trainable parameters of a model.

    One logical step is: any number of :meth:`accumulate` calls (one per physical
    micro-batch of the logical batch, possibly none for an empty Poisson batch), then one
    :meth:`finalize_step`, which adds Gaussian noise of standard deviation
    ``noise_multiplier * clip_norm`` once to the sum of clipped per-example gradients,
    divides by ``expected_batch_size`` and writes ``.grad`` of every trainable parameter.
    Any torch optimizer can then step.

    Args:
        model: The model; its trainable parameters must all be weights or biases of
            ``nn.Linear`` layers whose ``forward`` is called (LoRA adapters qualify).
        clip_norm: Per-example L2 clip norm ``C`` over all trainable parameters together.
        noise_multiplier: ``sigma``; the noise added to the sum has std ``sigma * C``.
        expected_batch_size: ``q * N``, the normaliser of the noisy sum (not the realised
            batch size, which would leak the batch size and break the accountant's model).
        random_source: Source of the noise; the OS CSPRNG by default.

    Raises:
        DPConfigError: If a privacy parameter is invalid.
        UnsupportedParameterError: If a trainable parameter has no exact per-example path.
    """

    def __init__(
        self,
        model: nn.Module,
        *,
        clip_norm: float,
        noise_multiplier: float,
        expected_batch_size: float,
        random_source: RandomSource | None = None,
    ) -> None:
        self.clip_norm = _check_positive("clip_norm", clip_norm)
        self.noise_multiplier = _check_positive("noise_multiplier", noise_multiplier)
        self.expected_batch_size = _check_positive("expected_batch_size", expected_batch_size)
        self.random_source = random_source if random_source is not None else secure_random_source()
        self._targets = self._collect_targets(model)
        self._by_id = {id(t.param): t for t in self._targets}
        self._patched: list[nn.Linear] = []
        self._patch_layers(model)
        self._accum: dict[int, torch.Tensor] = {}
        # A request being staged (begin_request): its clipped sums and counts, added to the
        # step's accumulator only by commit_request, dropped by discard_request.
        self._staged: dict[int, torch.Tensor] | None = None
        self._staged_examples = 0
        self._staged_clipped = 0
        self._per_example: dict[int, torch.Tensor] = {}
        self._sq_norms: dict[int, torch.Tensor] = {}
        self._batch_size = 0
        self._recording = False
        self._step = 0
        self._examples = 0
        self._clipped = 0

    # ------------------------------------------------------------------ set-up
    @staticmethod
    def _collect_targets(model: nn.Module) -> list[_Target]:
        owners: dict[int, list[tuple[str, nn.Module, str]]] = {}
        for mod_name, module in model.named_modules(remove_duplicate=False):
            if isinstance(module, nn.modules.batchnorm._BatchNorm):
                raise UnsupportedParameterError(
                    f"module {mod_name!r} is a {type(module).__name__}, which mixes examples of a "
                    "batch; per-example gradients (and DP-SGD's guarantee) need example-independent "
                    "layers: replace it with GroupNorm/LayerNorm"
                )
            for p_name, param in module.named_parameters(recurse=False):
                owners.setdefault(id(param), []).append((mod_name, module, p_name))
        targets: list[_Target] = []
        for name, param in model.named_parameters():
            if not param.requires_grad:
                continue
            for mod_name, module, p_name in owners.get(id(param), []):
                if type(module) is not nn.Linear or p_name not in ("weight", "bias"):
                    raise UnsupportedParameterError(
                        f"trainable parameter {name!r} is used by {mod_name or 'the model'} "
                        f"({type(module).__name__}.{p_name}); DP-SGD supports per-example gradients "
                        "only for weights and biases of nn.Linear layers (LoRA adapters). Freeze it "
                        "(requires_grad=False) or drop it from PEFT modules_to_save"
                    )
            if not param.is_floating_point():
                raise UnsupportedParameterError(f"trainable parameter {name!r} is not floating point")
            targets.append(_Target(name=name, param=param, numel=param.numel()))
        if not targets:
            raise UnsupportedParameterError("the model has no trainable parameter; nothing to train")
        return targets

    def _patch_layers(self, model: nn.Module) -> None:
        for module in model.modules():
            if type(module) is not nn.Linear or any(module is m for m in self._patched):
                continue
            if module.weight.requires_grad or (module.bias is not None and module.bias.requires_grad):
                if "forward" in module.__dict__:
                    raise UnsupportedParameterError(
                        f"a trainable nn.Linear ({module}) already has a patched forward (another "
                        "DP engine or per-sample library?); use one DP engine per model"
                    )
                module.forward = types.MethodType(_make_dp_forward(self), module)  # type: ignore[method-assign]
                self._patched.append(module)

    def _record(self, module: nn.Module, activation: torch.Tensor, grad: torch.Tensor) -> None:
        assert isinstance(module, nn.Linear)
        b = self._batch_size
        if grad.dim() < 2 or grad.shape[0] != b or activation.shape[0] != b:
            raise DPError(
                f"a hooked linear layer saw a tensor of shape {tuple(grad.shape)} whose first "
                f"dimension is not the batch size {b}; per-example gradients need batch-first "
                "inputs to every trainable layer"
            )
        g = grad.reshape(b, -1, module.out_features)
        weight = module.weight
        if weight.requires_grad:
            a = activation.reshape(b, -1, module.in_features).to(g.dtype)
            self._add(weight, torch.bmm(g.transpose(1, 2), a))
        bias = module.bias
        if bias is not None and bias.requires_grad:
            self._add(bias, g.sum(dim=1))

    def _add(self, param: torch.Tensor, per_example: torch.Tensor) -> None:
        key = id(param)
        previous = self._per_example.get(key)
        if previous is None:
            self._per_example[key] = per_example
            # Norm while the tensor is hot in cache; valid unless the layer runs again.
            self._sq_norms[key] = _sq_norms(per_example)
        else:
            previous.add_(per_example)
            self._sq_norms.pop(key, None)  # the layer ran twice: recompute at the end

    # ------------------------------------------------------------------ public API
    @property
    def trainable_parameters(self) -> list[tuple[str, nn.Parameter]]:
        """The parameters the engine writes gradients for, with their names."""
        return [(t.name, t.param) for t in self._targets]

    @property
    def step(self) -> int:
        """How many logical steps have been finalized (the index of the next step)."""
        return self._step

    @property
    def pending_examples(self) -> int:
        """Examples accumulated into the current, not yet finalized, logical step (committed only)."""
        return self._examples

    # ------------------------------------------------------------------ atomic requests
    def begin_request(self) -> None:
        """Stage what the following :meth:`accumulate` calls add, until committed or discarded.

        A request that fails half-way (a bad micro-batch, a non-finite gradient, an error
        after the last micro-batch) must leave no partial clipped sum in the step: stage it
        with this, then call :meth:`commit_request` once the whole request succeeded, or
        :meth:`discard_request`.

        Raises:
            DPError: A request is already being staged.
        """
        if self._staged is not None:
            raise DPError("a request is already staged; commit or discard it first")
        self._staged = {}
        self._staged_examples = 0
        self._staged_clipped = 0

    def commit_request(self) -> None:
        """Add the staged request's clipped sums to the current logical step."""
        staged = self._staged
        if staged is None:
            raise DPError("no request is staged")
        for key, tensor in staged.items():
            acc = self._accum.get(key)
            if acc is None:
                self._accum[key] = tensor
            else:
                acc.add_(tensor)
        self._examples += self._staged_examples
        self._clipped += self._staged_clipped
        self._staged = None

    def discard_request(self) -> None:
        """Drop the staged request: the step is exactly as before :meth:`begin_request`."""
        self._staged = None
        self._staged_examples = 0
        self._staged_clipped = 0

    @property
    def staging(self) -> bool:
        """Whether a request is being staged."""
        return self._staged is not None

    @property
    def noise_std(self) -> float:
        """Per-coordinate std of the noise in the written gradient: ``sigma * C / (q * N)``."""
        return self.noise_multiplier * self.clip_norm / self.expected_batch_size

    def accumulate(self, per_example_loss: torch.Tensor) -> MicroBatchStats:
        """Back-propagate one micro-batch and add its clipped per-example gradients.

        Each entry of ``per_example_loss`` must depend on its own example only (TenSafe's
        trainer passes the sum of that example's token cross-entropies). The engine calls
        ``per_example_loss.sum().backward()`` itself and clears ``.grad`` of the trainable
        parameters afterwards.

        Args:
            per_example_loss: Shape ``(B,)``, one loss per example of the micro-batch.

        Returns:
            The examples' unclipped gradient norms and how many were clipped.

        Raises:
            DPError: If the loss has the wrong shape or a gradient escaped the hooks.
        """
        if per_example_loss.dim() != 1:
            raise DPError(
                "accumulate() needs a per-example loss vector of shape (B,), "
                f"got {tuple(per_example_loss.shape)}"
            )
        b = per_example_loss.shape[0]
        if b == 0:
            return MicroBatchStats(grad_norms=torch.zeros(0), num_clipped=0)
        for t in self._targets:
            t.param.grad = None
        self._per_example = {}
        self._sq_norms = {}
        self._batch_size = b
        self._recording = True
        try:
            per_example_loss.sum().backward()
        finally:
            self._recording = False
        try:
            norms = self._clip_and_add(b)
        finally:
            self._per_example = {}
            self._sq_norms = {}
            for t in self._targets:
                t.param.grad = None
        clipped = int((norms > self.clip_norm).sum())
        if self._staged is not None:
            self._staged_examples += b
            self._staged_clipped += clipped
        else:
            self._examples += b
            self._clipped += clipped
        return MicroBatchStats(grad_norms=norms.to(torch.float32).cpu(), num_clipped=clipped)

    def _clip_and_add(self, b: int) -> torch.Tensor:
        sq_norms: torch.Tensor | None = None
        flats: list[tuple[_Target, torch.Tensor]] = []
        for t in self._targets:
            if t.param.grad is not None:
                # The DP forward returns no parameter gradient while recording, so any
                # gradient here came from a use of the parameter outside its layer's forward.
                raise UnsupportedParameterError(
                    f"trainable parameter {t.name!r} received a gradient outside its nn.Linear "
                    "forward (functional use or weight sharing); refusing to compute a wrong DP gradient"
                )
            per_example = self._per_example.get(id(t.param))
            if per_example is None:
                continue
            flat = per_example.reshape(b, -1)
            contribution = self._sq_norms.get(id(t.param))
            if contribution is None:
                contribution = _sq_norms(per_example)
            sq_norms = contribution if sq_norms is None else sq_norms + contribution
            flats.append((t, flat))
        if sq_norms is None:
            sq_norms = torch.zeros(b, dtype=torch.float64)
        norms = sq_norms.sqrt()
        if not bool(torch.isfinite(norms).all()):
            raise DPError(
                "a per-example gradient is not finite (NaN or inf loss?); the micro-batch was not "
                "added. Lower the learning rate or check the data"
            )
        factors = (self.clip_norm / (norms + CLIP_EPSILON)).clamp(max=1.0)
        target = self._staged if self._staged is not None else self._accum
        # Compute every clipped sum before adding any: an error part-way leaves ``target`` as it was.
        sums = [(t, torch.mv(flat.t(), factors.to(flat.dtype)).view_as(t.param)) for t, flat in flats]
        for t, clipped_sum in sums:
            acc = target.get(id(t.param))
            if acc is None:
                target[id(t.param)] = clipped_sum
            else:
                acc.add_(clipped_sum)
        return norms

    def finalize_step(self) -> StepStats:
        """Add the noise once, normalise, write ``.grad`` and start the next logical step.

        The written gradient of every trainable parameter is
        ``(sum of clipped per-example gradients + N(0, (sigma * C)^2 I)) / expected_batch_size``,
        also when the logical batch was empty (pure noise): the accountant counts the step.

        Returns:
            Statistics about the step.

        Raises:
            DPError: A request is still staged (commit or discard it first).
        """
        if self._staged is not None:
            raise DPError("a request is still staged; commit or discard it before finalizing the step")
        total = sum(t.numel for t in self._targets)
        noise = self.random_source.standard_normal(total, step=self._step)
        noise.mul_(self.noise_multiplier * self.clip_norm)
        offset = 0
        for t in self._targets:
            chunk = noise[offset : offset + t.numel].view_as(t.param)
            offset += t.numel
            acc = self._accum.get(id(t.param))
            if acc is not None:
                chunk = chunk.add_(acc.to(torch.float64))
            t.param.grad = chunk.div_(self.expected_batch_size).to(dtype=t.param.dtype, device=t.param.device)
        stats = StepStats(
            step=self._step,
            num_examples=self._examples,
            num_clipped=self._clipped,
            noise_std=self.noise_std,
        )
        self._step += 1
        self.zero()
        return stats

    def zero(self) -> None:
        """Discard what was accumulated for the current logical step (no step is taken)."""
        self._accum = {}
        self._examples = 0
        self._clipped = 0
        self.discard_request()

    def state_dict(self) -> dict[str, int]:
        """Return the engine's resumable state (the number of finalized steps)."""
        return {"step": self._step}

    def load_state_dict(self, state: dict[str, int]) -> None:
        """Restore :meth:`state_dict` output when resuming from a checkpoint.

        Raises:
            DPError: If a logical step is half accumulated or the state is malformed.
        """
        if self._examples or self._accum:
            raise DPError("cannot load engine state in the middle of a logical step; call zero() first")
        step = state.get("step")
        if isinstance(step, bool) or not isinstance(step, int) or step < 0:
            raise DPError(f"malformed DP engine state: step={step!r}")
        self._step = step

    def close(self) -> None:
        """Restore the original ``forward`` of the patched layers."""
        for module in self._patched:
            module.__dict__.pop("forward", None)
        self._patched = []

    def __enter__(self) -> DPGradientEngine:
        return self

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        self.close()

    def __repr__(self) -> str:
        return (
            f"DPGradientEngine(clip_norm={self.clip_norm}, noise_multiplier={self.noise_multiplier}, "
            f"expected_batch_size={self.expected_batch_size}, parameters={len(self._targets)}, "
            f"random_source={self.random_source!r})"
        )
