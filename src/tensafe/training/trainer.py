"""The ``tensafe train`` loop: DP-SGD LoRA fine-tuning with checkpoints and a certificate.

One run reads a :class:`~tensafe.training.config.TrainConfig`, and writes into its
``output_dir``::

    output_dir/
      adapter/                  PEFT adapter + dp_certificate.json + evidence.json (atomic)
      dp_certificate.json       copy of the certificate, next to the metrics
      dataset_commitment.key    the key of evidence.json's dataset commitment (0600; never packed)
      metrics.jsonl             one JSON line per logged step (loss, ε, tokens/s, ...)
      summary.json              held-out loss before/after, ε, steps, timings
      training.png              loss and ε against steps (when matplotlib is installed)
      checkpoints/step-NNNNNN/  resumable state (adapter weights, optimizer, budget, engine)

Privacy accounting follows the engine exactly: each logical step is one Poisson-sampled
batch at rate ``q = batch_size / N`` drawn by the engine, noise is added once per step
(also to an empty batch), and the budget refuses the step that would exceed the target
ε. A checkpoint captures the model *and* the step count in one atomic directory, so a
resumed run neither repeats nor loses a step.

Training-batch losses in ``metrics.jsonl`` are computed on private examples and are not
covered by the DP guarantee (as in every DP-SGD library); treat the metrics file as
sensitive, like the data. Held-out loss is computed on the held-out split.

The certificate (``tensafe.dp_certificate/v2``) is signed by the ``signer`` the caller
passes, in practice the deployment signing key (``tensafe train`` opens it with
:class:`tensafe.keys.KeyManager`); ``signer=None`` must be written out to get an unsigned
certificate, and the result says so. ``evidence.json`` (``tensafe.evidence/v2``) names the
training records only by a keyed commitment (HMAC-SHA256 under a random per-run key that stays
in ``output_dir``, see :func:`tensafe.training.data.records_commitment`), never by a plain
hash that would let anyone confirm a guess about the data. With ``TS_DETERMINISTIC=1`` the
noise is not private: the certificate, ``evidence.json``, ``summary.json`` and every
``metrics.jsonl`` line say ``private: false``, and no ε is written anywhere.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import logging
import math
import os
import shutil
import tempfile
import time
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Any, cast

from tensafe._fsutil import atomic_write_json, fsync_dir
from tensafe.errors import TenSafeError
from tensafe.privacy import (
    CERTIFICATE_FILENAME,
    BudgetExceededError,
    DpCertificate,
    DpPlan,
    DpPolicy,
    PrivacyBudget,
    SamplingMethod,
    plan_dp_sgd,
    validate_delta,
)
from tensafe.privacy.certificate import CertificateSigner
from tensafe.training.config import CONFIG_SCHEMA, TrainConfig
from tensafe.training.errors import TrainingConfigError, TrainingError

if TYPE_CHECKING:
    import torch
    from peft import PeftModel
    from transformers import PreTrainedModel, PreTrainedTokenizerBase

    from tensafe.training.data import TokenizedExample
    from tensafe.training.dp import DPGradientEngine, PoissonSampler

__all__ = [
    "CHECKPOINT_SCHEMA",
    "EVIDENCE_SCHEMA",
    "BudgetStopError",
    "ModelLoader",
    "TrainResult",
    "dp_policy_of",
    "evaluate_loss",
    "generate_sample",
    "per_example_loss",
    "train",
]

_log = logging.getLogger(__name__)

CHECKPOINT_SCHEMA = "tensafe.checkpoint/v1"
#: Budget target used when only σ is configured: large enough never to bind.
_NO_TARGET = 1e9
#: Schema of ``adapter/evidence.json`` (v2: keyed dataset commitment and ``private``).
EVIDENCE_SCHEMA = "tensafe.evidence/v2"

#: ``name -> (model, tokenizer)``; the default is :func:`tensafe.training.models.load_model_and_tokenizer`.
ModelLoader = Callable[[str], "tuple[PreTrainedModel, PreTrainedTokenizerBase]"]
#: Called after every finished step with ``(step, record)``; tests use it to simulate crashes.
StepCallback = Callable[[int, dict[str, Any]], None]


class BudgetStopError(TrainingError):
    """The privacy budget refused a step; the run stopped at the last allowed step.

    The adapter, certificate and summary of that step were written before this was raised.

    Attributes:
        budget_error: The accountant's refusal (step, ε it would reach, target).
        result: What the run produced up to the last allowed step.
    """

    exit_code = 3

    def __init__(self, budget_error: BudgetExceededError, result: TrainResult) -> None:
        self.budget_error = budget_error
        self.result = result
        super().__init__(
            f"{budget_error}. The adapter of the last allowed step ({result.steps}) "
            f"is in {result.adapter_dir}"
        )


@dataclasses.dataclass(frozen=True)
class TrainResult:
    """What a finished (or budget-stopped) run produced.

    Attributes:
        certificate: The certificate written (signed unless the run passed ``signer=None``).
        signed_by: Key id of the key that signed the certificate; ``None`` when unsigned.
        evidence_path: ``adapter/evidence.json``.
        commitment_key_path: The key of the evidence's dataset commitment (outside the adapter).
    """

    output_dir: Path
    adapter_dir: Path
    certificate: DpCertificate
    steps: int
    eval_loss_before: float | None
    eval_loss_after: float | None
    resumed_from: int | None
    metrics_path: Path
    summary_path: Path
    plot_path: Path | None
    signed_by: str | None
    evidence_path: Path
    commitment_key_path: Path
    sample: str | None = None


# --------------------------------------------------------------------------- losses


def _decoder_and_head(model: Any) -> tuple[Any, Any] | None:
    """Return ``(decoder, frozen lm_head)`` when the head can be applied to selected positions."""
    base = model.get_base_model() if hasattr(model, "get_base_model") else model
    get_decoder = getattr(base, "get_decoder", None)
    get_head = getattr(base, "get_output_embeddings", None)
    if get_decoder is None or get_head is None:
        return None
    decoder, head = get_decoder(), get_head()
    if decoder is None or head is None or any(p.requires_grad for p in head.parameters()):
        return None
    if getattr(base.config, "final_logit_softcapping", None):
        return None
    return decoder, head


def _loss_sums(model: Any, batch: Any) -> tuple[torch.Tensor, torch.Tensor]:
    """Per-example sums of token cross-entropy over supervised tokens, and their counts."""
    import torch
    import torch.nn.functional as F

    labels = batch.labels[:, 1:]
    mask = labels.ne(-100)
    counts = mask.sum(dim=1)
    parts = _decoder_and_head(model)
    if parts is None:
        logits = model(**batch.model_inputs()).logits[:, :-1, :].float()
        token_loss = F.cross_entropy(
            logits.reshape(-1, logits.shape[-1]), labels.clamp_min(0).reshape(-1), reduction="none"
        ).view_as(labels)
        return (token_loss * mask).sum(dim=1), counts
    decoder, head = parts
    hidden = decoder(**batch.model_inputs()).last_hidden_state[:, :-1, :]
    rows, cols = mask.nonzero(as_tuple=True)
    token_loss = F.cross_entropy(head(hidden[rows, cols]).float(), labels[rows, cols], reduction="none")
    sums = torch.zeros(labels.shape[0], dtype=token_loss.dtype, device=token_loss.device)
    return sums.index_add(0, rows, token_loss), counts


def per_example_loss(model: Any, batch: Any) -> torch.Tensor:
    """Mean token cross-entropy of each example over its supervised tokens, shape ``(B,)``.

    Each entry depends on its own example only (the privacy unit), which is what the DP
    engine's per-example clipping requires. Padding and prompt tokens (label ``-100``)
    contribute nothing. When the output head is frozen, it is applied only at supervised
    positions (the head over a 49k vocabulary is a large share of a small model's compute);
    the result equals the one from full logits.
    """
    sums, counts = _loss_sums(model, batch)
    return sums / counts.clamp_min(1)


def evaluate_loss(
    model: Any, examples: Sequence[TokenizedExample], pad_id: int, *, batch_size: int = 16
) -> float | None:
    """Token-weighted mean cross-entropy over ``examples`` (``None`` when empty)."""
    import torch

    from tensafe.training.data import collate

    if not examples:
        return None
    was_training = model.training
    model.eval()
    total = 0.0
    count = 0
    with torch.no_grad():
        for start in range(0, len(examples), batch_size):
            sums, counts = _loss_sums(model, collate(examples[start : start + batch_size], pad_id))
            total += float(sums.sum())
            count += int(counts.sum())
    if was_training:
        model.train()
    return total / max(count, 1)


def generate_sample(
    model: Any, tokenizer: Any, prompt: str | Sequence[dict[str, str]], *, max_new_tokens: int = 64
) -> str:
    """Greedy completion of ``prompt`` (a user message, or chat messages) with the chat template."""
    import torch

    messages = [{"role": "user", "content": prompt}] if isinstance(prompt, str) else list(prompt)
    text = tokenizer.apply_chat_template(messages, tokenize=False, add_generation_prompt=True)
    enc = tokenizer(text, return_tensors="pt", add_special_tokens=False)
    was_training = model.training
    model.eval()
    with torch.no_grad():
        out = model.generate(
            **enc,
            max_new_tokens=max_new_tokens,
            do_sample=False,
            pad_token_id=tokenizer.pad_token_id
            if tokenizer.pad_token_id is not None
            else tokenizer.eos_token_id,
        )
    if was_training:
        model.train()
    return str(tokenizer.decode(out[0, enc["input_ids"].shape[1] :], skip_special_tokens=True)).strip()


# --------------------------------------------------------------------------- files


def _library_versions() -> dict[str, str | None]:
    from importlib import metadata

    out: dict[str, str | None] = {}
    for name in ("tensafe", "torch", "transformers", "peft", "dp-accounting", "prv-accountant"):
        try:
            out[name] = metadata.version(name)
        except metadata.PackageNotFoundError:
            out[name] = None
    return out


# --------------------------------------------------------------------------- checkpoints


class _Checkpoints:
    """Atomic, self-contained checkpoint directories under ``output_dir/checkpoints``."""

    def __init__(self, root: Path, keep: int) -> None:
        self.root = root
        self.keep = keep

    def _dirs(self) -> list[Path]:
        if not self.root.is_dir():
            return []
        found = [p for p in self.root.iterdir() if p.is_dir() and p.name.startswith("step-")]
        return sorted(found, key=lambda p: int(p.name.split("-", 1)[1]))

    def latest(self) -> Path | None:
        for path in reversed(self._dirs()):
            if (path / "state.json").is_file():
                return path
        return None

    def save(self, step: int, *, model: Any, optimizer: Any, state: dict[str, Any]) -> Path:
        import torch
        from safetensors.torch import save_file

        self.root.mkdir(parents=True, exist_ok=True)
        final = self.root / f"step-{step:06d}"
        tmp = Path(tempfile.mkdtemp(prefix=f".step-{step:06d}.", dir=self.root))
        try:
            weights = {
                n: p.detach().cpu().contiguous() for n, p in model.named_parameters() if p.requires_grad
            }
            save_file(weights, str(tmp / "trainable.safetensors"))
            torch.save(optimizer.state_dict(), tmp / "optimizer.pt")
            with open(tmp / "state.json", "w", encoding="utf-8") as fh:
                json.dump(state, fh, indent=2, sort_keys=True)
                fh.flush()
                os.fsync(fh.fileno())
            for name in ("trainable.safetensors", "optimizer.pt"):
                with open(tmp / name, "rb") as fh:
                    os.fsync(fh.fileno())
            fsync_dir(tmp)
            if final.exists():
                shutil.rmtree(final)
            os.replace(tmp, final)
            fsync_dir(self.root)
        except BaseException:
            shutil.rmtree(tmp, ignore_errors=True)
            raise
        for old in self._dirs()[: -self.keep]:
            shutil.rmtree(old, ignore_errors=True)
        return final

    @staticmethod
    def load(path: Path, *, model: Any, optimizer: Any) -> dict[str, Any]:
        import torch
        from safetensors.torch import load_file

        state: dict[str, Any] = json.loads((path / "state.json").read_text(encoding="utf-8"))
        if state.get("schema") != CHECKPOINT_SCHEMA:
            raise TrainingError(f"{path}: unsupported checkpoint format {state.get('schema')!r}")
        weights = load_file(str(path / "trainable.safetensors"))
        params = dict(model.named_parameters())
        missing = [n for n, p in params.items() if p.requires_grad and n not in weights]
        if missing or any(n not in params for n in weights):
            raise TrainingError(f"{path}: checkpoint does not match the model's trainable parameters")
        with torch.no_grad():
            for name, tensor in weights.items():
                params[name].copy_(tensor)
        optimizer.load_state_dict(torch.load(path / "optimizer.pt", weights_only=True))
        return state


# --------------------------------------------------------------------------- metrics


class _Metrics:
    """``metrics.jsonl``: one line per logged step; truncated to the checkpoint on resume."""

    def __init__(self, path: Path) -> None:
        self.path = path

    def truncate_after(self, step: int) -> None:
        """Drop lines of steps >= ``step`` (they were logged after the checkpoint we resume from)."""
        if not self.path.exists():
            return
        keep = []
        for line in self.path.read_text(encoding="utf-8").splitlines():
            try:
                record = json.loads(line)
            except json.JSONDecodeError:
                continue  # a torn last line from a crash
            if isinstance(record, dict) and isinstance(record.get("step"), int) and record["step"] < step:
                keep.append(line)
        tmp = self.path.with_suffix(".jsonl.tmp")
        tmp.write_text("".join(f"{line}\n" for line in keep), encoding="utf-8")
        os.replace(tmp, self.path)

    def append(self, record: dict[str, Any]) -> None:
        self.path.parent.mkdir(parents=True, exist_ok=True)
        with open(self.path, "a", encoding="utf-8") as fh:
            fh.write(json.dumps(record, sort_keys=True) + "\n")
            fh.flush()

    def read(self) -> list[dict[str, Any]]:
        if not self.path.exists():
            return []
        out = []
        for line in self.path.read_text(encoding="utf-8").splitlines():
            try:
                out.append(json.loads(line))
            except json.JSONDecodeError:
                continue
        return out


def plot_metrics(
    metrics: Sequence[dict[str, Any]],
    path: Path,
    *,
    target_epsilon: float | None = None,
    private: bool = True,
) -> Path | None:
    """Plot training loss and ε spent against steps into a PNG (``None`` without matplotlib).

    With ``private=False`` no ε is drawn and the title says the run is not private.
    """
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        return None
    steps = [m["step"] + 1 for m in metrics if m.get("loss") is not None]
    losses = [m["loss"] for m in metrics if m.get("loss") is not None]
    eps_points = (
        [(m["step"] + 1, m["epsilon"]) for m in metrics if m.get("epsilon") is not None] if private else []
    )
    fig, ax1 = plt.subplots(figsize=(7, 4))
    ax1.plot(steps, losses, color="tab:blue", label="training loss (private batches)")
    ax1.set_xlabel("step")
    ax1.set_ylabel("loss", color="tab:blue")
    if eps_points:
        ax2 = ax1.twinx()
        ax2.plot([s for s, _ in eps_points], [e for _, e in eps_points], color="tab:red", label="ε spent")
        if target_epsilon is not None:
            ax2.axhline(target_epsilon, color="tab:red", linestyle="--", linewidth=0.8, label="ε target")
        ax2.set_ylabel("ε spent", color="tab:red")
    ax1.set_title("TenSafe training" if private else "TenSafe training: NOT differentially private")
    fig.tight_layout()
    tmp = path.with_suffix(".tmp.png")
    fig.savefig(tmp, dpi=100)
    plt.close(fig)
    os.replace(tmp, path)
    return path


# --------------------------------------------------------------------------- the loop


def _default_loader(name: str) -> tuple[PreTrainedModel, PreTrainedTokenizerBase]:
    from tensafe.training.models import load_model_and_tokenizer

    def progress(message: str) -> None:
        print(f"[model] {message}", flush=True)

    return load_model_and_tokenizer(name, progress=progress)


def _resolve_steps(cfg: TrainConfig, n: int, batch_size: float) -> int:
    t = cfg.training
    if t.steps is not None:
        return t.steps
    assert t.epochs is not None
    return max(1, math.ceil(t.epochs * n / batch_size))


def train(
    config: TrainConfig,
    *,
    signer: CertificateSigner | None,
    model_loader: ModelLoader | None = None,
    resume: bool = True,
    show_progress: bool = True,
    on_step: StepCallback | None = None,
    sample_prompt: str | Sequence[dict[str, str]] | None = None,
) -> TrainResult:
    """Run (or resume) the training described by ``config``.

    The run is a pipeline of stages, each a function below: open the output directory
    (:func:`_open_run`), check the signer, read the data (:func:`_load_inputs`), load and
    tokenize (:func:`_load_model`), plan the privacy (:func:`_plan_privacy`), add LoRA and the
    DP engine (:func:`_build_model`), restore the latest checkpoint (:func:`_resume`), train
    (:func:`_train_loop`), evaluate (:func:`_evaluate`) and write the certificate, adapter,
    evidence and summary (:func:`_write_outputs`).

    Args:
        config: The validated configuration.
        signer: Signs the DP certificate (both copies): the deployment signing key, or
            anything with ``sign(message, *, context)`` and ``verifying_key()``. There is no
            default: ``signer=None`` must be passed on purpose and writes an UNSIGNED
            certificate that nobody can verify (a warning is logged and
            ``TrainResult.signed_by`` is ``None``). The signer is checked before training.
        model_loader: Returns ``(model, tokenizer)`` for the configured model name.
        resume: Continue from the latest checkpoint in ``output_dir`` when there is one
            (its configuration hash must match); ``False`` refuses a non-empty run dir.
        show_progress: Draw a progress bar on stderr.
        on_step: Called after each finished step (after its checkpoint, if any).
        sample_prompt: When given (a user message or chat messages), a greedy completion of
            it is generated at the end.

    Raises:
        TrainingConfigError: Invalid data or privacy parameters (nothing is written).
        DpPolicyError: No noise multiplier reaches the target ε (nothing is written).
        TrainingError: The signer cannot produce a signature that its own public key
            verifies (nothing is written).
        BudgetStopError: The next step would exceed the ε target; the adapter of the
            last allowed step has been written before this is raised.
    """
    import torch

    torch.set_num_threads(max(1, min(torch.get_num_threads(), os.cpu_count() or 1)))
    run = _open_run(config, resume=resume)
    signed_by = _check_signer(signer)  # a broken signer fails now, not after the training
    inputs = _load_inputs(config)
    loaded = _load_model(config, inputs, model_loader)
    privacy = _plan_privacy(config, n=len(loaded.train_ex), latest=run.latest)
    built = _build_model(config, loaded.model, privacy)
    start = _resume(run, built, loaded, privacy)
    loop = _train_loop(
        config, run, built, loaded, privacy, start, show_progress=show_progress, on_step=on_step
    )
    eval_after, sample = _evaluate(built, loaded, sample_prompt)
    result = _write_outputs(
        config,
        run,
        inputs,
        loaded,
        built,
        privacy,
        start,
        loop,
        signer=signer,
        signed_by=signed_by,
        eval_after=eval_after,
        sample=sample,
    )
    if loop.stopped is not None:
        raise BudgetStopError(loop.stopped, result)
    return result


# --------------------------------------------------------------------------- stages


@dataclasses.dataclass(frozen=True)
class _Run:
    """Where the run writes, and the checkpoint it resumes from (if any)."""

    out: Path
    checkpoints: _Checkpoints
    latest: Path | None


@dataclasses.dataclass(frozen=True)
class _Inputs:
    """The training and held-out records (validated JSONL)."""

    train_records: list[dict[str, Any]]
    eval_records: list[dict[str, Any]]


@dataclasses.dataclass(frozen=True)
class _Loaded:
    """The base model and tokenizer, and the tokenized examples."""

    model: Any
    tokenizer: Any
    pad_id: int
    train_ex: list[TokenizedExample]
    eval_ex: list[TokenizedExample]


@dataclasses.dataclass(frozen=True)
class _Privacy:
    """The run's size and privacy plan (``plan`` is ``None`` when ``privacy.enabled`` is false)."""

    n: int
    batch_size: int
    sample_rate: float
    steps: int
    plan: DpPlan | None


@dataclasses.dataclass(frozen=True)
class _Built:
    """The LoRA model with its optimizer, and the DP engine, sampler and budget of the plan."""

    model: Any
    optimizer: Any
    config_hash: str
    engine: DPGradientEngine | None
    sampler: PoissonSampler | None
    budget: PrivacyBudget | None

    @property
    def private(self) -> bool:
        """A guarantee holds only for DP-SGD with CSPRNG noise (``TS_DETERMINISTIC=1`` gives none)."""
        return self.engine is not None and self.engine.random_source.secure


@dataclasses.dataclass(frozen=True)
class _Start:
    """Where the loop starts: step, metrics file, held-out loss before training."""

    step: int
    metrics: _Metrics
    eval_before: float | None
    resumed_from: int | None


@dataclasses.dataclass(frozen=True)
class _LoopResult:
    """What the loop did: steps counted by the budget (or run), the refusal that stopped it."""

    done_steps: int
    stopped: BudgetExceededError | None
    train_seconds: float


def _open_run(cfg: TrainConfig, *, resume: bool) -> _Run:
    """Find the latest checkpoint in ``output_dir``; refuse a finished run or an unwanted resume."""
    out = cfg.output_dir
    checkpoints = _Checkpoints(out / "checkpoints", cfg.training.keep_checkpoints)
    latest = checkpoints.latest() if out.exists() else None
    if latest is None and (out / "adapter").exists():
        raise TrainingConfigError(f"{out} already holds a finished run; choose another output_dir")
    if latest is not None and not resume:
        raise TrainingConfigError(f"{out} holds checkpoints; resume or choose another output_dir")
    return _Run(out=out, checkpoints=checkpoints, latest=latest)


def _load_inputs(cfg: TrainConfig) -> _Inputs:
    """Read and split the records; check δ and the batch size on them before any model loads."""
    from tensafe.training.data import load_jsonl, train_eval_split

    records = load_jsonl(cfg.data.train)
    if cfg.data.eval is not None:
        train_records, eval_records = records, load_jsonl(cfg.data.eval)
    elif cfg.data.eval_fraction > 0:
        train_records, eval_records = train_eval_split(
            records, eval_fraction=cfg.data.eval_fraction, seed=cfg.data.split_seed
        )
    else:
        train_records, eval_records = records, []
    # Cheap checks on the raw records first, so bad settings fail before a model loads.
    if cfg.privacy.enabled:
        validate_delta(cfg.privacy.delta, len(train_records))
    if cfg.training.batch_size > len(train_records):
        raise TrainingConfigError(
            f"training.batch_size {cfg.training.batch_size} exceeds the {len(train_records)} training records"
        )
    return _Inputs(train_records=train_records, eval_records=eval_records)


def _load_model(cfg: TrainConfig, inputs: _Inputs, model_loader: ModelLoader | None) -> _Loaded:
    """Load the base model and tokenizer, and tokenize the training and held-out records."""
    from tensafe.training._heap import settle_heap
    from tensafe.training.data import tokenize_examples

    model, tokenizer = (model_loader or _default_loader)(cfg.model)
    settle_heap()  # the model's objects stay out of every later garbage collection
    pad_id = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else tokenizer.eos_token_id
    train_ex = tokenize_examples(inputs.train_records, tokenizer, max_length=cfg.data.max_length)
    eval_ex = (
        tokenize_examples(inputs.eval_records, tokenizer, max_length=cfg.data.max_length)
        if inputs.eval_records
        else []
    )
    return _Loaded(model=model, tokenizer=tokenizer, pad_id=pad_id, train_ex=train_ex, eval_ex=eval_ex)


def dp_policy_of(cfg: TrainConfig, *, dataset_size: int, steps: int) -> DpPolicy:
    """The DP policy a ``tensafe train`` run enforces on itself (``privacy.enabled`` must be true).

    The engine draws every batch (``server_poisson``, so q = B/N), σ is calibrated for the
    planned ``steps`` unless ``privacy.noise_multiplier`` is set, and without a
    ``target_epsilon`` the budget never binds (the run is bounded by its steps; ε is still
    reported).

    Raises:
        DpPolicyError: The section does not form a valid policy for ``dataset_size`` examples.
    """
    priv = cfg.privacy
    return DpPolicy(
        target_epsilon=priv.target_epsilon if priv.target_epsilon is not None else _NO_TARGET,
        delta=priv.delta,
        clip_norm=priv.clip_norm,
        accountant=priv.accountant,
        noise_multiplier=priv.noise_multiplier,
        dataset_size=dataset_size,
        sampling="server_poisson",
        expected_batch_size=cfg.training.batch_size,
        max_steps=steps,
        dataset_size_source="declared",
    )


def _plan_privacy(cfg: TrainConfig, *, n: int, latest: Path | None) -> _Privacy:
    """Count the steps and plan σ, q and the budget (reusing the σ of a resumed run, bit for bit)."""
    batch_size = cfg.training.batch_size
    if batch_size > n:
        raise TrainingConfigError(f"training.batch_size {batch_size} exceeds the {n} training examples")
    steps = _resolve_steps(cfg, n, batch_size)
    plan: DpPlan | None = None
    if cfg.privacy.enabled:
        validate_delta(cfg.privacy.delta, n)
        plan = plan_dp_sgd(
            policy=dp_policy_of(cfg, dataset_size=n, steps=steps),
            dataset_size=n,
            saved_noise_multiplier=_saved_noise_multiplier(latest) if latest is not None else None,
        )
    else:
        _log.warning("privacy.enabled is false: this run is NOT differentially private")
    return _Privacy(n=n, batch_size=batch_size, sample_rate=batch_size / n, steps=steps, plan=plan)


def _build_model(cfg: TrainConfig, base: Any, privacy: _Privacy) -> _Built:
    """Add LoRA adapters and AdamW; attach the DP engine and sampler of the plan."""
    import torch

    from tensafe.training.dp import build_dp_sgd, random_source_from_env
    from tensafe.training.lora import LoraSettings, apply_lora

    settings = LoraSettings(
        rank=cfg.lora.rank,
        alpha=cfg.lora.alpha,
        dropout=cfg.lora.dropout,
        target_modules=cfg.lora.target_modules,
        layers_to_transform=cfg.lora.layers,
    )
    model = cast("PreTrainedModel", apply_lora(base, settings, init_seed=cfg.training.seed))
    trainable = [p for p in model.parameters() if p.requires_grad]
    optimizer = torch.optim.AdamW(
        trainable,
        lr=cfg.optimizer.learning_rate,
        weight_decay=cfg.optimizer.weight_decay,
        betas=(cfg.optimizer.beta1, cfg.optimizer.beta2),
    )
    engine = sampler = budget = None
    if privacy.plan is not None:
        budget = privacy.plan.new_budget()
        engine, sampler = build_dp_sgd(
            privacy.plan, model, random_source=random_source_from_env(seed=cfg.training.seed)
        )
    return _Built(
        model=model,
        optimizer=optimizer,
        config_hash=cfg.config_hash(),
        engine=engine,
        sampler=sampler,
        budget=budget,
    )


def _resume(run: _Run, built: _Built, loaded: _Loaded, privacy: _Privacy) -> _Start:
    """Restore the latest checkpoint (same configuration only), or measure the held-out loss."""
    run.out.mkdir(parents=True, exist_ok=True)
    metrics = _Metrics(run.out / "metrics.jsonl")
    latest = run.latest
    if latest is None:
        metrics.truncate_after(0)
        eval_before = evaluate_loss(built.model, loaded.eval_ex, loaded.pad_id)
        return _Start(step=0, metrics=metrics, eval_before=eval_before, resumed_from=None)
    state = _Checkpoints.load(latest, model=built.model, optimizer=built.optimizer)
    if state.get("config_hash") != built.config_hash:
        raise TrainingConfigError(
            f"{latest} was written by a different configuration; use a new output_dir to change settings"
        )
    start = int(state["step"])
    if built.budget is not None:
        built.budget.load_state_dict(state["budget"])
    if built.engine is not None:
        built.engine.load_state_dict(state["engine"])
    metrics.truncate_after(start)
    _log.info("resuming from %s (step %d)", latest, start)
    print(f"Resuming from checkpoint at step {start}/{privacy.steps}.", flush=True)
    return _Start(step=start, metrics=metrics, eval_before=state.get("eval_loss_before"), resumed_from=start)


def _train_loop(
    cfg: TrainConfig,
    run: _Run,
    built: _Built,
    loaded: _Loaded,
    privacy: _Privacy,
    start: _Start,
    *,
    show_progress: bool,
    on_step: StepCallback | None,
) -> _LoopResult:
    """Run the steps: budget check, batch, clipped gradients, noise, AdamW, metrics, checkpoint.

    Private runs train on the engine's Poisson batches; non-private runs on shuffled
    fixed-size batches from a seeded generator keyed by step. The budget is asked before
    every step; its refusal ends the loop (returned as ``stopped``).
    """
    import torch

    from tensafe.training.data import collate
    from tensafe.training.dp import random_source_from_env, split_microbatches
    from tensafe.training.dp.rng import Purpose

    model, optimizer, engine, sampler, budget = (
        built.model,
        built.optimizer,
        built.engine,
        built.sampler,
        built.budget,
    )
    n, batch_size, steps = privacy.n, privacy.batch_size, privacy.steps
    plain_source = random_source_from_env(seed=cfg.training.seed) if engine is None else None

    def plain_batch(step: int) -> list[int]:
        assert plain_source is not None
        raw = plain_source.random_bytes(8, purpose=Purpose.SAMPLING, step=step)
        g = torch.Generator().manual_seed(int.from_bytes(raw, "big") >> 1)
        return sorted(torch.randperm(n, generator=g)[:batch_size].tolist())

    # Nothing below shows an ε without a guarantee (the certificate derives the same).
    private = built.private
    bar = None
    if show_progress:
        from tqdm import tqdm

        desc = "train" if private else "train [NOT PRIVATE]"
        bar = tqdm(total=steps, initial=start.step, desc=desc, unit="step", dynamic_ncols=True)
    model.train()
    step = start.step
    stopped: BudgetExceededError | None = None
    t_run = time.perf_counter()
    try:
        for step in range(start.step, steps):
            if budget is not None:
                try:
                    budget.check_step()
                except BudgetExceededError as exc:
                    stopped = exc
                    break
            t0 = time.perf_counter()
            indices = sampler.sample(step) if sampler is not None else plain_batch(step)
            tokens = 0
            loss_sum = 0.0
            norms: list[float] = []
            for micro in split_microbatches(indices, cfg.training.micro_batch_size):
                batch = collate([loaded.train_ex[i] for i in micro], loaded.pad_id)
                tokens += int(batch.attention_mask.sum())
                losses = per_example_loss(model, batch)
                loss_sum += float(losses.detach().sum())
                if engine is not None:
                    norms.extend(engine.accumulate(losses).grad_norms.tolist())
                else:
                    (losses.sum() / len(indices)).backward()
            record: dict[str, Any] = {"step": step, "batch": len(indices), "private": private}
            if engine is not None:
                stats = engine.finalize_step()
                record["clipped"] = stats.num_clipped
                if norms:
                    record["grad_norm_median"] = sorted(norms)[len(norms) // 2]
            optimizer.step()
            optimizer.zero_grad(set_to_none=True)
            if budget is not None:
                budget.record_step()
            dt = time.perf_counter() - t0
            record["loss"] = loss_sum / len(indices) if indices else None
            record["tokens_per_s"] = tokens / dt if dt > 0 else None
            record["seconds"] = dt
            last = step + 1 == steps
            if private and budget is not None and (step % cfg.training.log_every == 0 or last):
                record["epsilon"] = budget.spent_epsilon()
            start.metrics.append(record)
            if (step + 1) % cfg.training.checkpoint_every == 0 or last:
                run.checkpoints.save(
                    step + 1,
                    model=model,
                    optimizer=optimizer,
                    state={
                        "schema": CHECKPOINT_SCHEMA,
                        "config_hash": built.config_hash,
                        "step": step + 1,
                        "budget": budget.state_dict() if budget is not None else None,
                        "engine": engine.state_dict() if engine is not None else None,
                        "eval_loss_before": start.eval_before,
                        "noise_multiplier": (
                            privacy.plan.noise_multiplier if privacy.plan is not None else None
                        ),
                    },
                )
            if bar is not None:
                post = {"loss": f"{record['loss']:.3f}" if record["loss"] is not None else "-"}
                if "epsilon" in record:
                    post["ε"] = f"{record['epsilon']:.2f}"
                if record["tokens_per_s"]:
                    post["tok/s"] = f"{record['tokens_per_s']:.0f}"
                bar.set_postfix(post)
                bar.update(1)
            if on_step is not None:
                on_step(step, record)
        else:
            step = steps
    finally:
        if bar is not None:
            bar.close()
        if engine is not None:
            engine.close()
    done_steps = budget.steps if budget is not None else step
    return _LoopResult(done_steps=done_steps, stopped=stopped, train_seconds=time.perf_counter() - t_run)


def _evaluate(
    built: _Built, loaded: _Loaded, sample_prompt: str | Sequence[dict[str, str]] | None
) -> tuple[float | None, str | None]:
    """Held-out loss after training, and the greedy completion of ``sample_prompt`` (if any)."""
    eval_after = evaluate_loss(built.model, loaded.eval_ex, loaded.pad_id)
    sample = generate_sample(built.model, loaded.tokenizer, sample_prompt) if sample_prompt else None
    return eval_after, sample


def _certificate(privacy: _Privacy, loop: _LoopResult, *, private: bool) -> DpCertificate:
    """The run's DP certificate (unsigned): from the plan, or the non-private statement."""
    method = SamplingMethod.POISSON if privacy.plan is not None else SamplingMethod.SHUFFLED
    plan = privacy.plan
    if plan is not None:
        certificate = DpCertificate.issue(
            accountant=plan.policy.accountant,
            noise_multiplier=plan.noise_multiplier,
            clip_norm=plan.clip_norm,
            sample_rate=plan.sample_rate,
            steps=loop.done_steps,
            delta=plan.policy.delta,
            dataset_size=privacy.n,
            dataset_size_source="counted",
            expected_batch_size=privacy.batch_size,
            sampling_method=method,
            sampled_by="engine",
            noise_rng="csprng" if private else "deterministic",
        )
    else:
        certificate = DpCertificate.non_private(
            steps=loop.done_steps,
            dataset_size=privacy.n,
            dataset_size_source="counted",
            expected_batch_size=privacy.batch_size,
            sample_rate=privacy.sample_rate,
            sampling_method=method,
            sampled_by="engine",
        )
    assert certificate.private == private
    return certificate


def _write_outputs(
    cfg: TrainConfig,
    run: _Run,
    inputs: _Inputs,
    loaded: _Loaded,
    built: _Built,
    privacy: _Privacy,
    start: _Start,
    loop: _LoopResult,
    *,
    signer: CertificateSigner | None,
    signed_by: str | None,
    eval_after: float | None,
    sample: str | None,
) -> TrainResult:
    """Write the (signed) certificate, the adapter with its evidence (atomic), summary and plot."""
    from tensafe.training.data import COMMITMENT_KEY_FILENAME, COMMITMENT_SCHEME, records_commitment
    from tensafe.training.lora import save_adapter

    out = run.out
    private = built.private
    certificate = _certificate(privacy, loop, private=private)
    if signer is not None:
        certificate = _signed(certificate, signer)
    config_hash = built.config_hash
    # The commitment key stays in output_dir, outside adapter/ (what gets packed and shipped).
    key_path = out / COMMITMENT_KEY_FILENAME
    commitment_key = _commitment_key(key_path)
    evidence = {
        "schema": EVIDENCE_SCHEMA,
        "training_run_id": hashlib.sha256(f"{config_hash}:{out}".encode()).hexdigest()[:32],
        "config_sha256": config_hash,
        "config_schema": CONFIG_SCHEMA,
        "base_model": cfg.model,
        "dataset_commitment": {
            "scheme": COMMITMENT_SCHEME,
            "value": records_commitment(inputs.train_records, key=commitment_key),
        },
        "dataset_size": privacy.n,
        "steps": loop.done_steps,
        "private": certificate.private,
        "dp_enabled": certificate.dp_enabled,
        "noise_rng": certificate.noise_rng,
        "audit_chain_head": None,
        "library_versions": _library_versions(),
    }
    adapter_dir = out / "adapter"
    staging = Path(tempfile.mkdtemp(prefix=".adapter.", dir=out))
    try:
        staged = save_adapter(cast("PeftModel", built.model), staging / "adapter", base_model_id=cfg.model)
        certificate.write(staged / CERTIFICATE_FILENAME)
        atomic_write_json(staged / "evidence.json", evidence)
        if adapter_dir.exists():
            shutil.rmtree(adapter_dir)
        os.replace(staged, adapter_dir)
        fsync_dir(out)
    finally:
        shutil.rmtree(staging, ignore_errors=True)
    certificate.write(out / CERTIFICATE_FILENAME)
    summary = {
        "steps": loop.done_steps,
        "planned_steps": privacy.steps,
        "dataset_size": privacy.n,
        "eval_examples": len(loaded.eval_ex),
        "sample_rate": privacy.sample_rate,
        "noise_multiplier": privacy.plan.noise_multiplier if privacy.plan is not None else None,
        "private": certificate.private,
        "dp_enabled": certificate.dp_enabled,
        "noise_rng": certificate.noise_rng,
        "epsilon": certificate.epsilon,
        "delta": certificate.delta,
        "eval_loss_before": start.eval_before,
        "eval_loss_after": eval_after,
        "train_seconds_this_session": loop.train_seconds,
        "resumed_from": start.resumed_from,
        "stopped_by_budget": loop.stopped is not None,
        "statement": certificate.statement,
        "certificate_signed_by": signed_by,
        "dataset_commitment_key": str(key_path),
    }
    atomic_write_json(out / "summary.json", summary)
    plot_path = plot_metrics(
        start.metrics.read(),
        out / "training.png",
        target_epsilon=cfg.privacy.target_epsilon if private else None,
        private=private,
    )
    return TrainResult(
        output_dir=out,
        adapter_dir=adapter_dir,
        certificate=certificate,
        steps=loop.done_steps,
        eval_loss_before=start.eval_before,
        eval_loss_after=eval_after,
        resumed_from=start.resumed_from,
        metrics_path=start.metrics.path,
        summary_path=out / "summary.json",
        plot_path=plot_path,
        signed_by=signed_by,
        evidence_path=adapter_dir / "evidence.json",
        commitment_key_path=key_path,
        sample=sample,
    )


def _check_signer(signer: CertificateSigner | None) -> str | None:
    """Return the signer's key id after a test signature; warn loudly when there is no signer."""
    if signer is None:
        _log.warning(
            "signer=None: the DP certificate of this run will be UNSIGNED; nobody can verify who issued it"
        )
        return None
    # A throw-away message under its own context: never anything a certificate verifier accepts.
    probe, context = b"signer check", "tensafe/trainer/signer-check/v1"
    try:
        verifier = signer.verifying_key()
        verifier.verify(signer.sign(probe, context=context), probe, context=context)
        return verifier.key_id
    except TenSafeError as exc:
        raise TrainingError(f"the certificate signer does not work ({exc}); nothing was trained") from None


def _signed(certificate: DpCertificate, signer: CertificateSigner) -> DpCertificate:
    """Sign ``certificate`` and check the result with the signer's own public key."""
    signed = certificate.sign(signer)
    signed.verify_signature(signer.verifying_key())
    return signed


def _commitment_key(path: Path) -> bytes:
    """The run's dataset commitment key: read it (resumed run) or create it (mode 0600)."""
    from tensafe.training.data import new_commitment_key, read_commitment_key, write_commitment_key

    if path.exists() or path.is_symlink():
        return read_commitment_key(path)
    key = new_commitment_key()
    write_commitment_key(path, key)
    return key


def _saved_noise_multiplier(checkpoint: Path) -> float | None:
    try:
        state = json.loads((checkpoint / "state.json").read_text(encoding="utf-8"))
    except (OSError, json.JSONDecodeError):
        return None
    value = state.get("noise_multiplier") if isinstance(state, dict) else None
    return float(value) if isinstance(value, int | float) and not isinstance(value, bool) else None
