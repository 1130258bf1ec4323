"""Per-row multi-LoRA for the transformers engine: adapter parsing and the stacked slot bank.

An adapter arrives as PEFT files in memory (:class:`~tensafe.serving.engine.LoraAdapter`).
:func:`parse_adapter` reads ``adapter_config.json`` as JSON and ``adapter_model.safetensors``
with ``safetensors`` (from bytes: nothing is written to disk) and checks them against the base
model: the named base model, the rank (at most ``max_lora_rank``), every tensor's module (a
wrapped linear layer the config targets) and shape, float dtype and finite values. Anything
else is refused with :class:`~tensafe.serving.errors.InvalidGenerationRequestError` naming the
first problem.

:class:`LoraBank` replaces each adaptable ``nn.Linear`` of the decoder layers (the attention
and MLP projections) with :class:`MultiLoraLinear`, which holds one ``A`` and one ``B`` per
slot, the rank zero-padded to ``max_lora_rank`` (zero rows add exactly nothing) and the scale
``alpha / r`` (``alpha / sqrt(r)`` with rsLoRA) folded into ``B``. Before each forward the
engine tells the bank which slot each batch row uses; row ``i`` then computes
``base(x_i) + (x_i @ A[slot_i].T) @ B[slot_i].T`` and a row without adapter computes
``base(x_i)`` alone, so requests for different adapters (and the base model) share one batch.
"""

from __future__ import annotations

import json
import math
import re
from collections.abc import Collection, Mapping
from dataclasses import dataclass
from typing import Any

import torch
from torch import nn

from tensafe.serving.engine import LoraAdapter
from tensafe.serving.errors import InvalidGenerationRequestError

__all__ = ["ADAPTABLE_MODULES", "LoraBank", "MultiLoraLinear", "ParsedAdapter", "parse_adapter"]

#: Module name suffixes of the decoder layers that adapters may target.
ADAPTABLE_MODULES: tuple[str, ...] = (
    "q_proj",
    "k_proj",
    "v_proj",
    "o_proj",
    "gate_proj",
    "up_proj",
    "down_proj",
)
_CONFIG = "adapter_config.json"
_WEIGHTS = "adapter_model.safetensors"
_TENSOR = re.compile(r"base_model\.model\.(?P<module>[A-Za-z0-9_.]+)\.lora_(?P<ab>[AB])\.weight")
_LAYER = re.compile(r"\.layers\.(\d+)\.")
#: PEFT config keys whose non-default value changes what the tensors mean (refused).
_MUST_BE_OFF = (
    "use_dora",
    "fan_in_fan_out",
    "modules_to_save",
    "rank_pattern",
    "alpha_pattern",
    "layer_replication",
    "lora_bias",
    "trainable_token_indices",
    "target_parameters",
    "megatron_config",
    "alora_invocation_tokens",
    "use_qalora",
    "use_bdlora",
    "arrow_config",
)
_FLOAT_DTYPES = (torch.float16, torch.bfloat16, torch.float32, torch.float64)


def _refuse(message: str) -> InvalidGenerationRequestError:
    return InvalidGenerationRequestError(f"adapter refused: {message}", param="adapter")


def _off(value: Any) -> bool:
    return value in (None, False, "none", 0) or (isinstance(value, list | dict) and not value)


@dataclass(frozen=True)
class ParsedAdapter:
    """A checked adapter: ``weights[module] = (A [r, in], B·scale [out, r])`` in float32."""

    adapter_id: str
    rank: int
    weights: Mapping[str, tuple[torch.Tensor, torch.Tensor]]


def _targets(config: Mapping[str, Any]) -> Any:
    targets = config.get("target_modules")
    if isinstance(targets, str):
        if targets == "all-linear":
            return lambda module: True
        try:
            pattern = re.compile(targets)
        except re.error:
            raise _refuse(f"{_CONFIG}: target_modules is not a valid regular expression") from None
        return lambda module: pattern.fullmatch(module) is not None
    if isinstance(targets, list) and targets and all(isinstance(t, str) and t for t in targets):
        names = tuple(targets)
        return lambda module: any(module == t or module.endswith(f".{t}") for t in names)
    raise _refuse(f"{_CONFIG}: target_modules must be a non-empty list of module names")


