"""LoRA training and sampling sessions with Tinker's semantics and platform-enforced DP-SGD.

A :class:`LoraTrainingSession` owns one base model with fresh LoRA adapters, its AdamW state
and, under a :class:`~tensafe.privacy.DpPolicy`, a DP-SGD engine and a privacy budget
(planned by :func:`~tensafe.privacy.plan_dp_sgd`, built by
:func:`~tensafe.training.dp.build_dp_sgd`). Each
:class:`~tensafe.training.runtime.types.Datum` is one privacy unit:

* ``forward_backward`` clips every datum's gradient (over all LoRA parameters) to the
  policy's clip norm and adds it to an accumulator; calls (the SDK's chunks) accumulate
  until ``optim_step``. Within one step each privacy unit contributes once: a datum whose
  tokens and targets repeat one already in the step (in the same request or an earlier one)
  is refused. A request is atomic: if any part fails, the step is exactly as before it.
* ``optim_step`` first asks the budget whether one more step stays within the target ε
  (and ``max_steps``); if not it raises before anything changes. Otherwise it adds Gaussian
  noise of standard deviation ``noise_multiplier * clip_norm`` once, divides by the policy's
  ``expected_batch_size`` (never by the realised batch size), applies the optional global
  gradient clip and takes one AdamW step.

**Accounting.** With ``client_chosen_batches`` (the client sends the batches) the engine
cannot verify how they were drawn, so no sampling amplification is claimed: ε is computed
with sample rate 1, as if every privacy unit were in every step. Only ``server_poisson``
(the engine draws each batch from a registered data set with the OS CSPRNG) is accounted with
the Poisson rate ``q = expected_batch_size / N``. The budget may be rebased on a privacy
ledger shared with other runs on the same data (:meth:`LoraTrainingSession.sync_privacy`).

Without a policy (only with ``allow_non_private=True``), gradients of the summed loss
accumulate across calls as in Tinker, and the certificate states that no DP applies.
"""

from __future__ import annotations

import contextlib
import dataclasses
import hashlib
import json
import logging
import tempfile
import threading
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any, Self

import numpy as np
import torch

from tensafe.privacy import (
    DpCertificate,
    DpPolicy,
    DpPolicyError,
    DpSgdEvent,
    PrivacyBudget,
    PrivacyError,
    SamplingMethod,
    plan_dp_sgd,
)
from tensafe.training.dp import (
    DPGradientEngine,
    PoissonSampler,
    RandomSource,
    build_dp_sgd,
    random_source_from_env,
)
from tensafe.training.errors import TrainingConfigError
from tensafe.training.lora import (
    ADAPTER_CONFIG,
    ADAPTER_WEIGHTS,
    LoraSettings,
    apply_lora,
    load_adapter,
    save_adapter,
)
from tensafe.training.models import load_model_and_tokenizer, resolve_model
from tensafe.training.runtime import losses, sampling
from tensafe.training.runtime.errors import (
    InvalidRequestError,
    SessionStateError,
    StateFormatError,
    StepLimitError,
)
from tensafe.training.runtime.state import (
    AdamSnapshot,
    DpSnapshot,
    SessionSnapshot,
    decode_snapshot,
    encode_snapshot,
)
from tensafe.training.runtime.types import AdamParams, Datum, ForwardBackwardResult, SampleResult

__all__ = ["LORA_ALPHA", "LoraTrainingSession", "SamplingSession"]

_log = logging.getLogger(__name__)

#: LoRA ``alpha`` of every session (the update is scaled by ``alpha / rank``).
LORA_ALPHA = 32.0
_MLP = ("gate_proj", "up_proj", "down_proj")
_ATTN = ("q_proj", "k_proj", "v_proj", "o_proj")
_UNEMBED = ("lm_head",)
_MAX_RANK = 1024


def _eos_ids(model: Any, tokenizer: Any) -> list[int]:
    ids: set[int] = set()
    cfg = getattr(model, "generation_config", None)
    eos = getattr(cfg, "eos_token_id", None) if cfg is not None else None
    if eos is None:
        eos = getattr(model.config, "eos_token_id", None)
    if isinstance(eos, int):
        ids.add(eos)
    elif isinstance(eos, list | tuple):
        ids.update(int(e) for e in eos)
    tok_eos = getattr(tokenizer, "eos_token_id", None)
    if isinstance(tok_eos, int):
        ids.add(tok_eos)
    return sorted(ids)


class _ModelHandle:
    """A loaded (possibly LoRA-wrapped) causal LM with its tokenizer and limits."""

    def __init__(self, model: Any, tokenizer: Any, *, base_model_id: str, revision: str) -> None:
        self.model = model
        self.tokenizer = tokenizer
        self.base_model_id = base_model_id
        self.revision = revision
        config = model.config
        self.vocab_size = int(config.vocab_size)
        self.max_length = int(getattr(config, "max_position_embeddings", 2048) or 2048)
        self.eos_ids = _eos_ids(model, tokenizer)
        self.lock = threading.RLock()

    def sample(self, prompt_tokens: Sequence[int], **kwargs: Any) -> SampleResult:
        with self.lock:
            return sampling.sample(
                self.model,
                self.tokenizer,
                prompt_tokens,
                vocab_size=self.vocab_size,
                max_length=self.max_length,
                eos_ids=self.eos_ids,
                **kwargs,
            )

    def compute_logprobs(self, tokens: Sequence[int]) -> list[float | None]:
        checked = sampling.check_tokens(
            tokens, vocab_size=self.vocab_size, max_length=self.max_length, what="tokens"
        )
        with self.lock:
            lps, _ = sampling.prompt_scores(self.model, checked)
        return lps


def _load_base(name: str) -> tuple[Any, Any, str, str]:
    spec = resolve_model(name)
    model, tokenizer = load_model_and_tokenizer(name)
    return model, tokenizer, spec.id, spec.revision


