"""Client-side custom losses without torch: the data and metrics of ``forward_backward_custom``.

The Tinker SDK differentiates a torch loss with autograd. TenSafe's SDK stays light (no
torch), so the loss function returns its own gradient with respect to the logprobs:

``loss_fn(data, logprobs) -> (loss, metrics, grads)``

where ``logprobs[i]`` is datum ``i``'s float64 NumPy array of target logprobs (the shape of
its ``target_tokens``), ``loss`` is a float (or an array, which is summed), ``metrics`` a
``dict[str, float]`` and ``grads[i] = dC/dlogprobs[i]``, one array of the same shape per
datum. The server's ``cross_entropy`` is ``L = sum(-logprobs * weights)``, so sending
``weights = -grads[i]`` makes the server's backward pass compute ``dC/dθ`` (before its DP
clipping and noise).
"""

from __future__ import annotations

import math
from collections.abc import Callable, Mapping, Sequence
from typing import Any, TypeAlias

import numpy as np

from tensafe.client.types import Datum, ForwardBackwardOutput, TensorData

__all__ = [
    "CustomLossFn",
    "CustomLossResult",
    "backward_data",
    "compute_custom_loss",
    "forward_data",
    "merge_metrics",
]

#: ``(data, logprobs) -> (loss, metrics, grads)``: a custom loss and its gradient w.r.t. the
#: logprobs, on NumPy arrays (see the module docstring).
CustomLossFn: TypeAlias = Callable[
    [list[Datum], list[np.ndarray]],
    tuple[Any, Mapping[str, float], Sequence[Any]],
]


class CustomLossResult:
    """What the loss function returned, checked: the loss sum, metrics and per-datum gradients."""

    __slots__ = ("grads", "loss_sum", "metrics")

    def __init__(self, loss_sum: float, metrics: dict[str, float], grads: list[np.ndarray]) -> None:
        """Hold checked values (use :func:`compute_custom_loss`)."""
        self.loss_sum = loss_sum
        self.metrics = metrics
        self.grads = grads


def forward_data(data: Sequence[Datum]) -> list[Datum]:
    """The forward pass's data: ``target_tokens`` and ``weights`` (zeros when absent) only.

    Raises:
        ValueError: A datum has no ``target_tokens``.
    """
    out: list[Datum] = []
    for i, datum in enumerate(data):
        targets = datum.loss_fn_inputs.get("target_tokens")
        if targets is None:
            raise ValueError(f"datum {i}: forward_backward_custom needs target_tokens in loss_fn_inputs")
        weights = datum.loss_fn_inputs.get("weights")
        if weights is None:
            shape = list(targets.to_numpy().shape)
            weights = TensorData(data=[0.0] * len(targets.data), dtype="float32", shape=shape)
        out.append(
            Datum(
                model_input=datum.model_input, loss_fn_inputs={"target_tokens": targets, "weights": weights}
            )
        )
    return out


def _logprobs(output: ForwardBackwardOutput, count: int) -> list[np.ndarray]:
    if len(output.loss_fn_outputs) != count:
        raise ValueError(
            f"the forward pass returned {len(output.loss_fn_outputs)} outputs for {count} datums"
        )
    arrays: list[np.ndarray] = []
    for i, record in enumerate(output.loss_fn_outputs):
        tensor = record.get("logprobs")
        if tensor is None:
            raise ValueError(f"the forward pass returned no logprobs for datum {i}")
        arrays.append(np.array(tensor.to_numpy(), dtype=np.float64))  # a copy the loss may keep
    return arrays


def compute_custom_loss(
    loss_fn: CustomLossFn, data: Sequence[Datum], output: ForwardBackwardOutput
) -> CustomLossResult:
    """Run ``loss_fn`` on the forward pass's logprobs and check what it returns.

    Raises:
        ValueError: The loss function returned the wrong shape of result, a gradient of the
            wrong shape, or a non-finite loss or gradient (nothing is sent to the server then).
    """
    logprobs = _logprobs(output, len(data))
    shapes = [lp.shape for lp in logprobs]
    result = loss_fn(list(data), logprobs)
    if not isinstance(result, tuple) or len(result) != 3:
        raise ValueError(
            "a TenSafe custom loss returns (loss, metrics, grads) with grads[i] = dloss/dlogprobs[i] "
            "(NumPy arrays; the SDK has no autograd)"
        )
    loss, metrics, grads = result
    loss_sum = float(np.sum(np.asarray(loss, dtype=np.float64)))
    if not math.isfinite(loss_sum):
        raise ValueError(f"the custom loss is not finite ({loss_sum})")
    if len(grads) != len(data):
        raise ValueError(f"the custom loss returned {len(grads)} gradients for {len(data)} datums")
    checked: list[np.ndarray] = []
    for i, (grad, shape) in enumerate(zip(grads, shapes, strict=True)):
        arr = np.asarray(grad, dtype=np.float64)
        if arr.shape != shape:
            raise ValueError(f"gradient {i} has shape {arr.shape}; its logprobs have shape {shape}")
        if not np.all(np.isfinite(arr)):
            raise ValueError(f"gradient {i} is not finite")
        checked.append(arr)
    return CustomLossResult(loss_sum, {str(k): float(v) for k, v in dict(metrics).items()}, checked)


def backward_data(data: Sequence[Datum], grads: Sequence[np.ndarray]) -> list[Datum]:
    """The backward pass's data: ``target_tokens`` and ``weights = -dC/dlogprobs``."""
    return [
        Datum(
            model_input=datum.model_input,
            loss_fn_inputs={
                "target_tokens": datum.loss_fn_inputs["target_tokens"],
                "weights": TensorData.from_numpy((-grad).astype(np.float32)),
            },
        )
        for datum, grad in zip(data, grads, strict=True)
    ]


def merge_metrics(backward: ForwardBackwardOutput, custom: CustomLossResult) -> ForwardBackwardOutput:
    """Report the custom loss as ``loss:sum``; the server's is kept as ``surrogate_loss:sum``.

    The loss function's own metrics are added (as the Tinker SDK does).
    """
    metrics = dict(backward.metrics)
    surrogate = metrics.pop("loss:sum", None)
    metrics.update(custom.metrics)
    metrics["loss:sum"] = custom.loss_sum
    if surrogate is not None:
        metrics["surrogate_loss:sum"] = surrogate
    return backward.model_copy(update={"metrics": metrics})