def parse_adapter(
    adapter: LoraAdapter,
    *,
    base_names: Collection[str],
    shapes: Mapping[str, tuple[int, int]],
    max_rank: int,
) -> ParsedAdapter:
    """Check ``adapter`` against the base model (see the module docstring) and return its weights.

    Args:
        adapter: The decrypted PEFT files.
        base_names: The names the base model is known by (``base_model_id`` and the config's
            ``base_model_name_or_path`` must be one of them).
        shapes: ``{module name: (in_features, out_features)}`` of the adaptable linear layers.
        max_rank: The engine's ``max_lora_rank``.

    Raises:
        InvalidGenerationRequestError: The first problem found, named.
    """
    if adapter.base_model_id not in base_names:
        raise _refuse(
            f"{adapter.adapter_id!r} is for base model {adapter.base_model_id[:200]!r}, "
            f"but this engine serves {sorted(base_names)[0]!r}"
        )
    missing = [name for name in (_CONFIG, _WEIGHTS) if name not in adapter.files]
    if missing:
        raise _refuse(f"{', '.join(missing)} missing (a PEFT LoRA adapter has {_CONFIG} and {_WEIGHTS})")
    try:
        config = json.loads(adapter.files[_CONFIG].decode("utf-8"))
    except (UnicodeDecodeError, ValueError):
        raise _refuse(f"{_CONFIG} is not UTF-8 JSON") from None
    if not isinstance(config, dict):
        raise _refuse(f"{_CONFIG} must be a JSON object")
    peft_type = config.get("peft_type", "LORA")
    if peft_type != "LORA":
        raise _refuse(f"{_CONFIG}: peft_type is {str(peft_type)[:40]!r}; only LORA adapters are served")
    rank = config.get("r")
    if isinstance(rank, bool) or not isinstance(rank, int) or rank < 1:
        raise _refuse(f"{_CONFIG}: r must be a positive integer")
    if rank > max_rank:
        raise _refuse(f"rank {rank} is above this engine's max_lora_rank ({max_rank})")
    alpha = config.get("lora_alpha", 8)
    if (
        isinstance(alpha, bool)
        or not isinstance(alpha, int | float)
        or not math.isfinite(alpha)
        or alpha <= 0
    ):
        raise _refuse(f"{_CONFIG}: lora_alpha must be a positive number")
    rslora = config.get("use_rslora", False)
    if not isinstance(rslora, bool):
        raise _refuse(f"{_CONFIG}: use_rslora must be true or false")
    if config.get("bias", "none") != "none":
        raise _refuse(f"{_CONFIG}: bias must be 'none'")
    for key in _MUST_BE_OFF:
        if not _off(config.get(key)):
            raise _refuse(f"{_CONFIG}: {key} is not supported by the transformers engine")
    named = config.get("base_model_name_or_path")
    if named not in (None, "") and named not in base_names:
        raise _refuse(
            f"{_CONFIG}: base_model_name_or_path is {str(named)[:200]!r}, "
            f"but this engine serves {sorted(base_names)[0]!r}"
        )
    targeted = _targets(config)
    layers = config.get("layers_to_transform")
    if layers is not None:
        if isinstance(layers, int) and not isinstance(layers, bool):
            layers = [layers]
        if not isinstance(layers, list) or not all(
            isinstance(i, int) and not isinstance(i, bool) for i in layers
        ):
            raise _refuse(f"{_CONFIG}: layers_to_transform must be a list of layer indices")
    scale = float(alpha) / (math.sqrt(rank) if rslora else rank)

    tensors = _load_safetensors(adapter.files[_WEIGHTS])
    halves: dict[str, dict[str, torch.Tensor]] = {}
    for name, tensor in tensors.items():
        match = _TENSOR.fullmatch(name)
        if match is None:
            raise _refuse(
                f"{_WEIGHTS}: unexpected tensor {name[:200]!r}; only "
                "base_model.model.<module>.lora_A.weight and .lora_B.weight are served"
            )
        module, half = match["module"], match["ab"]
        if module not in shapes:
            raise _refuse(
                f"{_WEIGHTS}: {name[:200]!r} adapts no attention or MLP projection of the base model "
                f"(adaptable: {', '.join(ADAPTABLE_MODULES)})"
            )
        if not targeted(module):
            raise _refuse(f"{_WEIGHTS}: {name[:200]!r} adapts a module that {_CONFIG} does not target")
        if layers is not None:
            layer = _LAYER.search(f".{module}.")
            if layer is None or int(layer.group(1)) not in layers:
                raise _refuse(f"{_WEIGHTS}: {name[:200]!r} is outside layers_to_transform")
        in_features, out_features = shapes[module]
        expected = (rank, in_features) if half == "A" else (out_features, rank)
        if tuple(tensor.shape) != expected:
            raise _refuse(f"{_WEIGHTS}: {name[:200]!r} has shape {tuple(tensor.shape)}, expected {expected}")
        if tensor.dtype not in _FLOAT_DTYPES:
            raise _refuse(f"{_WEIGHTS}: {name[:200]!r} has dtype {tensor.dtype}; a float dtype is required")
        if not bool(tensor.isfinite().all()):
            raise _refuse(f"{_WEIGHTS}: {name[:200]!r} holds NaN or infinite values")
        halves.setdefault(module, {})[half] = tensor
    if not halves:
        raise _refuse(f"{_WEIGHTS} holds no LoRA tensors")
    weights: dict[str, tuple[torch.Tensor, torch.Tensor]] = {}
    for module, pair in sorted(halves.items()):
        if set(pair) != {"A", "B"}:
            raise _refuse(f"{_WEIGHTS}: module {module!r} has lora_{next(iter(pair))} but not its pair")
        weights[module] = (
            pair["A"].to(torch.float32).contiguous(),
            (pair["B"].to(torch.float32) * scale).contiguous(),
        )
    return ParsedAdapter(adapter_id=adapter.adapter_id, rank=rank, weights=weights)


