"""LoRA adapters through PEFT, saved in the standard PEFT format.

An adapter directory holds exactly what ``peft.PeftModel.from_pretrained`` (and vLLM's LoRA
loader) expect: ``adapter_config.json`` and ``adapter_model.safetensors``. Nothing TenSafe-specific
is needed to load it. Files that TenSafe adds next to an adapter (for instance the DP certificate)
are ignored by PEFT.
"""

from __future__ import annotations

import contextlib
import dataclasses
import os
import shutil
import tempfile
from pathlib import Path
from typing import TYPE_CHECKING, Any

from tensafe.training.errors import ModelLoadError, TrainingConfigError, TrainingError

if TYPE_CHECKING:
    from peft import LoraConfig, PeftModel
    from transformers import PreTrainedModel

__all__ = [
    "ADAPTER_CONFIG",
    "ADAPTER_WEIGHTS",
    "DEFAULT_TARGET_MODULES",
    "LoraSettings",
    "apply_lora",
    "load_adapter",
    "save_adapter",
]

#: Attention and MLP projections of Llama-family models.
DEFAULT_TARGET_MODULES: tuple[str, ...] = (
    "q_proj",
    "k_proj",
    "v_proj",
    "o_proj",
    "gate_proj",
    "up_proj",
    "down_proj",
)
ADAPTER_CONFIG = "adapter_config.json"
ADAPTER_WEIGHTS = "adapter_model.safetensors"


@dataclasses.dataclass(frozen=True)
class LoraSettings:
    """LoRA hyper-parameters.

    Attributes:
        rank: Rank ``r`` of the update ``B @ A`` (positive).
        alpha: Scaling numerator; the update is multiplied by ``alpha / rank`` (positive).
        dropout: Dropout on the LoRA input, in ``[0, 1)``.
        target_modules: Module name suffixes to adapt; every one must exist in the model.
        layers_to_transform: Indices of the transformer blocks to adapt (``None``: all). Adapting
            only the top blocks also ends back-propagation there, which saves most of the
            backward pass on CPU.
    """

    rank: int = 8
    alpha: float = 16.0
    dropout: float = 0.0
    target_modules: tuple[str, ...] = DEFAULT_TARGET_MODULES
    layers_to_transform: tuple[int, ...] | None = None

    def __post_init__(self) -> None:
        if isinstance(self.target_modules, str) or not isinstance(self.target_modules, (tuple, list)):
            raise TrainingConfigError("LoRA target_modules must be a list of module names")
        object.__setattr__(self, "target_modules", tuple(self.target_modules))
        if isinstance(self.rank, bool) or not isinstance(self.rank, int) or self.rank < 1:
            raise TrainingConfigError(f"LoRA rank must be a positive integer, got {self.rank!r}")
        if not self.alpha > 0:
            raise TrainingConfigError(f"LoRA alpha must be positive, got {self.alpha!r}")
        if not 0.0 <= self.dropout < 1.0:
            raise TrainingConfigError(f"LoRA dropout must be in [0, 1), got {self.dropout!r}")
        if not self.target_modules or not all(isinstance(m, str) and m for m in self.target_modules):
            raise TrainingConfigError("LoRA target_modules must be a non-empty list of module names")
        if len(set(self.target_modules)) != len(self.target_modules):
            raise TrainingConfigError("LoRA target_modules has duplicates")
        if self.layers_to_transform is not None:
            layers = tuple(self.layers_to_transform)
            valid = all(isinstance(i, int) and not isinstance(i, bool) and i >= 0 for i in layers)
            if not layers or not valid:
                raise TrainingConfigError(
                    "LoRA layers_to_transform must be a non-empty list of block indices >= 0"
                )
            object.__setattr__(self, "layers_to_transform", tuple(sorted(set(layers))))

    @property
    def scaling(self) -> float:
        """The factor ``alpha / rank`` applied to the low-rank update."""
        return float(self.alpha) / self.rank

    def to_peft_config(self) -> LoraConfig:
        """Return the equivalent ``peft.LoraConfig`` for causal language modelling."""
        from peft import LoraConfig, TaskType

        return LoraConfig(
            r=self.rank,
            lora_alpha=int(self.alpha) if float(self.alpha).is_integer() else self.alpha,  # type: ignore[arg-type]
            lora_dropout=self.dropout,
            target_modules=list(self.target_modules),
            layers_to_transform=(
                list(self.layers_to_transform) if self.layers_to_transform is not None else None
            ),
            bias="none",
            task_type=TaskType.CAUSAL_LM,
        )