class SamplingSession:
    """Sampling from a base model, optionally with LoRA adapter weights (a sampling client).

    Build one with :meth:`for_base_model` or :meth:`from_adapter_files`.
    """

    def __init__(self, handle: _ModelHandle) -> None:
        self._h = handle

    @classmethod
    def for_base_model(cls, name: str) -> Self:
        """Load ``name`` (registered model or local directory) for sampling."""
        model, tokenizer, model_id, revision = _load_base(name)
        return cls(_ModelHandle(model, tokenizer, base_model_id=model_id, revision=revision))

    @classmethod
    def from_adapter_files(cls, base_model: str, files: Mapping[str, bytes]) -> Self:
        """Load ``base_model`` with the PEFT adapter in ``files`` (from ``sampler_weights_files``).

        Raises:
            InvalidRequestError: If ``files`` is not exactly a PEFT adapter.
        """
        expected = {ADAPTER_CONFIG, ADAPTER_WEIGHTS}
        if not isinstance(files, Mapping) or set(files) != expected:
            raise InvalidRequestError(f"sampler weights must be exactly the files {sorted(expected)}")
        model, tokenizer, model_id, revision = _load_base(base_model)
        with tempfile.TemporaryDirectory(prefix="tensafe-adapter-") as tmp:
            for name, content in files.items():
                (Path(tmp) / name).write_bytes(bytes(content))
            peft_model = load_adapter(model, tmp)
        peft_model.eval()
        return cls(_ModelHandle(peft_model, tokenizer, base_model_id=model_id, revision=revision))

    @property
    def tokenizer(self) -> Any:
        """The model's Hugging Face tokenizer."""
        return self._h.tokenizer

    @property
    def base_model_id(self) -> str:
        """The canonical base model id."""
        return self._h.base_model_id

    def sample(self, prompt_tokens: Sequence[int], **kwargs: Any) -> SampleResult:
        """Sample continuations; see :meth:`LoraTrainingSession.sample`."""
        return self._h.sample(prompt_tokens, **kwargs)

    def compute_logprobs(self, tokens: Sequence[int]) -> list[float | None]:
        """Return each token's log-probability given the previous ones (first is ``None``)."""
        return self._h.compute_logprobs(tokens)


def _datum_digest(tokens: Sequence[int], inputs: Mapping[str, np.ndarray]) -> bytes:
    h = hashlib.sha256(b"tensafe-datum/v1\0")
    h.update(np.asarray(tokens, dtype="<i8").tobytes())
    for key in sorted(inputs):
        arr = np.asarray(inputs[key])
        h.update(key.encode() + b"\0" + arr.dtype.str.encode() + b"\0" + json.dumps(list(arr.shape)).encode())
        h.update(np.ascontiguousarray(arr).tobytes())
    return h.digest()


def _unit_digest(tokens: Sequence[int], inputs: Mapping[str, np.ndarray]) -> bytes:
    """The privacy unit of a datum: its token content (model input and targets).

    Per-token scalars (weights, advantages, sampling log-probabilities) are not part of it:
    two datums with the same tokens and targets are the same unit whatever their weights.
    """
    h = hashlib.sha256(b"tensafe-privacy-unit/v1\0")
    h.update(np.asarray(tokens, dtype="<i8").tobytes())
    targets = inputs.get("target_tokens")
    if targets is not None:
        arr = np.asarray(targets)
        h.update(b"\0" + json.dumps(list(arr.shape)).encode() + b"\0")
        h.update(np.ascontiguousarray(arr, dtype="<i8").tobytes())
    return h.digest()


class _StagedRequest:
    """A ``forward_backward`` computed but not yet part of the step (see ``stage_forward_backward``)."""

    def __init__(
        self,
        session: LoraTrainingSession,
        result: ForwardBackwardResult,
        *,
        count: int,
        units: set[bytes],
        remaining: list[int] | None,
        saved_grads: list[torch.Tensor | None] | None,
    ) -> None:
        self._session = session
        self.result = result
        self.count = count
        self.units = units
        self.remaining = remaining
        self.saved_grads = saved_grads
        self._done = False

    def commit(self) -> None:
        """Make the request part of the current step."""
        with self._session._lock:
            if self._done:
                return
            self._session._commit(self)
            self._finish()

    def discard(self) -> None:
        """Drop the request: the step is exactly as before it."""
        with self._session._lock:
            if self._done:
                return
            self._session._rollback(self.saved_grads)
            self._finish()

    def _finish(self) -> None:
        self._done = True
        self.saved_grads = None
        if self._session._staged is self:
            self._session._staged = None


@dataclasses.dataclass
class _DpState:
    policy: DpPolicy
    dataset_size: int
    noise_multiplier: float
    sample_rate: float
    budget: PrivacyBudget
    engine: DPGradientEngine
    source: RandomSource
    sampler: PoissonSampler | None


