"""The ``tensafe train`` configuration file (YAML), validated strictly.

A configuration is a YAML mapping with the sections below; unknown keys are an error
(a typo in a privacy setting must never be silently ignored). Relative paths are
resolved against the configuration file's directory. See ``docs/training.md``.

.. code-block:: yaml

    model: HuggingFaceTB/SmolLM2-135M-Instruct
    output_dir: runs/clinical
    data:
      train: data/train.jsonl
      eval: data/eval.jsonl        # optional; otherwise eval_fraction of train is held out
      eval_fraction: 0.1
      max_length: 128
    lora: {rank: 8, alpha: 16, dropout: 0.0}
    optimizer: {learning_rate: 0.002, weight_decay: 0.0}
    training:
      steps: 100                   # or epochs: 2.0
      batch_size: 16               # expected logical batch size q * N
      micro_batch_size: 8
      checkpoint_every: 10
    privacy:
      enabled: true
      target_epsilon: 8.0
      delta: 1.0e-5
      clip_norm: 1.0
      accountant: rdp
      noise_multiplier: null       # calibrated from target_epsilon when null
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import math
import os
from collections.abc import Mapping
from pathlib import Path
from typing import Any

from tensafe.training.errors import TrainingConfigError

__all__ = [
    "CONFIG_SCHEMA",
    "DataSection",
    "LoraSection",
    "OptimizerSection",
    "PrivacySection",
    "TrainConfig",
    "TrainingSection",
    "load_config",
]

#: Version marker written into checkpoints and metrics; bump on incompatible changes.
CONFIG_SCHEMA = "tensafe.train_config/v1"

_DEFAULT_TARGETS = ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj")


def _number(
    section: str, key: str, value: Any, *, minimum: float | None = None, strict_min: bool = False
) -> float:
    if isinstance(value, bool) or not isinstance(value, int | float) or not math.isfinite(value):
        raise TrainingConfigError(f"{section}.{key} must be a finite number, got {value!r}")
    if minimum is not None and (value <= minimum if strict_min else value < minimum):
        op = ">" if strict_min else ">="
        raise TrainingConfigError(f"{section}.{key} must be {op} {minimum}, got {value!r}")
    return float(value)


def _integer(section: str, key: str, value: Any, *, minimum: int = 0) -> int:
    if isinstance(value, bool) or not isinstance(value, int) or value < minimum:
        raise TrainingConfigError(f"{section}.{key} must be an integer >= {minimum}, got {value!r}")
    return value


def _take(section: str, raw: Any, allowed: set[str]) -> dict[str, Any]:
    if raw is None:
        return {}
    if not isinstance(raw, Mapping):
        raise TrainingConfigError(f"section {section!r} must be a mapping, got {type(raw).__name__}")
    unknown = sorted(set(raw) - allowed)
    if unknown:
        raise TrainingConfigError(
            f"unknown key(s) in {section!r}: {', '.join(map(str, unknown))} "
            f"(allowed: {', '.join(sorted(allowed))})"
        )
    return dict(raw)


@dataclasses.dataclass(frozen=True, kw_only=True)
class DataSection:
    """Where the data comes from and how it is cut."""

    train: Path
    eval: Path | None = None
    eval_fraction: float = 0.1
    max_length: int = 256
    split_seed: int = 0

    @classmethod
    def from_mapping(cls, raw: Any, base: Path) -> DataSection:
        d = _take("data", raw, {"train", "eval", "eval_fraction", "max_length", "split_seed"})
        if "train" not in d or not isinstance(d["train"], str) or not d["train"]:
            raise TrainingConfigError("data.train must be the path of a JSONL file")
        eval_path = d.get("eval")
        if eval_path is not None and not isinstance(eval_path, str):
            raise TrainingConfigError("data.eval must be a path or null")
        fraction = _number("data", "eval_fraction", d.get("eval_fraction", 0.1), minimum=0.0)
        if fraction >= 1:
            raise TrainingConfigError("data.eval_fraction must be < 1")
        return cls(
            train=(base / d["train"]).resolve(),
            eval=(base / eval_path).resolve() if eval_path else None,
            eval_fraction=fraction,
            max_length=_integer("data", "max_length", d.get("max_length", 256), minimum=8),
            split_seed=_integer("data", "split_seed", d.get("split_seed", 0)),
        )


@dataclasses.dataclass(frozen=True, kw_only=True)
class LoraSection:
    """LoRA hyper-parameters (PEFT)."""

    rank: int = 8
    alpha: float = 16.0
    dropout: float = 0.0
    target_modules: tuple[str, ...] = _DEFAULT_TARGETS
    layers: tuple[int, ...] | None = None

    @classmethod
    def from_mapping(cls, raw: Any) -> LoraSection:
        d = _take("lora", raw, {"rank", "alpha", "dropout", "target_modules", "layers"})
        layers = d.get("layers")
        if layers is not None and (
            not isinstance(layers, list | tuple)
            or not layers
            or not all(isinstance(i, int) and not isinstance(i, bool) and i >= 0 for i in layers)
        ):
            raise TrainingConfigError(
                "lora.layers must be a non-empty list of transformer block indices (>= 0)"
            )
        targets = d.get("target_modules", list(_DEFAULT_TARGETS))
        if (
            not isinstance(targets, list | tuple)
            or not targets
            or not all(isinstance(t, str) for t in targets)
        ):
            raise TrainingConfigError("lora.target_modules must be a non-empty list of module names")
        dropout = _number("lora", "dropout", d.get("dropout", 0.0), minimum=0.0)
        if dropout >= 1:
            raise TrainingConfigError("lora.dropout must be < 1")
        return cls(
            rank=_integer("lora", "rank", d.get("rank", 8), minimum=1),
            alpha=_number("lora", "alpha", d.get("alpha", 16.0), minimum=0.0, strict_min=True),
            dropout=dropout,
            target_modules=tuple(targets),
            layers=tuple(layers) if layers is not None else None,
        )


@dataclasses.dataclass(frozen=True, kw_only=True)
class OptimizerSection:
    """AdamW settings (the optimizer only post-processes the privatised gradient)."""

    learning_rate: float = 2e-3
    weight_decay: float = 0.0
    beta1: float = 0.9
    beta2: float = 0.999

    @classmethod
    def from_mapping(cls, raw: Any) -> OptimizerSection:
        d = _take("optimizer", raw, {"learning_rate", "weight_decay", "beta1", "beta2"})
        return cls(
            learning_rate=_number(
                "optimizer", "learning_rate", d.get("learning_rate", 2e-3), minimum=0.0, strict_min=True
            ),
            weight_decay=_number("optimizer", "weight_decay", d.get("weight_decay", 0.0), minimum=0.0),
            beta1=_number("optimizer", "beta1", d.get("beta1", 0.9), minimum=0.0),
            beta2=_number("optimizer", "beta2", d.get("beta2", 0.999), minimum=0.0),
        )


@dataclasses.dataclass(frozen=True, kw_only=True)
class TrainingSection:
    """Loop length, batching, checkpointing."""

    steps: int | None = None
    epochs: float | None = None
    batch_size: int = 16
    micro_batch_size: int = 8
    checkpoint_every: int = 10
    log_every: int = 1
    keep_checkpoints: int = 2
    seed: int = 0

    @classmethod
    def from_mapping(cls, raw: Any) -> TrainingSection:
        d = _take(
            "training",
            raw,
            {
                "steps",
                "epochs",
                "batch_size",
                "micro_batch_size",
                "checkpoint_every",
                "log_every",
                "keep_checkpoints",
                "seed",
            },
        )
        steps = d.get("steps")
        epochs = d.get("epochs")
        if (steps is None) == (epochs is None):
            raise TrainingConfigError("training: give exactly one of steps or epochs")
        return cls(
            steps=_integer("training", "steps", steps, minimum=1) if steps is not None else None,
            epochs=_number("training", "epochs", epochs, minimum=0.0, strict_min=True)
            if epochs is not None
            else None,
            batch_size=_integer("training", "batch_size", d.get("batch_size", 16), minimum=1),
            micro_batch_size=_integer(
                "training", "micro_batch_size", d.get("micro_batch_size", 8), minimum=1
            ),
            checkpoint_every=_integer(
                "training", "checkpoint_every", d.get("checkpoint_every", 10), minimum=1
            ),
            log_every=_integer("training", "log_every", d.get("log_every", 1), minimum=1),
            keep_checkpoints=_integer(
                "training", "keep_checkpoints", d.get("keep_checkpoints", 2), minimum=1
            ),
            seed=_integer("training", "seed", d.get("seed", 0)),
        )


@dataclasses.dataclass(frozen=True, kw_only=True)
class PrivacySection:
    """DP-SGD settings. ``enabled: false`` must be stated explicitly to train without DP."""

    enabled: bool = True
    target_epsilon: float | None = 8.0
    delta: float = 1e-5
    clip_norm: float = 1.0
    accountant: str = "rdp"
    noise_multiplier: float | None = None

    @classmethod
    def from_mapping(cls, raw: Any) -> PrivacySection:
        d = _take(
            "privacy",
            raw,
            {"enabled", "target_epsilon", "delta", "clip_norm", "accountant", "noise_multiplier"},
        )
        enabled = d.get("enabled", True)
        if not isinstance(enabled, bool):
            raise TrainingConfigError("privacy.enabled must be true or false")
        target = d.get("target_epsilon", 8.0)
        sigma = d.get("noise_multiplier")
        if enabled and target is None and sigma is None:
            raise TrainingConfigError("privacy: give target_epsilon, noise_multiplier, or both")
        accountant = d.get("accountant", "rdp")
        if not isinstance(accountant, str):
            raise TrainingConfigError("privacy.accountant must be a string")
        return cls(
            enabled=enabled,
            target_epsilon=_number("privacy", "target_epsilon", target, minimum=0.0, strict_min=True)
            if target is not None
            else None,
            delta=_number("privacy", "delta", d.get("delta", 1e-5), minimum=0.0, strict_min=True),
            clip_norm=_number("privacy", "clip_norm", d.get("clip_norm", 1.0), minimum=0.0, strict_min=True),
            accountant=accountant,
            noise_multiplier=_number("privacy", "noise_multiplier", sigma, minimum=0.0, strict_min=True)
            if sigma is not None
            else None,
        )


@dataclasses.dataclass(frozen=True, kw_only=True)
class TrainConfig:
    """A validated ``tensafe train`` configuration."""

    model: str
    output_dir: Path
    data: DataSection
    lora: LoraSection = LoraSection()
    optimizer: OptimizerSection = OptimizerSection()
    training: TrainingSection
    privacy: PrivacySection = PrivacySection()
    package: Mapping[str, Any] | None = None
    source: Path | None = None

    @classmethod
    def from_mapping(cls, raw: Any, *, base: Path) -> TrainConfig:
        """Validate a parsed YAML document; relative paths resolve against ``base``."""
        d = _take(
            "config",
            raw,
            {"model", "output_dir", "data", "lora", "optimizer", "training", "privacy", "package"},
        )
        model = d.get("model")
        if not isinstance(model, str) or not model:
            raise TrainingConfigError(
                "config: 'model' must name a model (e.g. HuggingFaceTB/SmolLM2-135M-Instruct)"
            )
        out = d.get("output_dir")
        if not isinstance(out, str) or not out:
            raise TrainingConfigError("config: 'output_dir' must be a path")
        package = d.get("package")
        if package is not None and not isinstance(package, Mapping):
            raise TrainingConfigError("config: 'package' must be a mapping")
        return cls(
            model=model,
            output_dir=(base / out).resolve(),
            data=DataSection.from_mapping(d.get("data"), base),
            lora=LoraSection.from_mapping(d.get("lora")),
            optimizer=OptimizerSection.from_mapping(d.get("optimizer")),
            training=TrainingSection.from_mapping(d.get("training")),
            privacy=PrivacySection.from_mapping(d.get("privacy")),
            package=dict(package) if package is not None else None,
        )

    def to_dict(self) -> dict[str, Any]:
        """JSON-serialisable form (paths as strings)."""

        def conv(value: Any) -> Any:
            if isinstance(value, Path):
                return str(value)
            if isinstance(value, tuple):
                return list(value)
            if isinstance(value, Mapping):
                return {k: conv(v) for k, v in value.items()}
            return value

        out = {
            f.name: getattr(self, f.name)
            for f in dataclasses.fields(self)
            if f.name not in ("source", "package")
        }
        result: dict[str, Any] = {"schema": CONFIG_SCHEMA}
        for key, value in out.items():
            is_instance = dataclasses.is_dataclass(value) and not isinstance(value, type)
            result[key] = conv(dataclasses.asdict(value)) if is_instance else conv(value)
        return result

    def config_hash(self) -> str:
        """SHA-256 over the canonical JSON of everything that determines the run.

        ``output_dir`` and the ``package`` section are excluded: they say where results go,
        not what is trained. Resume refuses a checkpoint whose hash differs.
        """
        payload = self.to_dict()
        payload.pop("output_dir", None)
        canon = json.dumps(payload, sort_keys=True, separators=(",", ":"), ensure_ascii=False)
        return hashlib.sha256(b"tensafe/train-config/v1\x00" + canon.encode()).hexdigest()


def load_config(path: str | os.PathLike[str]) -> TrainConfig:
    """Read and validate a YAML configuration file.

    Raises:
        TrainingConfigError: The file is missing, not YAML, or invalid (one-line message).
    """
    import yaml

    p = Path(path)
    try:
        text = p.read_text(encoding="utf-8")
    except FileNotFoundError:
        raise TrainingConfigError(f"{p}: configuration file not found") from None
    except OSError as exc:
        raise TrainingConfigError(f"{p}: cannot read configuration ({exc.strerror})") from None
    try:
        raw = yaml.safe_load(text)
    except yaml.YAMLError as exc:
        mark = getattr(exc, "problem_mark", None)
        where = f" line {mark.line + 1}" if mark is not None else ""
        raise TrainingConfigError(f"{p}:{where} is not valid YAML") from None
    try:
        cfg = TrainConfig.from_mapping(raw, base=p.parent.resolve())
    except TrainingConfigError as exc:
        raise TrainingConfigError(f"{p}: {exc}") from None
    return dataclasses.replace(cfg, source=p.resolve())