def _check_targets(model: Any, targets: tuple[str, ...]) -> None:
    import torch

    linear = {
        name.rsplit(".", 1)[-1] for name, mod in model.named_modules() if isinstance(mod, torch.nn.Linear)
    }
    missing = [t for t in targets if t not in linear]
    if missing:
        raise TrainingConfigError(
            f"LoRA target modules not found in the model: {', '.join(missing)}; "
            f"linear layers available: {', '.join(sorted(linear))}"
        )


def apply_lora(
    model: PreTrainedModel, settings: LoraSettings | None = None, *, init_seed: int | None = None
) -> PeftModel:
    """Wrap a model with fresh LoRA adapters; only the adapter weights are trainable.

    Args:
        model: A Hugging Face causal LM (it is modified in place and wrapped).
        settings: LoRA hyper-parameters (defaults: rank 8, alpha 16, attention and MLP).
        init_seed: Seed of the adapters' random initialisation (``A`` matrices; ``B`` starts at
            zero, so the wrapped model initially computes exactly what the base model does).
            ``None`` uses the global torch generator.

    Returns:
        The ``peft.PeftModel``.

    Raises:
        TrainingConfigError: A target module does not exist in the model.
    """
    import torch
    from peft import get_peft_model

    settings = settings or LoraSettings()
    _check_targets(model, settings.target_modules)
    seeded = torch.random.fork_rng(devices=[]) if init_seed is not None else contextlib.nullcontext()
    with seeded:
        if init_seed is not None:
            torch.manual_seed(init_seed)
        peft_model = get_peft_model(model, settings.to_peft_config())
    return peft_model


def save_adapter(
    model: PeftModel,
    directory: str | os.PathLike[str],
    *,
    base_model_id: str | None = None,
    overwrite: bool = False,
) -> Path:
    """Save the adapter in PEFT format, atomically.

    The files are written to a temporary sibling directory and renamed into place, so
    ``directory`` either holds a complete adapter or does not exist.

    Args:
        model: The PEFT model whose (default) adapter is saved.
        directory: Destination directory; it must not exist unless ``overwrite`` is set.
        base_model_id: Recorded as ``base_model_name_or_path`` in ``adapter_config.json``
            (for example ``"HuggingFaceTB/SmolLM2-135M-Instruct"``); default: the model's own.
        overwrite: Replace an existing directory.

    Returns:
        The adapter directory.

    Raises:
        TrainingError: ``directory`` exists and ``overwrite`` is not set.
    """
    final = Path(directory)
    if final.exists() and not overwrite:
        raise TrainingError(f"{final} already exists; choose another output directory")
    final.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{final.name}.", suffix=".tmp", dir=final.parent))
    config = model.peft_config["default"]
    previous = config.base_model_name_or_path
    try:
        if base_model_id is not None:
            config.base_model_name_or_path = base_model_id
        model.save_pretrained(str(tmp), safe_serialization=True, save_embedding_layers=False)
        for path in tmp.iterdir():
            with path.open("rb") as fh:
                os.fsync(fh.fileno())
        old = None
        if final.exists():
            old = final.with_name(f".{final.name}.old-{os.getpid()}")
            os.rename(final, old)
        os.rename(tmp, final)
        if old is not None:
            shutil.rmtree(old, ignore_errors=True)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    finally:
        config.base_model_name_or_path = previous
    fd = os.open(final.parent, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)
    return final


def load_adapter(
    base_model: PreTrainedModel, directory: str | os.PathLike[str], *, is_trainable: bool = False
) -> PeftModel:
    """Load a PEFT adapter onto a base model (a thin, offline wrapper of ``PeftModel.from_pretrained``).

    Args:
        base_model: The base model the adapter was trained on.
        directory: An adapter directory written by :func:`save_adapter` (or any PEFT adapter).
        is_trainable: Keep the adapter weights trainable (to resume training).

    Returns:
        The ``peft.PeftModel``.

    Raises:
        ModelLoadError: The directory is not a loadable PEFT adapter.
    """
    from peft import PeftModel

    path = Path(directory)
    if not (path / ADAPTER_CONFIG).is_file() or not (path / ADAPTER_WEIGHTS).is_file():
        raise ModelLoadError(f"{path} is not a PEFT adapter (needs {ADAPTER_CONFIG} and {ADAPTER_WEIGHTS})")
    try:
        return PeftModel.from_pretrained(
            base_model, str(path), is_trainable=is_trainable, local_files_only=True
        )
    except (OSError, ValueError, RuntimeError, KeyError) as exc:
        raise ModelLoadError(f"cannot load the adapter in {path}: {type(exc).__name__}: {exc}") from None