def _load_safetensors(data: bytes) -> dict[str, torch.Tensor]:
    from safetensors import SafetensorError
    from safetensors.torch import load

    try:
        return dict(load(data))
    except (SafetensorError, ValueError, RuntimeError) as exc:
        raise _refuse(
            f"{_WEIGHTS} is not a valid safetensors file ({str(exc)[:200]}); "
            "save the adapter with safe_serialization=True"
        ) from None


class MultiLoraLinear(nn.Module):
    """``base(x)`` plus, for each batch row, the low-rank update of that row's adapter slot.

    The slots of a projection are stacked along the rank axis: ``lora_a`` is
    ``[slots * max_rank, in]`` and ``lora_b`` ``[slots * max_rank, out]``, slot ``s`` (1-based)
    owning block ``s - 1``. A forward multiplies ``x`` by the blocks of every slot up to the
    highest one in the batch at once, zeroes each row's entries outside its own block (the
    bank's row mask) and multiplies by the same blocks of ``B``: two matrix products per
    projection whatever the mix of adapters, with no per-row gather.
    """

    def __init__(self, base: nn.Linear, bank: LoraBank, *, slots: int, max_rank: int) -> None:
        super().__init__()
        self.base = base
        self.bank = bank
        self.in_features = base.in_features
        self.out_features = base.out_features
        # Plain tensors, not buffers: they are no part of the model's state dict.
        self.lora_a: torch.Tensor = torch.zeros(slots * max_rank, base.in_features)
        self.lora_b: torch.Tensor = torch.zeros(slots * max_rank, base.out_features)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out: torch.Tensor = self.base(x)
        mask = self.bank.mask
        if mask is None:
            return out
        width = mask.shape[-1]
        hidden = torch.matmul(x, self.lora_a[:width].t()) * mask
        return out + torch.matmul(hidden, self.lora_b[:width])


class LoraBank:
    """The adapter slots of one model (see the module docstring); slot 0 is "no adapter".

    Used only by the engine's scheduler thread: :meth:`fill` and :meth:`clear` between
    forwards, :meth:`set_rows` before each forward.
    """

    def __init__(self, model: nn.Module, *, slots: int, max_rank: int) -> None:
        self.max_rank = max_rank
        self.capacity = slots
        self.mask: torch.Tensor | None = None
        self.modules: dict[str, MultiLoraLinear] = {}
        found = [
            (name, module)
            for name, module in model.named_modules()
            if isinstance(module, nn.Linear)
            and name.rsplit(".", 1)[-1] in ADAPTABLE_MODULES
            and ".layers." in name
        ]
        for name, module in found:
            parent_name, _, child = name.rpartition(".")
            parent = model.get_submodule(parent_name)
            wrapped = MultiLoraLinear(module, self, slots=slots, max_rank=max_rank)
            setattr(parent, child, wrapped)
            self.modules[name] = wrapped

    def shapes(self) -> dict[str, tuple[int, int]]:
        """``{module name: (in_features, out_features)}`` of every adaptable layer."""
        return {name: (m.in_features, m.out_features) for name, m in self.modules.items()}

    def _block(self, slot: int) -> slice:
        if not 1 <= slot <= self.capacity:
            raise ValueError(f"LoRA slot {slot} is outside 1..{self.capacity}")
        return slice((slot - 1) * self.max_rank, slot * self.max_rank)

    @torch.no_grad()
    def fill(self, slot: int, adapter: ParsedAdapter) -> None:
        """Write ``adapter`` into ``slot`` (1-based); modules it does not adapt get zeros."""
        block = self._block(slot)
        for name, module in self.modules.items():
            module.lora_a[block].zero_()
            module.lora_b[block].zero_()
            pair = adapter.weights.get(name)
            if pair is not None:
                a, b = pair
                rank = a.shape[0]
                module.lora_a[block.start : block.start + rank] = a
                module.lora_b[block.start : block.start + rank] = b.t()

    @torch.no_grad()
    def clear(self, slot: int) -> None:
        """Zero ``slot`` (freed adapters leave no weights behind)."""
        block = self._block(slot)
        for module in self.modules.values():
            module.lora_a[block].zero_()
            module.lora_b[block].zero_()

    def set_rows(self, row_slots: list[int]) -> None:
        """Slot of each batch row for the next forward (0: the base model)."""
        span = max(row_slots, default=0)
        if span == 0:
            self.mask = None
            return
        mask = torch.zeros(len(row_slots), 1, span * self.max_rank)
        for row, slot in enumerate(row_slots):
            if slot:
                mask[row, 0, self._block(slot)] = 1.0
        self.mask = mask