class LoraTrainingSession:
    """One LoRA fine-tuning run on one base model (see the module docstring).

    Build one with :meth:`create` or :meth:`from_state_bytes`. Methods are not meant to be
    called concurrently; a lock serialises them anyway.
    """

    def __init__(
        self,
        *,
        handle: _ModelHandle,
        settings: LoraSettings,
        lora_flags: dict[str, bool],
        dp: DpPolicy | None,
        noise_seed: int | None,
        deterministic: bool,
        max_microbatch_size: int,
    ) -> None:
        self._h = handle
        self._settings = settings
        self._flags = lora_flags
        self._policy = dp
        self._noise_seed = noise_seed
        self._deterministic_requested = deterministic
        if (
            isinstance(max_microbatch_size, bool)
            or not isinstance(max_microbatch_size, int)
            or max_microbatch_size < 1
        ):
            raise TrainingConfigError(
                f"max_microbatch_size must be a positive integer, got {max_microbatch_size!r}"
            )
        self._micro = max_microbatch_size
        self._params = [(n, p) for n, p in handle.model.named_parameters() if p.requires_grad]
        self._optimizer = torch.optim.AdamW(
            [p for _, p in self._params], lr=1e-4, betas=(0.9, 0.95), eps=1e-12
        )
        self._step = 0
        self._examples_seen = 0
        self._pending = 0
        self._dp: _DpState | None = None
        self._dataset: list[Datum] | None = None
        self._digests: list[bytes] = []
        self._drawn: list[int] | None = None
        self._remaining: list[int] = []
        # Privacy units (token content digests) already in the current logical step.
        self._step_units: set[bytes] = set()
        self._staged: _StagedRequest | None = None
        self._lock = threading.RLock()
        if dp is not None and dp.sampling == "client_chosen_batches":
            assert dp.dataset_size is not None
            self._setup_dp(dp.dataset_size)

    # ------------------------------------------------------------------ construction
    @classmethod
    def create(
        cls,
        *,
        base_model: str,
        rank: int,
        dp: DpPolicy | None,
        seed: int | None = None,
        train_mlp: bool = True,
        train_attn: bool = True,
        train_unembed: bool = False,
        allow_non_private: bool = False,
        deterministic: bool = False,
        noise_seed: int | None = None,
        max_microbatch_size: int = 16,
    ) -> LoraTrainingSession:
        """Load ``base_model`` and add fresh LoRA adapters.

        Args:
            base_model: A registered model name or a local Hugging Face directory.
            rank: LoRA rank (alpha is fixed at :data:`LORA_ALPHA`).
            dp: The privacy policy; ``None`` trains without DP and requires ``allow_non_private``.
            seed: Seed of the LoRA initialisation (never of the noise).
            train_mlp: Adapt the MLP projections.
            train_attn: Adapt the attention projections.
            train_unembed: Adapt the output (unembedding) layer.
            allow_non_private: Explicit opt-in for ``dp=None`` (the tenant's policy must allow it).
            deterministic: Reproducible, NON-private noise and sampling (tests only); also
                selected by ``TS_DETERMINISTIC=1``. A loud warning is logged and the
                certificate says ``private: false``.
            noise_seed: Seed of the deterministic noise and sampling (0 when None); unused with
                the OS CSPRNG. A server passes its own setting here, never a client's seed.
            max_microbatch_size: Largest physical micro-batch (memory only; no privacy effect).

        Raises:
            DpPolicyError: If ``dp`` is None without ``allow_non_private``, or is invalid.
            TrainingConfigError: If the LoRA settings are invalid.
            UnknownModelError: If the base model is unknown.
        """
        if dp is None and not allow_non_private:
            raise DpPolicyError(
                "refusing to train without differential privacy: pass a DpPolicy, or "
                "allow_non_private=True when the tenant's policy allows disabling DP"
            )
        if dp is not None and not isinstance(dp, DpPolicy):
            raise DpPolicyError("dp must be a DpPolicy or None")
        if isinstance(rank, bool) or not isinstance(rank, int) or not 1 <= rank <= _MAX_RANK:
            raise TrainingConfigError(f"LoRA rank must be an integer in [1, {_MAX_RANK}], got {rank!r}")
        for name, value in (("seed", seed), ("noise_seed", noise_seed)):
            if value is not None and (isinstance(value, bool) or not isinstance(value, int) or value < 0):
                raise TrainingConfigError(f"{name} must be a non-negative integer, got {value!r}")
        targets = (
            *(_ATTN if train_attn else ()),
            *(_MLP if train_mlp else ()),
            *(_UNEMBED if train_unembed else ()),
        )
        if not targets:
            raise TrainingConfigError("at least one of train_mlp, train_attn and train_unembed must be true")
        settings = LoraSettings(rank=rank, alpha=LORA_ALPHA, dropout=0.0, target_modules=targets)
        model, tokenizer, model_id, revision = _load_base(base_model)
        peft_model = apply_lora(model, settings, init_seed=seed)
        peft_model.eval()
        flags = {
            "train_mlp": bool(train_mlp),
            "train_attn": bool(train_attn),
            "train_unembed": bool(train_unembed),
        }
        return cls(
            handle=_ModelHandle(peft_model, tokenizer, base_model_id=model_id, revision=revision),
            settings=settings,
            lora_flags=flags,
            dp=dp,
            noise_seed=noise_seed,
            deterministic=deterministic,
            max_microbatch_size=max_microbatch_size,
        )

    def _setup_dp(self, dataset_size: int, *, noise_multiplier: float | None = None) -> None:
        """Plan σ, q and the budget for ``dataset_size`` units and attach the engine (and sampler).

        ``noise_multiplier`` is the σ of a saved state (never recalibrated on restore).
        """
        policy = self._policy
        assert policy is not None
        plan = plan_dp_sgd(policy=policy, dataset_size=dataset_size, saved_noise_multiplier=noise_multiplier)
        budget = plan.new_budget()
        source = random_source_from_env(seed=self._noise_seed, secure_rng=not self._deterministic_requested)
        engine, sampler = build_dp_sgd(plan, self._h.model, random_source=source)
        self._dp = _DpState(
            policy=policy,
            dataset_size=dataset_size,
            noise_multiplier=plan.noise_multiplier,
            sample_rate=plan.sample_rate,
            budget=budget,
            engine=engine,
            source=source,
            sampler=sampler,
        )

    # ------------------------------------------------------------------ properties
    @property
    def base_model_id(self) -> str:
        """The canonical base model id (registry id or local directory path)."""
        return self._h.base_model_id

    @property
    def base_model_revision(self) -> str:
        """SHA-256 of the base model's weights."""
        return self._h.revision

    @property
    def rank(self) -> int:
        """The LoRA rank."""
        return self._settings.rank

    @property
    def step(self) -> int:
        """Optimizer steps taken so far."""
        return self._step

    @property
    def policy(self) -> DpPolicy | None:
        """The DP policy, or ``None`` for a non-private session."""
        return self._policy

    @property
    def has_dp_state(self) -> bool:
        """Whether the DP engine and budget are set up (not yet in ``server_poisson`` mode
        before the data set is registered; never without a policy)."""
        return self._dp is not None

    @property
    def tokenizer(self) -> Any:
        """The base model's Hugging Face tokenizer."""
        return self._h.tokenizer

    @property
    def model(self) -> Any:
        """The underlying PEFT model (for tests and in-process tools; do not mutate)."""
        return self._h.model

    def info(self) -> dict[str, Any]:
        """Return what ``get_info`` reports: architecture, model name, LoRA rank and targets."""
        return {
            "arch": str(getattr(self._h.model.config, "model_type", "unknown")),
            "model_name": self.base_model_id,
            "is_lora": True,
            "lora_rank": self.rank,
            "lora_targets": list(self._settings.target_modules),
            **self._flags,
            "dp_enabled": self._policy is not None,
        }

    # ------------------------------------------------------------------ data checks
    def _check_data(self, data: object, loss_fn: str) -> list[tuple[list[int], dict[str, np.ndarray]]]:
        if not isinstance(data, Sequence) or isinstance(data, str | bytes):
            raise InvalidRequestError("data must be a list of Datum")
        out = []
        for i, d in enumerate(data):
            if not isinstance(d, Datum):
                raise InvalidRequestError(f"datum {i} is not a Datum")
            tokens = sampling.check_tokens(
                d.model_input,
                vocab_size=self._h.vocab_size,
                max_length=self._h.max_length,
                what=f"datum {i} model_input",
            )
            inputs = losses.validate_loss_inputs(
                loss_fn, d.loss_fn_inputs, length=len(tokens), vocab_size=self._h.vocab_size, index=i
            )
            out.append((tokens, inputs))
        return out

    # ------------------------------------------------------------------ forward / backward
    def forward(
        self, data: Sequence[Datum], loss_fn: str, loss_fn_config: Mapping[str, float] | None = None
    ) -> ForwardBackwardResult:
        """Compute the loss and learner log-probabilities without touching gradients or state."""
        result = self._run(data, loss_fn, loss_fn_config, backward=False)
        assert isinstance(result, ForwardBackwardResult)
        return result

    def forward_backward(
        self, data: Sequence[Datum], loss_fn: str, loss_fn_config: Mapping[str, float] | None = None
    ) -> ForwardBackwardResult:
        """Compute the loss and accumulate gradients for the next :meth:`optim_step` (atomic).

        Args:
            data: The datums (each one a privacy unit under DP).
            loss_fn: One of :data:`~tensafe.training.runtime.losses.LOSS_FUNCTIONS`.
            loss_fn_config: Loss options (``clip_low_threshold``, ``clip_high_threshold``, ``beta``).

        Returns:
            Per-datum ``{"logprobs": float32 array}`` and metrics (``loss:sum`` = the summed loss).

        Raises:
            InvalidRequestError: If a datum, the loss or its config is invalid, or (under DP) a
                datum repeats the tokens and targets of another datum of the same step.
            SessionStateError: In ``server_poisson`` mode, if a datum is not part of the batch
                drawn by :meth:`sample_batch` (or was already used in this step).

        If anything fails, nothing of the request remains in the step.
        """
        with self._lock:
            staged = self.stage_forward_backward(data, loss_fn, loss_fn_config)
            staged.commit()
            return staged.result

    def stage_forward_backward(
        self, data: Sequence[Datum], loss_fn: str, loss_fn_config: Mapping[str, float] | None = None
    ) -> _StagedRequest:
        """Run a ``forward_backward`` whose contribution waits for :meth:`_StagedRequest.commit`.

        The server uses it to make a request's effect on the step depend on the request's
        own completion (committed together with its result), so that a request that fails
        after the computation (e.g. while its result is stored) leaves no trace. Until the
        staged request is committed or discarded, no other ``forward_backward`` or
        ``optim_step`` runs.

        Raises:
            As :meth:`forward_backward`; on any error nothing is staged.
        """
        with self._lock:
            if self._staged is not None:
                raise SessionStateError("a forward_backward is staged; commit or discard it first")
            return self._run(data, loss_fn, loss_fn_config, backward=True)  # type: ignore[return-value]

    def _claim_poisson(self, raw: Sequence[Datum]) -> list[int]:
        """Return the drawn examples still unused once ``raw`` is claimed (nothing is changed)."""
        if self._drawn is None:
            raise SessionStateError(
                "server_poisson mode: call sample_batch() and train on exactly that batch"
            )
        remaining = list(self._remaining)
        for i, d in enumerate(raw):
            digest = _datum_digest(list(d.model_input), d.loss_fn_inputs)
            match = next((j for j in remaining if self._digests[j] == digest), None)
            if match is None:
                raise SessionStateError(
                    f"server_poisson mode: datum {i} is not an unused example of the batch drawn by "
                    "sample_batch() for this step; the engine, not the client, chooses the batches"
                )
            remaining.remove(match)
        return remaining

    def _new_units(self, checked: list[tuple[list[int], dict[str, np.ndarray]]]) -> set[bytes]:
        """The privacy units of a request, refusing one that is already in the step (or twice in it)."""
        seen: dict[bytes, int] = {}
        for i, (tokens, inputs) in enumerate(checked):
            unit = _unit_digest(tokens, inputs)
            if unit in seen:
                raise InvalidRequestError(
                    f"datum {i} repeats the tokens and targets of datum {seen[unit]} of this request: under "
                    "DP-SGD each privacy unit may contribute once per optimizer step; merge the two "
                    "(e.g. add their weights) or send one of them in another step"
                )
            if unit in self._step_units:
                raise InvalidRequestError(
                    f"datum {i} repeats the tokens and targets of a datum of an earlier forward_backward "
                    "of this optimizer step: under DP-SGD each privacy unit may contribute once per step; "
                    "send it in another step"
                )
            seen[unit] = i
        return set(seen)

    def _run(
        self, data: Sequence[Datum], loss_fn: str, config: Mapping[str, float] | None, *, backward: bool
    ) -> ForwardBackwardResult | _StagedRequest:
        with self._lock:
            cfg = losses.validate_config(loss_fn, config)
            checked = self._check_data(data, loss_fn)
            dp = self._dp
            units: set[bytes] = set()
            remaining: list[int] | None = None
            if backward and self._policy is not None:
                if dp is None:
                    raise SessionStateError("server_poisson mode: register_dataset() first")
                if dp.sampler is not None:
                    remaining = self._claim_poisson(data)
                units = self._new_units(checked)
            outputs: list[dict[str, np.ndarray]] = []
            total_loss = 0.0
            clipped = 0
            saved_grads: list[torch.Tensor | None] | None = None
            if backward:
                if dp is not None:
                    dp.engine.begin_request()
                else:  # plain gradients accumulate in .grad: keep a copy to restore on failure
                    saved_grads = [None if p.grad is None else p.grad.clone() for _, p in self._params]
            try:
                for start in range(0, len(checked), self._micro):
                    micro = checked[start : start + self._micro]
                    per_example, lps = self._micro_losses(micro, loss_fn, cfg, grad=backward)
                    total_loss += float(per_example.detach().sum())
                    if backward:
                        if dp is not None:
                            stats = dp.engine.accumulate(per_example)
                            clipped += stats.num_clipped
                        else:
                            per_example.sum().backward()
                    outputs.extend({"logprobs": lp} for lp in lps)
            except BaseException:
                if backward:
                    self._rollback(saved_grads)
                raise
            metrics = {"loss:sum": total_loss}
            if backward and dp is not None:
                metrics["dp_clipped:sum"] = float(clipped)
            result = ForwardBackwardResult(loss_fn_outputs=outputs, metrics=metrics)
            if not backward:
                return result
            staged = _StagedRequest(
                self, result, count=len(checked), units=units, remaining=remaining, saved_grads=saved_grads
            )
            self._staged = staged
            return staged

    def _rollback(self, saved_grads: list[torch.Tensor | None] | None) -> None:
        """Undo a request's gradient contribution (see :meth:`stage_forward_backward`)."""
        if self._dp is not None:
            self._dp.engine.discard_request()
        elif saved_grads is not None:
            for (_, p), g in zip(self._params, saved_grads, strict=True):
                p.grad = g

    def _commit(self, staged: _StagedRequest) -> None:
        if self._dp is not None:
            self._dp.engine.commit_request()
        self._pending += staged.count
        self._examples_seen += staged.count
        self._step_units |= staged.units
        if staged.remaining is not None:
            self._remaining = staged.remaining

    def _micro_losses(
        self,
        micro: list[tuple[list[int], dict[str, np.ndarray]]],
        loss_fn: str,
        cfg: Mapping[str, float],
        *,
        grad: bool,
    ) -> tuple[torch.Tensor, list[np.ndarray]]:
        width = max(len(t) for t, _ in micro)
        pad = self._h.tokenizer.pad_token_id
        pad = 0 if pad is None else int(pad)
        ids = torch.full((len(micro), width), pad, dtype=torch.long)
        mask = torch.zeros((len(micro), width), dtype=torch.long)
        for i, (tokens, _) in enumerate(micro):
            ids[i, : len(tokens)] = torch.tensor(tokens, dtype=torch.long)
            mask[i, : len(tokens)] = 1
        ctx = contextlib.nullcontext() if grad else torch.no_grad()
        with ctx:
            logits = self._h.model(input_ids=ids, attention_mask=mask, use_cache=False).logits.float()
            lse = torch.logsumexp(logits, dim=-1)  # [B, L]
            per_example = []
            lps: list[np.ndarray] = []
            for i, (tokens, inputs) in enumerate(micro):
                n = len(tokens)
                targets = torch.from_numpy(inputs["target_tokens"])
                flat = targets.reshape(n, -1)
                lp = (logits[i, :n].gather(-1, flat) - lse[i, :n].unsqueeze(-1)).reshape(targets.shape)
                per_example.append(losses.compute_loss(loss_fn, lp, inputs, cfg).sum())
                lps.append(lp.detach().to(torch.float32).numpy().copy())
        return torch.stack(per_example), lps

    # ------------------------------------------------------------------ optimizer
    def optim_step(self, adam: AdamParams) -> dict[str, float]:
        """Take one AdamW step with the accumulated (DP) gradient.

        Returns:
            Metrics: ``grad_norm:mean`` (global norm of the applied gradient before
            ``grad_clip_norm``), ``learning_rate:mean``, ``examples:sum`` and, under DP,
            ``dp_epsilon:max`` (ε spent after this step).

        Raises:
            BudgetExceededError: The step would exceed the target ε; nothing was changed.
            StepLimitError: The policy's ``max_steps`` was reached; nothing was changed.
            SessionStateError: In ``server_poisson`` mode, the drawn batch was not fully used.
            InvalidRequestError: If ``adam`` is not an :class:`AdamParams`.
        """
        if not isinstance(adam, AdamParams):
            raise InvalidRequestError("optim_step needs AdamParams")
        with self._lock:
            dp = self._dp
            examples = self._pending
            self.check_optim_step()  # raises before anything changes
            if dp is not None:
                dp.engine.finalize_step()
            params = [p for _, p in self._params]
            grads = [p.grad for p in params if p.grad is not None]
            norm = float(torch.linalg.vector_norm(torch.stack([g.norm() for g in grads]))) if grads else 0.0
            if adam.grad_clip_norm > 0 and grads and norm > adam.grad_clip_norm:
                scale = adam.grad_clip_norm / (norm + 1e-6)
                for g in grads:
                    g.mul_(scale)
            for group in self._optimizer.param_groups:
                group["lr"] = adam.learning_rate
                group["betas"] = (adam.beta1, adam.beta2)
                group["eps"] = adam.eps
                group["weight_decay"] = adam.weight_decay
            self._optimizer.step()
            self._optimizer.zero_grad(set_to_none=True)
            self._step += 1
            self._pending = 0
            metrics = {
                "grad_norm:mean": norm,
                "learning_rate:mean": adam.learning_rate,
                "examples:sum": float(examples),
            }
            self._step_units = set()
            if dp is not None:
                dp.budget.record_step()
                self._drawn = None
                self._remaining = []
                metrics["dp_epsilon:max"] = float(dp.budget.spent_epsilon())
            return metrics

    def check_optim_step(self) -> None:
        """Raise what :meth:`optim_step` would raise before changing anything; change nothing.

        Raises:
            BudgetExceededError: One more step would exceed the target ε.
            StepLimitError: The policy's ``max_steps`` steps were taken.
            SessionStateError: A request is staged; or in ``server_poisson`` mode, no data set is
                registered or the drawn batch was not fully used.
        """
        with self._lock:
            if self._staged is not None:
                raise SessionStateError("a forward_backward is staged; commit or discard it first")
            self.check_budget()
            dp = self._dp
            if dp is not None and dp.sampler is not None:
                if self._drawn is None:
                    raise SessionStateError(
                        "server_poisson mode: call sample_batch() and forward_backward on that batch first"
                    )
                if self._remaining:
                    raise SessionStateError(
                        f"server_poisson mode: {len(self._remaining)} example(s) of the drawn batch were "
                        "not trained on; call forward_backward on the whole sample_batch() first"
                    )

    def check_budget(self) -> None:
        """Raise if one more step would exceed the target ε or ``max_steps``; change nothing.

        Raises:
            BudgetExceededError: One more step would exceed the target ε.
            StepLimitError: The policy's ``max_steps`` steps were taken.
            SessionStateError: In ``server_poisson`` mode, no data set is registered.
        """
        with self._lock:
            dp = self._dp
            if self._policy is None:
                return
            if dp is None:
                raise SessionStateError("server_poisson mode: register_dataset() first")
            if self._policy.max_steps is not None and dp.budget.steps >= self._policy.max_steps:
                raise StepLimitError(
                    f"the DP policy allows {self._policy.max_steps} optimizer steps and all were taken"
                )
            dp.budget.check_step()

    # ------------------------------------------------------------------ privacy ledger
    def sync_privacy(self, events: Sequence[DpSgdEvent]) -> None:
        """Account from now on for exactly ``events`` (a privacy ledger's spend) plus later steps.

        The training API keeps the privacy spent on a data set in a ledger outside the
        restorable session state, shared by every run that trains on it (runs loaded from
        each other's checkpoints); it calls this before every step, so a reloaded or branched
        run continues from the total instead of from the count in its checkpoint.

        Raises:
            SessionStateError: The session has no DP state yet (non-private, or ``server_poisson``
                before its data set is registered).
        """
        with self._lock:
            if self._dp is None:
                raise SessionStateError("this session has no privacy budget to synchronise")
            try:
                self._dp.budget.rebase(events)
            except PrivacyError as exc:
                raise SessionStateError(f"cannot follow the privacy ledger: {exc}") from None

    def step_event(self) -> DpSgdEvent:
        """The spending record of one more step of this session (what a ledger records).

        Raises:
            SessionStateError: The session has no DP state.
        """
        with self._lock:
            if self._dp is None:
                raise SessionStateError("this session spends no privacy")
            return DpSgdEvent(
                noise_multiplier=self._dp.noise_multiplier, sample_rate=self._dp.sample_rate, steps=1
            )

    # ------------------------------------------------------------------ server-side Poisson sampling
    def register_dataset(self, examples: Sequence[Datum]) -> None:
        """Register the training set the engine samples from (``server_poisson`` mode only, once).

        Raises:
            SessionStateError: If the session is not in ``server_poisson`` mode or has a data set.
            InvalidRequestError: If an example is malformed.
            DpPolicyError: If the size contradicts the policy.
        """
        with self._lock:
            if self._policy is None or self._policy.sampling != "server_poisson":
                raise SessionStateError("register_dataset is only available with a server_poisson DP policy")
            if self._dataset is not None:
                raise SessionStateError("a data set is already registered for this session")
            if isinstance(examples, str | bytes) or not isinstance(examples, Sequence) or not examples:
                raise InvalidRequestError("register_dataset needs a non-empty list of Datum")
            digests = []
            units: dict[bytes, int] = {}
            for i, d in enumerate(examples):
                if not isinstance(d, Datum):
                    raise InvalidRequestError(f"example {i} is not a Datum")
                tokens = sampling.check_tokens(
                    d.model_input,
                    vocab_size=self._h.vocab_size,
                    max_length=self._h.max_length,
                    what=f"example {i}",
                )
                unit = _unit_digest(tokens, d.loss_fn_inputs)
                if unit in units:
                    raise InvalidRequestError(
                        f"example {i} repeats the tokens and targets of example {units[unit]}: each privacy "
                        "unit must appear once in the registered data set (a duplicate would be sampled "
                        "twice as often as the accounting assumes); remove the duplicates"
                    )
                units[unit] = i
                digests.append(_datum_digest(list(d.model_input), d.loss_fn_inputs))
            self._setup_dp(len(examples))
            self._dataset = [
                Datum(
                    model_input=list(d.model_input),
                    loss_fn_inputs={k: np.array(v) for k, v in d.loss_fn_inputs.items()},
                )
                for d in examples
            ]
            self._digests = digests

    def sample_batch(self) -> list[Datum]:
        """Return the Poisson batch the engine drew for the current step (possibly empty).

        The same batch is returned until :meth:`optim_step` completes.

        Raises:
            SessionStateError: If no data set is registered.
        """
        with self._lock:
            dp = self._dp
            if dp is None or dp.sampler is None or self._dataset is None:
                raise SessionStateError(
                    "sample_batch needs a server_poisson policy and a registered data set"
                )
            if self._drawn is None:
                self._drawn = dp.sampler.sample(dp.budget.steps)
                self._remaining = list(self._drawn)
            return [self._dataset[i] for i in self._drawn]

    def dataset_fingerprint(self) -> bytes:
        """A SHA-256 over the registered data set's privacy units, independent of their order.

        It identifies the data set (the server turns it into a keyed digest before it stores
        anything); it is a plain hash of the data, so never store or log it as it is.

        Raises:
            SessionStateError: No data set is registered.
        """
        with self._lock:
            if self._dataset is None:
                raise SessionStateError("no data set is registered")
            units = sorted(_unit_digest(d.model_input, d.loss_fn_inputs) for d in self._dataset)
            return hashlib.sha256(b"tensafe-dataset-fingerprint/v1\0" + b"".join(units)).digest()

    def drawn_indices(self) -> list[int] | None:
        """The indices of the batch drawn for the current step (None before :meth:`sample_batch`).

        The batch is secret (the amplification of Poisson sampling depends on it): keep it only
        encrypted. The server persists it before training on it, so that a crash or a reload
        cannot redraw the step's batch (see :meth:`restore_draw`).
        """
        with self._lock:
            return None if self._drawn is None else list(self._drawn)

    def restore_draw(self, indices: Sequence[int]) -> None:
        """Re-establish the batch drawn for the current step (after a reload), instead of redrawing.

        Raises:
            SessionStateError: No data set is registered, another batch is already drawn, or a
                request of this step is pending.
            InvalidRequestError: An index is out of range or repeated.
        """
        with self._lock:
            if self._dp is None or self._dp.sampler is None or self._dataset is None:
                raise SessionStateError(
                    "restore_draw needs a server_poisson policy and a registered data set"
                )
            wanted = [int(i) for i in indices]
            if self._drawn is not None:
                if self._drawn == wanted:
                    return
                raise SessionStateError("another batch is already drawn for this step")
            if self._pending or self._staged is not None:
                raise SessionStateError("requests of this step are pending; cannot restore its batch")
            if len(set(wanted)) != len(wanted) or any(not 0 <= i < len(self._dataset) for i in wanted):
                raise InvalidRequestError("a restored batch must list distinct indices of the data set")
            self._drawn = sorted(wanted)
            self._remaining = list(self._drawn)

    # ------------------------------------------------------------------ sampling
    def sample(
        self,
        prompt_tokens: Sequence[int],
        *,
        max_tokens: int,
        temperature: float = 1.0,
        top_k: int = -1,
        top_p: float = 1.0,
        stop: str | Sequence[str] | Sequence[int] | None = None,
        seed: int | None = None,
        num_samples: int = 1,
        include_prompt_logprobs: bool = False,
        topk_prompt_logprobs: int = 0,
    ) -> SampleResult:
        """Sample from the current LoRA-adapted model (semantics in :mod:`...runtime.sampling`).

        Raises:
            InvalidRequestError: If a parameter or token is invalid.
        """
        with self._lock:
            return self._h.sample(
                prompt_tokens,
                max_tokens=max_tokens,
                temperature=temperature,
                top_k=top_k,
                top_p=top_p,
                stop=stop,
                seed=seed,
                num_samples=num_samples,
                include_prompt_logprobs=include_prompt_logprobs,
                topk_prompt_logprobs=topk_prompt_logprobs,
            )

    def compute_logprobs(self, tokens: Sequence[int]) -> list[float | None]:
        """Return each token's log-probability given the previous ones (first is ``None``)."""
        with self._lock:
            return self._h.compute_logprobs(tokens)

    # ------------------------------------------------------------------ privacy
    def privacy_spent(self) -> dict[str, Any]:
        """Return a JSON-ready summary of the privacy spent so far."""
        with self._lock:
            policy, dp = self._policy, self._dp
            if policy is None:
                return {"dp_enabled": False, "epsilon": None, "steps": self._step}
            out: dict[str, Any] = {
                "dp_enabled": True,
                "target_epsilon": policy.target_epsilon,
                "delta": policy.delta,
                "accountant": policy.accountant,
                "clip_norm": policy.clip_norm,
                "sampling": policy.sampling,
                "expected_batch_size": policy.expected_batch_size,
                "max_steps": policy.max_steps,
                "steps": self._step,
            }
            if dp is None:
                out.update(epsilon=0.0, noise_multiplier=None, sample_rate=None, dataset_size=None)
            else:
                out.update(
                    epsilon=float(dp.budget.spent_epsilon()),
                    noise_multiplier=dp.noise_multiplier,
                    sample_rate=dp.sample_rate,
                    dataset_size=dp.dataset_size,
                )
            return out

    def privacy_certificate(self) -> DpCertificate:
        """Return the DP certificate of the run so far (ε computed by the accountant).

        With client-chosen batches the certificate says ``client_chosen_batches`` and that the
        engine did not sample; with ``server_poisson`` it says Poisson sampling performed by
        the engine. Without DP it states an infinite ε.

        Raises:
            SessionStateError: In ``server_poisson`` mode before a data set is registered.
        """
        with self._lock:
            policy, dp = self._policy, self._dp
            if policy is None:
                return DpCertificate.non_private(
                    steps=self._step,
                    dataset_size=max(1, self._examples_seen),
                    dataset_size_source="counted",
                    expected_batch_size=None,
                    sample_rate=None,
                    sampling_method=SamplingMethod.CLIENT_CHOSEN_BATCHES,
                    sampled_by="client",
                    privacy_unit="datum",
                    notes=("dataset_size counts the datums processed (repeats included).",),
                )
            if dp is None:
                raise SessionStateError("no certificate before the data set is registered")
            poisson = dp.sampler is not None
            history = dp.budget.history()
            return DpCertificate.issue(
                accountant=policy.accountant,
                noise_multiplier=dp.noise_multiplier,
                clip_norm=policy.clip_norm,
                sample_rate=dp.sample_rate,
                steps=sum(e.steps for e in history),
                events=history,
                delta=policy.delta,
                dataset_size=dp.dataset_size,
                dataset_size_source="registered" if poisson else policy.dataset_size_source,
                expected_batch_size=policy.expected_batch_size,
                sampling_method=SamplingMethod.POISSON if poisson else SamplingMethod.CLIENT_CHOSEN_BATCHES,
                sampled_by="engine" if poisson else "client",
                noise_rng="csprng" if dp.source.secure else "deterministic",
                privacy_unit="datum",
                notes=(
                    ("The privacy unit is one Datum of forward_backward.",)
                    + (
                        ()
                        if dp.source.secure
                        else ("DETERMINISTIC (non-cryptographic) noise was used: NOT private.",)
                    )
                ),
            )

    # ------------------------------------------------------------------ persistence
    def sampler_weights_files(self) -> dict[str, bytes]:
        """Return the PEFT adapter files (``adapter_config.json``, ``adapter_model.safetensors``)."""
        with self._lock, tempfile.TemporaryDirectory(prefix="tensafe-sampler-") as tmp:
            target = save_adapter(self._h.model, Path(tmp) / "adapter", base_model_id=self.base_model_id)
            return {name: (target / name).read_bytes() for name in (ADAPTER_CONFIG, ADAPTER_WEIGHTS)}

    def state_bytes(self, *, include_optimizer: bool) -> bytes:
        """Serialize the session (format ``tensafe-lora-session/v1``; see :mod:`...runtime.state`).

        Gradients accumulated since the last :meth:`optim_step` are not saved (as in Tinker).
        """
        with self._lock:
            return encode_snapshot(self._snapshot(include_optimizer=include_optimizer))

    def snapshot(self, *, include_optimizer: bool) -> SessionSnapshot:
        """The session's state as a :class:`~tensafe.training.runtime.state.SessionSnapshot`, cheaply.

        The snapshot refers to the session's live weight and optimizer tensors (no copies):
        it stays valid until the next call that changes them (:meth:`optim_step`,
        :meth:`train_step`, a weight load); serialize it before then
        (:func:`~tensafe.training.runtime.state.encode_snapshot_parts`). ``forward`` and
        ``forward_backward`` leave them unchanged, so a snapshot may be written while they
        run. :meth:`state_bytes` is the self-contained (copying) form.
        """
        with self._lock:
            snap = self._snapshot(include_optimizer=include_optimizer)
            if snap.optimizer is None:
                return snap
            # The step counters are tensors updated in place: freeze them now.
            moments = {n: (a, b, step.clone()) for n, (a, b, step) in snap.optimizer.moments.items()}
            return dataclasses.replace(snap, optimizer=dataclasses.replace(snap.optimizer, moments=moments))

    def _snapshot(self, *, include_optimizer: bool) -> SessionSnapshot:
        """The session as a :class:`~tensafe.training.runtime.state.SessionSnapshot` (no copies)."""
        optimizer: AdamSnapshot | None = None
        if include_optimizer:
            group = self._optimizer.param_groups[0]
            moments = {}
            for n, p in self._params:
                st = self._optimizer.state.get(p)
                if st:
                    moments[n] = (st["exp_avg"], st["exp_avg_sq"], st["step"])
            optimizer = AdamSnapshot(
                lr=group["lr"],
                betas=group["betas"],
                eps=group["eps"],
                weight_decay=group["weight_decay"],
                moments=moments,
            )
        dp = self._dp
        return SessionSnapshot(
            base_model_id=self.base_model_id,
            base_model_revision=self.base_model_revision,
            rank=self._settings.rank,
            alpha=self._settings.alpha,
            target_modules=tuple(self._settings.target_modules),
            flags=dict(self._flags),
            weights={n: p.detach() for n, p in self._params},
            step=self._step,
            examples_seen=self._examples_seen,
            # Deterministic noise is reproducible from this seed (0 when none was given).
            noise_seed=(self._noise_seed or 0) if (dp is not None and not dp.source.secure) else None,
            policy=self._policy,
            dp=None
            if dp is None
            else DpSnapshot(
                dataset_size=dp.dataset_size,
                noise_multiplier=dp.noise_multiplier,
                budget=dp.budget.state_dict(),
                engine=dp.engine.state_dict(),
                secure_rng=dp.source.secure,
                drawn=None if self._drawn is None else list(self._drawn),
            ),
            optimizer=optimizer,
            dataset=self._dataset,
        )

    @classmethod
    def from_state_bytes(
        cls,
        data: bytes,
        *,
        restore_optimizer: bool = True,
        policy: DpPolicy | None = None,
        base_model: str | None = None,
        deterministic: bool = False,
        max_microbatch_size: int = 16,
    ) -> LoraTrainingSession:
        """Restore a session saved by :meth:`state_bytes`.

        Args:
            data: The serialized state.
            restore_optimizer: Restore the AdamW moments (the state must contain them).
            policy: When given, must equal the saved policy (a resumed run keeps its budget).
            base_model: Where to load the base model from (default: the saved id); its weights
                must hash to the saved revision.
            deterministic: Continue with the saved seed's reproducible NON-private noise
                (only for states saved in deterministic mode).
            max_microbatch_size: As in :meth:`create`.

        Raises:
            StateFormatError: If the state is malformed, for another base model revision, or
                lacks what was asked for.
            DpPolicyError: If ``policy`` differs from the saved one.
        """
        snapshot = decode_snapshot(data)
        try:
            return cls._restore(
                snapshot,
                restore_optimizer=restore_optimizer,
                policy=policy,
                base_model=base_model,
                deterministic=deterministic,
                max_microbatch_size=max_microbatch_size,
            )
        except (KeyError, TypeError, ValueError, IndexError, AttributeError) as exc:
            if isinstance(exc, InvalidRequestError | StateFormatError | DpPolicyError):
                raise
            raise StateFormatError(f"session state is malformed ({type(exc).__name__}: {exc})") from None

    @classmethod
    def _restore(
        cls,
        snap: SessionSnapshot,
        *,
        restore_optimizer: bool,
        policy: DpPolicy | None,
        base_model: str | None,
        deterministic: bool,
        max_microbatch_size: int,
    ) -> LoraTrainingSession:
        """Load the base model and apply ``snap`` to a new session (weights, optimizer, DP state)."""
        if policy is not None and policy != snap.policy:
            raise DpPolicyError(
                "the saved session runs under another DP policy; a resumed run keeps the policy and "
                "budget it was saved with"
            )
        if deterministic and snap.noise_seed is None:
            raise StateFormatError(
                "this state was not saved in deterministic mode; resume without deterministic=True"
            )
        settings = LoraSettings(
            rank=snap.rank, alpha=snap.alpha, dropout=0.0, target_modules=snap.target_modules
        )
        model, tokenizer, _model_id, revision = _load_base(base_model or snap.base_model_id)
        if revision != snap.base_model_revision:
            raise StateFormatError(
                f"the base model weights (sha256 {revision[:12]}...) differ from those the state was "
                f"trained on "
                f"(sha256 {snap.base_model_revision[:12]}...)"
            )
        peft_model = apply_lora(model, settings, init_seed=0)
        peft_model.eval()
        session = cls(
            handle=_ModelHandle(peft_model, tokenizer, base_model_id=snap.base_model_id, revision=revision),
            settings=settings,
            lora_flags=dict(snap.flags),
            dp=snap.policy,
            noise_seed=snap.noise_seed,
            deterministic=deterministic,
            max_microbatch_size=max_microbatch_size,
        )
        names = [n for n, _ in session._params]
        if names != list(snap.weights):
            raise StateFormatError("session state parameters do not match the LoRA layout")
        with torch.no_grad():
            for n, p in session._params:
                saved = snap.weights[n]
                if saved.shape != p.shape or saved.dtype != p.dtype:
                    raise StateFormatError(f"session state tensor {n} has the wrong shape or dtype")
                p.copy_(saved)
        if restore_optimizer:
            opt = snap.optimizer
            if opt is None:
                raise StateFormatError(
                    "this state was saved without optimizer state; load it without the optimizer"
                )
            group_values = {
                "lr": opt.lr,
                "betas": opt.betas,
                "eps": opt.eps,
                "weight_decay": opt.weight_decay,
            }
            for group in session._optimizer.param_groups:
                group.update(group_values)
            params = dict(session._params)
            for n, (exp_avg, exp_avg_sq, step) in opt.moments.items():
                session._optimizer.state[params[n]] = {
                    "step": step.clone(),
                    "exp_avg": exp_avg.clone(),
                    "exp_avg_sq": exp_avg_sq.clone(),
                }
        session._step = snap.step
        session._examples_seen = snap.examples_seen
        if snap.dp is not None:
            if session._dp is not None:
                session._dp.engine.close()
                session._dp = None
            if snap.dataset is not None:
                session._dataset = snap.dataset
                session._digests = [_datum_digest(d.model_input, d.loss_fn_inputs) for d in snap.dataset]
            session._setup_dp(snap.dp.dataset_size, noise_multiplier=snap.dp.noise_multiplier)
            assert session._dp is not None
            try:
                session._dp.budget.load_state_dict(snap.dp.budget)
            except PrivacyError as exc:
                raise StateFormatError(f"session state budget is inconsistent: {exc}") from None
            session._dp.engine.load_state_dict(snap.dp.engine)
            if snap.dp.drawn is not None:
                session.restore_draw(snap.dp.drawn)
        return session

    def close(self) -> None:
        """Remove the DP hooks and drop references to the model."""
        with self._lock:
            if self._dp is not None:
                self._dp.engine.close()

    def __repr__(self) -> str:
        dp = "off" if self._policy is None else f"on, sampling={self._policy.sampling}"
        return (
            f"LoraTrainingSession(base_model={self.base_model_id!r}, rank={self.rank}, "
            f"step={self._step}, dp={dp})"
        )
