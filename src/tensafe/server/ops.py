"""The asynchronous operations the worker executes, on :mod:`tensafe.training.runtime` sessions.

A :class:`ComputeOps` holds the worker's in-memory table of loaded sessions (only the
weights live in memory; everything else is in the database and the encrypted store):

* training models, ``{session_id}:train:{n}`` -> :class:`LoraTrainingSession`;
* sampling sessions, ``{session_id}:sample:{n}`` -> :class:`SamplingSession`.

**Memory.** The table is bounded (:mod:`tensafe.server.cache`): at most
``max_loaded_models`` sessions in all and ``max_loaded_per_tenant`` of one tenant; a load
that would exceed a cap first evicts the least recently used entry (the tenant's own when
it is at its cap), idle ones before training runs with un-stepped gradients. An evicted
run is reloaded from its auto-checkpoint on its next request; gradients it held are
reported lost by its next ``optim_step`` (see *Durability*). Before each use a session is
checked against the database (one read): a sampling session whose row is gone, whose
``sampler_weights`` checkpoint was deleted, expired or saved again, or whose tenant was
deleted (crypto-shredded) is evicted and the request fails, as is any request of a
deleted tenant's training run.

**Privacy.** Every DP-SGD step is charged to the run's privacy ledger before it runs
(:mod:`tensafe.server.ledger`): the session is synchronised to the ledger's spend, the
budget is checked against it under the ledger's lock, and the step is recorded; a
server-sampled step's Poisson batch is sealed into its charge before it is trained on. A
``forward_backward`` is staged in the session and becomes part of the step only when its
future completes (``JobResult.on_abort`` discards it otherwise). Non-DP statistics of a
server-sampled batch (its loss, its size) are not returned to the client.

**Durability.** After ``create_model``, ``load_weights`` and every completed
``optim_step`` the session's full state (adapter and optimizer) is written, encrypted
under the tenant's DEK, as a new auto-checkpoint artifact; the ``training_models`` row
points at it (``state_ref``, ``step``, ``state_seq_id``) in the same transaction that
completes the future. The state is serialized in the worker when the request ends (a
consistent snapshot); its encryption, write and fsync and the completing transaction run
in the worker's background committer (``JobResult.durable``, :mod:`tensafe.server.durability`),
overlapped with the model's next queued ``forward``/``forward_backward``. The step's future
completes only after that commit; if the write fails, the future fails (``server``), the
loaded session is marked stale and the next request reloads the last durable state.
A worker that executes a request of a model it has not loaded, or
whose loaded copy is stale (another worker ran requests of the model since), reloads
that auto-checkpoint first. Gradients accumulated by ``forward_backward`` since the last
step are not persisted: when they are lost in a crash, the next ``optim_step`` fails with
a ``server`` error that says which requests to resubmit.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import logging
import secrets
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from typing import Any, BinaryIO, cast

from sqlalchemy import and_, func, select
from sqlalchemy.orm import Session

from tensafe.db import Tenant, utcnow
from tensafe.protocol import CheckpointKind, InvalidTinkerPathError, TinkerPath
from tensafe.server.cache import (
    DEFAULT_MAX_LOADED_MODELS,
    CacheStats,
    Evicted,
    Kind,
    LoadedModels,
    LoadedSession,
)
from tensafe.server.checkpoints import (
    export_external_weights,
    find_checkpoint,
    is_expired,
    record_checkpoint,
)
from tensafe.server.jobs import JobContext, JobFailedError, JobResult, Operation, OperationRegistry
from tensafe.server.ledger import (
    CHARGE_ACTION,
    attach_dataset,
    clear_draw,
    ledger_events,
    new_ledger,
    pending_draw,
    reserve_step,
)
from tensafe.server.models import FutureRow, SamplingSessionRow, TrainingCheckpoint, TrainingModel
from tensafe.server.privacy import EffectivePolicy
from tensafe.server.stability import (
    SERVER_DERIVED_INPUTS,
    refresh_records,
    resolve_provenance,
    seal_records,
    store_records,
)
from tensafe.server.states import FutureState, ModelState, transition
from tensafe.training._heap import settle_heap

__all__ = ["MAX_DATASET_SIZE", "ComputeOps", "default_registry"]

#: Most examples one ``register_dataset`` request may carry.
MAX_DATASET_SIZE = 1_000_000

_log = logging.getLogger("tensafe.server.ops")

#: Sampling knobs the runtime does not implement: refused as user errors, never ignored.
_UNSUPPORTED_SAMPLE_KNOBS = (
    "topk_sample_logprobs",
    "prompt_alt_tokens_k",
    "prompt_logprobs_last_n",
    "target_prompt_logprobs",
)
#: ``max_tokens`` when the client sends none.
DEFAULT_MAX_TOKENS = 64
_ADAPTER_FILES = ("adapter_config.json", "adapter_model.safetensors")


@dataclass
class _Loaded:
    """A training session loaded in this worker.

    ``lost``: forward_backward requests whose gradients a reload lost (reported by the next
    step). ``unstepped``: forward_backward requests run here since the last step (their
    gradients exist only in this session's memory; evicting it would lose them).
    ``committing``: future id -> the step the database records until that request's state
    change is committed (its write runs in the background); cleared once a read of the
    row shows the session's step. ``stale``: a state change of
    this session was never committed; the next request reloads the durable state.
    """

    session: Any
    step: int
    last_seq: int
    lost: list[int] = field(default_factory=list)
    unstepped: list[int] = field(default_factory=list)
    committing: dict[str, int] = field(default_factory=dict)
    stale: bool = False


def _has_unstepped(value: Any) -> bool:
    """Whether a table entry holds gradients that exist nowhere else (``LoadedModels`` busy)."""
    return isinstance(value, _Loaded) and bool(value.unstepped)


@dataclass(frozen=True)
class _SamplerSource:
    """Where a sampling session's weights come from, as the database said when it was checked.

    ``checkpoint`` is ``(run, kind, name)`` of ``model_path`` (None for a base model or an
    ephemeral sampler saved with ``save_weights_for_sampler``).
    """

    base_model: str
    weights_ref: str | None
    model_path: str | None
    checkpoint: tuple[str, str, str] | None


@dataclass(frozen=True)
class _LoadedSampler:
    sampler: Any
    source: _SamplerSource


def _user_errors() -> tuple[type[Exception], ...]:
    from tensafe.training.errors import TrainingError
    from tensafe.training.runtime import USER_ERRORS

    return (*USER_ERRORS, TrainingError)


class ComputeOps:
    """The compute operations of one worker, with its table of loaded sessions."""

    def __init__(
        self,
        *,
        auto_checkpoint: bool = True,
        max_loaded_models: int = DEFAULT_MAX_LOADED_MODELS,
        max_loaded_per_tenant: int | None = None,
    ) -> None:
        """Create an empty table (``auto_checkpoint=False`` only for benchmarks).

        Args:
            auto_checkpoint: Persist the state after every completed step.
            max_loaded_models: Most training and sampling sessions loaded at once.
            max_loaded_per_tenant: Most of them of one tenant (default: half of
                ``max_loaded_models``, at least 1).

        Raises:
            ServerConfigurationError: A cap is not a positive integer, or the per-tenant cap
                exceeds the global one.
        """
        self.auto_checkpoint = auto_checkpoint
        self._models = LoadedModels(
            max_models=max_loaded_models, max_per_tenant=max_loaded_per_tenant, busy=_has_unstepped
        )
        # Views by kind; entries are added only through _put (which needs the tenant).
        self._training = self._models.view("training")
        self._sampling = self._models.view("sampling")

    def __repr__(self) -> str:
        return f"ComputeOps(training={len(self._training)}, sampling={len(self._sampling)})"

    def loaded_models(self) -> list[str]:
        """Return the ids of the training models loaded in memory."""
        return sorted(self._training)

    def loaded_sessions(self) -> list[LoadedSession]:
        """Every loaded training and sampling session, least recently used first."""
        return self._models.entries()

    def memory_stats(self) -> CacheStats:
        """How many sessions are loaded, and how many were evicted so far."""
        return self._models.stats()

    def registry(self) -> OperationRegistry:
        """Return a registry with every operation this server version implements."""
        registry = OperationRegistry()
        for name, handler, idempotent, on_failure in (
            ("create_model", self.create_model, True, _create_failed),
            ("load_weights", self.load_weights, True, _create_failed),
            ("forward_backward", self.forward_backward, False, None),
            ("forward", self.forward, True, None),
            ("optim_step", self.optim_step, False, None),
            ("save_weights", self.save_weights, True, None),
            ("save_weights_for_sampler", self.save_weights_for_sampler, True, None),
            ("save_weights_external", self.save_weights_external, True, None),
            ("sample", self.sample, True, None),
            ("register_dataset", self.register_dataset, False, None),
            ("train_step", self.train_step, False, None),
        ):
            registry.register(
                Operation(
                    name=name,
                    handler=self._guard(handler),
                    idempotent=idempotent,
                    on_failure=on_failure,
                    # They run on the session while its last step is being written.
                    overlaps_state_write=name in ("forward", "forward_backward"),
                )
            )
        return registry

    @staticmethod
    def _guard(handler: Callable[[JobContext], JobResult]) -> Callable[[JobContext], JobResult]:
        """Map the runtime's request errors to user-error futures."""

        def run(ctx: JobContext) -> JobResult:
            try:
                return handler(ctx)
            except _user_errors() as exc:
                raise JobFailedError(str(exc), category="user") from None

        return run

    # ------------------------------------------------------------------ loading

    def _model_row(self, ctx: JobContext) -> TrainingModel:
        with ctx.services.reads() as session:
            row = session.get(TrainingModel, ctx.model_id)
            if row is None or row.tenant_id != ctx.tenant:
                raise JobFailedError(f"unknown model {ctx.model_id!r}", category="user")
            session.expunge(row)
            return row

    def _finished_seqs(self, ctx: JobContext) -> tuple[int, list[int]]:
        """Return the highest completed seq_id of the model and its un-stepped forward_backwards.

        Failed requests do not count: they leave the session as it was.
        """
        with ctx.services.reads() as session:
            last = session.execute(
                select(func.max(FutureRow.seq_id)).where(
                    FutureRow.model_id == ctx.model_id,
                    FutureRow.state == FutureState.COMPLETE,
                    FutureRow.id != ctx.future_id,
                )
            ).scalar_one()
            last_step = session.execute(
                select(func.max(FutureRow.seq_id)).where(
                    FutureRow.model_id == ctx.model_id,
                    FutureRow.request_type.in_(("optim_step", "load_weights", "create_model")),
                    FutureRow.state.in_((FutureState.COMPLETE, FutureState.FAILED)),
                )
            ).scalar_one()
            pending = session.execute(
                select(FutureRow.seq_id).where(
                    FutureRow.model_id == ctx.model_id,
                    FutureRow.request_type == "forward_backward",
                    FutureRow.state == FutureState.COMPLETE,
                    FutureRow.seq_id > (last_step if last_step is not None else -1),
                )
            ).scalars()
            return (int(last) if last is not None else 0), sorted(int(s) for s in pending if s is not None)

    def _training_session(self, ctx: JobContext) -> _Loaded:
        """The model's loaded session, (re)loaded from its auto-checkpoint when needed."""
        assert ctx.model_id is not None
        row = self._live_model_row(ctx)
        last_seq, unstepped = self._finished_seqs(ctx)
        loaded: _Loaded | None = self._training.get(ctx.model_id)
        # Stale when another worker completed requests of this model since (its seq_ids are
        # higher than any we ran) or the step moved; a request we ran that then failed is not.
        # A step of ours whose write is still being committed is not a move either.
        recorded = row.step or 0
        if loaded is not None and loaded.step == recorded:
            loaded.committing.clear()  # the database has caught up with every step we took
        if (
            loaded is not None
            and not loaded.stale
            and (loaded.step == recorded or recorded in loaded.committing.values())
            and loaded.last_seq >= last_seq
        ):
            return loaded
        if row.state_ref is None:
            raise JobFailedError(
                f"model {ctx.model_id!r} has no saved state on this server (it was created by an "
                "older server version or its creation failed); create a new training client",
                category="server",
            )
        if loaded is not None:
            self._training.pop(ctx.model_id)
            loaded.session.close()
            del loaded
        self._make_room(ctx.tenant, ctx.model_id)
        _log.info("loading %s from its auto-checkpoint (step %s)", ctx.model_id, row.step)
        session = self._restore(ctx, row.state_ref, base_model=row.base_model, restore_optimizer=True)
        fresh = _Loaded(session=session, step=int(row.step or 0), last_seq=last_seq, lost=unstepped)
        self._put(ctx.tenant, ctx.model_id, "training", fresh)
        settle_heap()  # keep the loaded model out of later garbage collections
        return fresh

    def _live_model_row(self, ctx: JobContext) -> TrainingModel:
        """The model's row, read together with its tenant (one read); refused for a deleted tenant.

        A deleted (crypto-shredded) tenant's sessions are evicted and its requests fail as for
        an unknown model: nothing it loaded is served from memory any more.
        """
        with ctx.services.reads() as db:
            found = db.execute(
                select(TrainingModel, Tenant.deleted_at)
                .join(Tenant, Tenant.id == TrainingModel.tenant_id)
                .where(TrainingModel.id == ctx.model_id)
            ).one_or_none()
            if found is not None:
                db.expunge(found[0])
        if found is None or found[0].tenant_id != ctx.tenant:
            raise JobFailedError(f"unknown model {ctx.model_id!r}", category="user")
        if found[1] is not None:
            self._forget_tenant(ctx.tenant)
            raise JobFailedError(f"unknown model {ctx.model_id!r}", category="user")
        row: TrainingModel = found[0]
        return row

    # ------------------------------------------------------------------ the bounded table

    def _make_room(self, tenant: str, key: str) -> None:
        """Evict what must go before ``tenant`` loads ``key`` (see :mod:`tensafe.server.cache`)."""
        self._release(self._models.make_room(tenant=tenant, key=key), why="to make room for another model")

    def _put(self, tenant: str, key: str, kind: Kind, value: Any) -> None:
        """Record a loaded session (evicting others if the caps require it)."""
        self._release(self._models.put(key, value, tenant=tenant, kind=kind), why="to make room")

    def _drop(self, tenant: str, key: str, kind: Kind, *, why: str) -> None:
        """Evict ``key`` if ``tenant`` has it loaded as ``kind``, and close it."""
        value = self._models.pop(key, kind=kind, tenant=tenant)
        if value is not None:
            self._release([Evicted(key, tenant, kind, value, _has_unstepped(value))], why=why)

    def _forget_tenant(self, tenant: str) -> None:
        """Evict every session of a deleted tenant and free their memory now."""
        evicted = self._models.pop_tenant(tenant)
        if evicted:
            self._release(evicted, why="because its tenant was deleted")
            settle_heap()  # collect them now: no load follows that would

    @staticmethod
    def _release(evicted: list[Evicted], *, why: str) -> None:
        """Close evicted sessions; their memory is freed with the last reference.

        A training run's gradients since its last step are lost with it: the run's next
        ``optim_step`` fails and names the forward_backward requests to resubmit (the same
        report as after a restart: :meth:`_check_lost` on the reloaded session).
        """
        for entry in evicted:
            value = entry.value
            session = value.session if isinstance(value, _Loaded) else value.sampler
            close = getattr(session, "close", None)
            if callable(close):
                close()
            if entry.busy:
                _log.warning(
                    "unloaded training model %s %s while it held the gradients of forward_backward "
                    "request(s) %s; its next optim_step will ask the client to resubmit them "
                    "(raise TS_SERVER_MAX_LOADED_MODELS / TS_SERVER_MAX_LOADED_PER_TENANT)",
                    entry.key,
                    why,
                    ", ".join(map(str, value.unstepped)),
                )
            else:
                _log.info("unloaded %s session %s %s", entry.kind, entry.key, why)
        evicted.clear()  # drop the last references here, not when the caller's frame ends

    def _restore(self, ctx: JobContext, ref: str, *, base_model: str, restore_optimizer: bool) -> Any:
        from tensafe.training.runtime import LoraTrainingSession

        data = ctx.services.store.get_bytes(ctx.tenant, ref)
        directory = str(ctx.services.catalog.get(base_model).directory())
        return LoraTrainingSession.from_state_bytes(
            data, restore_optimizer=restore_optimizer, base_model=directory
        )

    def _snapshot_state(self, session: Any) -> tuple[str | None, Any]:
        """The auto-checkpoint's artifact id and the session's snapshot (no copies).

        The snapshot refers to the live tensors; it is serialized, encrypted and written by
        the committer (or inline), before anything that changes them runs: only ``forward``
        and ``forward_backward`` of the model may overlap a pending state write
        (:mod:`tensafe.server.durability`), and they leave weights and moments unchanged.
        """
        if not self.auto_checkpoint:
            return None, None
        return "state-" + secrets.token_hex(12), session.snapshot(include_optimizer=True)

    def _finish(self, ctx: JobContext, loaded: _Loaded) -> None:
        """Record that ``loaded`` executed ``ctx`` successfully (call only on success)."""
        assert ctx.seq_id is not None
        loaded.last_seq = max(loaded.last_seq, ctx.seq_id)
        if ctx.request_type == "forward_backward":
            loaded.unstepped.append(ctx.seq_id)  # its gradients now live only in this session
        elif ctx.request_type in ("optim_step", "train_step"):
            loaded.unstepped.clear()

    def _state_result(
        self,
        ctx: JobContext,
        session: Any,
        *,
        json_result: Mapping[str, Any],
        old_ref: str | None,
        recorded_step: int | None,
        ready: bool = False,
        details: Mapping[str, Any] | None = None,
    ) -> JobResult:
        """A result that records the session's new auto-checkpoint with the future.

        The state is snapshotted now (references to its tensors); its serialization and
        encrypted write are the result's ``durable`` part, run by the worker's committer
        (or inline, when nothing is queued) before the completing transaction.
        """
        ref, snapshot = self._snapshot_state(session)
        step = int(session.step)
        spent = json.dumps(_privacy_record(session), sort_keys=True)
        model_id, seq_id, tenant, store = ctx.model_id, ctx.seq_id, ctx.tenant, ctx.services.store

        def apply(db: Session) -> None:
            row = db.get(TrainingModel, model_id)
            if row is None:
                return
            if ref is not None:
                row.state_ref, row.state_seq_id = ref, seq_id
            row.step, row.privacy_spent, row.last_request_time = step, spent, utcnow()
            if ready:
                row.state = transition(row.state, ModelState.READY)

        loaded = self._training.get(str(model_id)) if model_id is not None else None
        if loaded is not None and loaded.session is not session:
            loaded = None
        if loaded is not None:
            loaded.committing[ctx.future_id] = int(recorded_step or 0)
        future_id = ctx.future_id

        def write() -> None:
            if ref is not None and snapshot is not None:
                from tensafe.training.runtime.state import encode_snapshot_parts

                # Serialized here (one hashing pass, no copy), then copied once into the
                # encryptor's buffers as it streams to the store.
                reader = cast(BinaryIO, encode_snapshot_parts(snapshot).reader())
                store.put(tenant, ref, reader, kind="training-state")

        def cleanup() -> None:
            # ``committing`` keeps the entry until the worker reads the row after this commit
            # (a row read just before it still shows the previous step; _training_session).
            if ref is not None and old_ref is not None and old_ref != ref:
                store.delete(tenant, old_ref)

        def abort() -> None:
            if loaded is not None:  # the session moved past what the database records
                loaded.stale = True
                loaded.committing.pop(future_id, None)

        return JobResult(
            json=json_result,
            apply=apply,
            after_commit=cleanup,
            on_abort=abort,
            durable=None if ref is None else write,
            details={"step": step, **(details or {})},
        )

    # ------------------------------------------------------------------ creation

    def create_model(self, ctx: JobContext) -> JobResult:
        """Load the base model with fresh LoRA adapters under the model's effective policy."""
        from tensafe.training.runtime import LoraTrainingSession

        assert ctx.model_id is not None
        row = self._model_row(ctx)
        base_model = str(ctx.payload.get("base_model", row.base_model))
        directory = ctx.services.catalog.get(base_model).directory()
        if not (directory / "config.json").is_file():
            raise JobFailedError(
                f"base model {base_model!r} has no config.json on this server", category="server"
            )
        lora = dict(ctx.payload.get("lora_config") or {})
        optimizer = dict(ctx.payload.get("optimizer_config") or {})
        if optimizer.get("type", "adamw") != "adamw":
            raise JobFailedError(
                f"optimizer {optimizer.get('type')!r} is not supported; this server trains with AdamW",
                category="user",
            )
        try:
            effective = EffectivePolicy.from_json(row.dp_policy)
        except ValueError as exc:
            raise JobFailedError(str(exc), category="server") from None
        self._make_room(ctx.tenant, ctx.model_id)
        session = LoraTrainingSession.create(
            base_model=str(directory),
            rank=int(lora.get("rank", 32)),
            dp=effective.policy,
            seed=lora.get("seed"),
            train_mlp=bool(lora.get("train_mlp", True)),
            train_attn=bool(lora.get("train_attn", True)),
            train_unembed=bool(lora.get("train_unembed", False)),
            allow_non_private=effective.policy is None,
        )
        old = self._training.pop(ctx.model_id, None)
        if old is not None:
            old.session.close()
        self._put(ctx.tenant, ctx.model_id, "training", _Loaded(session=session, step=0, last_seq=0))
        settle_heap()  # keep the loaded model out of later garbage collections
        return self._state_result(
            ctx,
            session,
            json_result={"model_id": ctx.model_id, "type": "create_model"},
            old_ref=row.state_ref,
            recorded_step=row.step,
            ready=True,
            details={
                "base_model": base_model,
                "dp": effective.policy is not None,
                "policy_source": effective.source,
            },
        )

    def load_weights(self, ctx: JobContext) -> JobResult:
        """Create a model from a ``weights`` checkpoint (or reload an existing model's state)."""
        assert ctx.model_id is not None
        row = self._model_row(ctx)
        source = _checkpoint(ctx, str(ctx.payload["path"]), kinds=("weights", "external_weights"))
        optimizer = bool(ctx.payload.get("optimizer", False))
        try:
            effective = EffectivePolicy.from_json(row.dp_policy)
        except ValueError as exc:
            raise JobFailedError(str(exc), category="server") from None
        self._make_room(ctx.tenant, ctx.model_id)
        if source.kind == "external_weights":  # an uploaded adapter (server/external_weights.py)
            session = _from_upload(ctx, source, row, effective.policy)
        else:
            session = self._restore(
                ctx, source.artifact_id or "", base_model=row.base_model, restore_optimizer=optimizer
            )
        restored = session.policy
        if effective.policy is not None and (
            restored is None or not restored.is_at_least_as_strict_as(effective.policy)
        ):
            session.close()
            raise JobFailedError(
                "this checkpoint was trained under a privacy policy that is looser than the one that "
                "applies now; it cannot be resumed",
                category="user",
            )
        # A loaded state continues from its ledger's total, not from the count it carries.
        self.sync_ledger(ctx, row, session)
        old = self._training.pop(ctx.model_id, None)
        if old is not None:
            old.session.close()
        loaded = _Loaded(session=session, step=int(session.step), last_seq=int(ctx.seq_id or 0))
        self._put(ctx.tenant, ctx.model_id, "training", loaded)
        settle_heap()  # keep the loaded model out of later garbage collections
        return self._state_result(
            ctx,
            session,
            json_result={"model_id": ctx.model_id, "path": ctx.payload["path"], "type": "load_weights"},
            old_ref=row.state_ref,
            recorded_step=row.step,
            ready=True,
            details={"source_checkpoint": source.id, "optimizer": optimizer},
        )

    # ------------------------------------------------------------------ training

    def _forward(self, ctx: JobContext, *, backward: bool) -> JobResult:
        from tensafe.protocol.wire import decode_forward_backward_request, encode_forward_backward_output
        from tensafe.training.runtime import Datum

        loaded = self._training_session(ctx)
        assert ctx.payload_bytes is not None
        req = decode_forward_backward_request(ctx.payload_bytes)
        # Provenance spans are checked against the sequences recorded at sampling; for
        # stable_reinforce the recorded sampler logprobs replace the client's.
        inputs, used = resolve_provenance(
            ctx.services.reads, ctx.services.store, tenant=ctx.tenant, loss_fn=req.loss_fn, data=req.data
        )
        data = [
            Datum(model_input=[int(t) for t in d.tokens], loss_fn_inputs=x)
            for d, x in zip(req.data, inputs, strict=True)
        ]
        config = {str(k): v for k, v in req.loss_fn_config.items()} or None
        if not backward:
            result = loaded.session.forward(data, req.loss_fn, loss_fn_config=config)
            staged = None
        else:
            # The request becomes part of the step only once its future completes.
            staged = loaded.session.stage_forward_backward(data, req.loss_fn, loss_fn_config=config)
            result = staged.result
        try:
            body = encode_forward_backward_output(
                result.loss_fn_outputs, result.metrics, type_tag=result.loss_fn_output_type
            )
        except BaseException:
            if staged is not None:
                staged.discard()
            raise
        self._finish(ctx, loaded)
        tenant = ctx.tenant
        return JobResult(
            data=body,
            content_type="application/x-protobuf",
            apply=(lambda db: refresh_records(db, tenant=tenant, ids=used)) if used else None,
            details={"loss_fn": req.loss_fn, "num_datums": len(data)},
            after_commit=None if staged is None else staged.commit,
            on_abort=None if staged is None else staged.discard,
        )

    def forward_backward(self, ctx: JobContext) -> JobResult:
        """Per-example clipped gradients accumulated until ``optim_step``; logprobs out."""
        return self._forward(ctx, backward=True)

    def forward(self, ctx: JobContext) -> JobResult:
        """Outputs and metrics only: no gradient, no state change, no privacy cost."""
        return self._forward(ctx, backward=False)

    def optim_step(self, ctx: JobContext) -> JobResult:
        """One (DP-)AdamW step, then an encrypted auto-checkpoint."""
        from tensafe.training.runtime import AdamParams

        if ctx.payload.get("optimizer_params") is not None or ctx.payload.get("adam_params") is None:
            raise JobFailedError("this server supports only AdamW steps (adam_params)", category="user")
        row = self._model_row(ctx)
        loaded = self._training_session(ctx)
        self._check_lost(ctx, loaded)
        adam = AdamParams(**dict(ctx.payload["adam_params"]))
        self._charge(ctx, row, loaded.session)
        metrics = loaded.session.optim_step(adam)
        self._finish(ctx, loaded)
        loaded.step = int(loaded.session.step)
        spent = loaded.session.privacy_spent()
        return self._state_result(
            ctx,
            loaded.session,
            json_result={"metrics": {k: float(v) for k, v in metrics.items()}, "type": "optim_step"},
            old_ref=row.state_ref,
            recorded_step=row.step,
            details={
                "epsilon_spent": repr(spent.get("epsilon")),
                "dp_enabled": bool(spent.get("dp_enabled")),
            },
        )

    # ------------------------------------------------------------------ privacy ledger

    @staticmethod
    def _ledger_of(ctx: JobContext, row: TrainingModel) -> str:
        """The run's ledger id; a run created before ledgers existed gets one now."""
        if row.ledger_id is not None:
            return row.ledger_id
        with ctx.services.sessions.begin() as db:
            model = db.get(TrainingModel, row.id)
            assert model is not None
            if model.ledger_id is None:
                model.ledger_id = new_ledger(db, model.tenant_id)
            row.ledger_id = model.ledger_id
            return model.ledger_id

    def sync_ledger(self, ctx: JobContext, row: TrainingModel, session: Any) -> None:
        """Tell a DP session what its ledger has spent (every run on the same data)."""
        if session.policy is None or row.ledger_id is None or not session.has_dp_state:
            return
        with ctx.services.reads() as db:
            events = ledger_events(db, row.ledger_id)
        session.sync_privacy(events)

    def _charge(
        self, ctx: JobContext, row: TrainingModel, session: Any, *, draw_blob: bytes | None = None
    ) -> None:
        """Charge the session's next step to its ledger.

        Raises the budget's refusal (and records nothing) when the ledger's spend leaves no room.
        """
        if session.policy is None:
            return
        ledger = self._ledger_of(ctx, row)
        event = session.step_event()
        full_check = draw_blob is None  # a server-sampled step checks its batch after training on it

        def check(events: Any) -> None:
            session.sync_privacy(events)
            if full_check:
                session.check_optim_step()
            else:
                session.check_budget()

        def audit(db: Session, details: dict[str, Any]) -> None:
            ctx.services.audit(
                db, tenant=ctx.tenant, actor=ctx.actor, action=CHARGE_ACTION, resource=ledger, details=details
            )

        with ctx.services.sessions.begin() as db:
            before = reserve_step(
                db,
                tenant=ctx.tenant,
                ledger_id=ledger,
                model_id=str(ctx.model_id),
                step_index=int(session.step),
                noise_multiplier=event.noise_multiplier,
                sample_rate=event.sample_rate,
                check=check,
                audit=audit,
                draw_blob=draw_blob,
            )
        session.sync_privacy(before)

    def _check_lost(self, ctx: JobContext, loaded: _Loaded) -> None:
        """Fail the step when a restart lost gradients accumulated since the last step."""
        if not loaded.lost:
            return
        lost, loaded.lost = loaded.lost, []
        # Drop whatever accumulated since: reload the last completed step.
        self._training.pop(str(ctx.model_id), None)
        loaded.session.close()
        raise JobFailedError(
            "the server restarted (or unloaded this model to stay within its memory limits) after "
            "forward_backward request(s) with seq_id "
            f"{', '.join(map(str, lost))} and lost their accumulated gradients; no step was taken: "
            "run forward_backward again, then optim_step",
            category="server",
        )

    # ------------------------------------------------------------------ server-side sampling

    def register_dataset(self, ctx: JobContext) -> JobResult:
        """Register the run's training set (``server_poisson`` runs; once per run).

        The data set becomes part of the session state, so it is persisted only inside the
        encrypted auto-checkpoint (and the encrypted request payload), never in the database.
        """
        from tensafe.protocol.wire import decode_forward_backward_request
        from tensafe.training.runtime import Datum

        row = self._model_row(ctx)
        loaded = self._training_session(ctx)
        assert ctx.payload_bytes is not None
        req = decode_forward_backward_request(ctx.payload_bytes, max_datums=MAX_DATASET_SIZE)
        derived = set(SERVER_DERIVED_INPUTS)
        if any(d.model_input_spans is not None or derived & set(d.loss_fn_inputs) for d in req.data):
            raise JobFailedError(
                "a registered data set cannot carry provenance spans or sampled_mask (stable_reinforce "
                "runs through forward_backward on recorded samples)",
                category="user",
            )
        data = [
            Datum(model_input=[int(t) for t in d.tokens], loss_fn_inputs=dict(d.loss_fn_inputs))
            for d in req.data
        ]
        loaded.session.register_dataset(data)
        self._finish(ctx, loaded)
        # The same examples registered again (by any run of the tenant) continue one ledger.
        dataset_key = ctx.services.store.tenant_digest(
            ctx.tenant, label=DATASET_KEY_LABEL, data=loaded.session.dataset_fingerprint()
        )
        result = self._state_result(
            ctx,
            loaded.session,
            json_result={"type": "register_dataset", "dataset_size": len(data)},
            old_ref=row.state_ref,
            recorded_step=row.step,
            details={"dataset_size": len(data), "dataset_digest": dataset_key},
        )
        model_id, state_apply = str(ctx.model_id), result.apply

        def apply(db: Session) -> None:
            if state_apply is not None:
                state_apply(db)
            if row.ledger_id is not None:
                attach_dataset(db, model_id=model_id, dataset_key=dataset_key)

        return dataclasses.replace(result, apply=apply)

    def train_step(self, ctx: JobContext) -> JobResult:
        """One DP step sampled by the engine: Poisson batch, ``forward_backward``, ``optim_step``."""
        from tensafe.training.runtime import AdamParams

        row = self._model_row(ctx)
        loaded = self._training_session(ctx)
        self._check_lost(ctx, loaded)
        session = loaded.session
        adam = AdamParams(**dict(ctx.payload["adam_params"]))
        loss_fn = str(ctx.payload["loss_fn"])
        if loss_fn == "stable_reinforce":
            raise JobFailedError(
                "stable_reinforce needs sequences recorded at sampling: use forward_backward, not train_step",
                category="user",
            )
        config = ctx.payload.get("loss_fn_config") or None
        step_index = int(session.step)
        self.sync_ledger(ctx, row, session)
        session.check_budget()  # a refused step draws nothing
        # The step's batch is durable: a batch drawn before a crash or a reload is restored,
        # never drawn again, and a new one is sealed into the step's charge before use.
        draw_ref = _draw_ref(str(ctx.model_id), step_index)
        with ctx.services.reads() as db:
            sealed = pending_draw(db, str(ctx.model_id), step_index)
        if sealed is not None:
            session.restore_draw(json.loads(ctx.services.store.unseal_bytes(ctx.tenant, draw_ref, sealed)))
        batch = session.sample_batch()
        drawn = session.drawn_indices()
        blob, _ = ctx.services.store.seal_bytes(
            ctx.tenant, draw_ref, json.dumps(drawn).encode(), kind="poisson-draw"
        )
        self._charge(ctx, row, session, draw_blob=blob)
        try:
            if batch:
                session.forward_backward(batch, loss_fn, loss_fn_config=config)
            optim = session.optim_step(adam)
        except BaseException:
            # Nothing of a failed step stays in memory: the next request reloads the last
            # completed step and restores this step's batch from its charge.
            self._training.pop(str(ctx.model_id), None)
            session.close()
            raise
        self._finish(ctx, loaded)
        loaded.step = int(session.step)
        spent = session.privacy_spent()
        # Only what the DP mechanism released: the noisy update's figures and ε. The batch's
        # loss, its size and its clipping count are statistics of the private batch.
        metrics = {k: float(optim[k]) for k in ("grad_norm:mean", "learning_rate:mean", "dp_epsilon:max")}
        result = self._state_result(
            ctx,
            session,
            json_result={"type": "train_step", "metrics": metrics},
            old_ref=row.state_ref,
            recorded_step=row.step,
            details={
                "loss_fn": loss_fn,
                "sampling": "poisson (engine)",
                "epsilon_spent": repr(spent.get("epsilon")),
                "dp_enabled": bool(spent.get("dp_enabled")),
            },
        )
        model_id, state_apply = str(ctx.model_id), result.apply

        def apply(db: Session) -> None:
            if state_apply is not None:
                state_apply(db)
            clear_draw(db, model_id, step_index)

        return dataclasses.replace(result, apply=apply)

    # ------------------------------------------------------------------ checkpoints

    def save_weights(self, ctx: JobContext) -> JobResult:
        """``save_state``: the full state (adapter and optimizer), encrypted, as a checkpoint."""
        loaded = self._training_session(ctx)
        data = loaded.session.state_bytes(include_optimizer=True)
        self._finish(ctx, loaded)
        name = str(ctx.payload.get("path") or f"step-{loaded.session.step:06d}")
        return self._store_checkpoint(ctx, "weights", name, {"state": data})

    def save_weights_external(self, ctx: JobContext) -> JobResult:
        """The PEFT adapter (and DP certificate) as ``external_weights`` (see ``server/checkpoints.py``)."""
        loaded = self._training_session(ctx)
        # The exported certificate covers everything spent on this data, by every run.
        row = self._model_row(ctx)
        self.sync_ledger(ctx, row, loaded.session)
        result = export_external_weights(ctx, loaded.session, ledger_id=row.ledger_id)
        self._finish(ctx, loaded)
        return result

    def save_weights_for_sampler(self, ctx: JobContext) -> JobResult:
        """PEFT adapter files for sampling: a named checkpoint or an ephemeral sampling session."""
        loaded = self._training_session(ctx)
        files = loaded.session.sampler_weights_files()
        self._finish(ctx, loaded)
        if ctx.payload.get("path"):
            return self._store_checkpoint(ctx, "sampler_weights", str(ctx.payload["path"]), files)
        seq = ctx.payload.get("sampling_session_seq_id")
        if seq is None:
            raise JobFailedError("save_weights_for_sampler needs a path or a sampling_session_seq_id")
        model = self._model_row(ctx)
        sampler_id = f"{model.session_id}:sample:{int(seq)}"
        with ctx.services.sessions() as db:
            if db.get(SamplingSessionRow, sampler_id) is not None:
                raise JobFailedError(f"sampling session {sampler_id!r} already exists; use the next seq id")
        ref = "sampler-" + secrets.token_hex(12)
        _put_files(ctx, ref, files)
        tenant, session_id, base_model = ctx.tenant, model.session_id, model.base_model

        def apply(db: Session) -> None:
            if db.get(SamplingSessionRow, sampler_id) is not None:
                return  # a re-run after a crash: the row committed then
            db.add(
                SamplingSessionRow(
                    id=sampler_id,
                    tenant_id=tenant,
                    session_id=session_id,
                    seq_id=int(seq),
                    base_model=base_model,
                    model_path=None,
                    weights_ref=ref,
                    created_at=utcnow(),
                )
            )

        return JobResult(
            json={"sampling_session_id": sampler_id, "type": "save_weights_for_sampler"},
            apply=apply,
            details={"sampling_session_id": sampler_id, "artifact": ref},
        )

    def _store_checkpoint(
        self, ctx: JobContext, kind: str, name: str, files: Mapping[str, bytes]
    ) -> JobResult:
        """Encrypt ``files`` as checkpoint ``kind/name`` (a live one is replaced only with overwrite)."""
        model_id, tenant = str(ctx.model_id), ctx.tenant
        try:
            path = str(TinkerPath(run_id=model_id, kind=cast("CheckpointKind", kind), name=name))
        except InvalidTinkerPathError as exc:
            raise JobFailedError(str(exc), category="user") from None
        overwrite = bool(ctx.payload.get("overwrite", False))
        with ctx.services.sessions() as db:
            existing = find_checkpoint(db, model_id, kind, name)
            if existing is not None and not overwrite and not is_expired(existing):
                raise JobFailedError(
                    f"checkpoint {path} already exists; choose another name or pass overwrite=True",
                    category="user",
                )
            old_ref = None if existing is None else existing.artifact_id
        ref = "ckpt-" + secrets.token_hex(12)
        size = _put_files(ctx, ref, files)
        ttl = ctx.payload.get("ttl_seconds")
        metadata = json.dumps(ctx.payload.get("user_metadata") or {}, sort_keys=True)

        def apply(db: Session) -> None:
            record_checkpoint(
                db,
                tenant=tenant,
                model_id=model_id,
                kind=kind,
                name=name,
                artifact_id=ref,
                size_bytes=size,
                user_metadata=metadata,
                ttl_seconds=None if ttl is None else int(ttl),
            )

        def cleanup() -> None:
            if old_ref is not None:
                _delete_files(ctx, old_ref, kind)

        return JobResult(
            json={"path": path, "type": "save_weights" if kind == "weights" else "save_weights_for_sampler"},
            apply=apply,
            after_commit=cleanup,
            details={"checkpoint": path, "artifact": ref, "size_bytes": size},
        )

    # ------------------------------------------------------------------ sampling

    def _sampler(self, ctx: JobContext, sampler_id: str) -> Any:
        """The sampling session, checked against the database before each use (cached or not)."""
        from tensafe.training.runtime import SamplingSession

        cached: _LoadedSampler | None = self._sampling.get(sampler_id)
        checked = None if cached is None else cached.source
        del cached  # a session refused below is freed with the table's reference, not kept by this frame
        source = self._sampler_source(ctx, sampler_id, checked)
        cached = self._sampling.get(sampler_id)
        if cached is not None:
            if cached.source == source:
                return cached.sampler
            # The database names other weights now: never serve the old ones.
            del cached
            self._drop(ctx.tenant, sampler_id, "sampling", why="because its weights changed")
        self._make_room(ctx.tenant, sampler_id)
        directory = str(ctx.services.catalog.get(source.base_model).directory())
        ref = source.weights_ref
        if ref is None:
            sampler = SamplingSession.for_base_model(directory)
        else:
            files = {
                name: ctx.services.store.get_bytes(ctx.tenant, f"{ref}.{i}")
                for i, name in enumerate(_ADAPTER_FILES)
            }
            sampler = SamplingSession.from_adapter_files(directory, files)
        self._put(ctx.tenant, sampler_id, "sampling", _LoadedSampler(sampler=sampler, source=source))
        settle_heap()  # keep the loaded model out of later garbage collections
        return sampler

    def _sampler_source(
        self, ctx: JobContext, sampler_id: str, cached: _SamplerSource | None
    ) -> _SamplerSource:
        """What the database allows ``sampler_id`` to serve now (one statement when it is loaded).

        Raises (after evicting what may no longer be served):
            JobFailedError: ``unknown sampling session`` when the row is gone, belongs to
                another tenant or its tenant was deleted (crypto-shredded); a message that
                the checkpoint is gone when ``model_path`` was deleted, has expired or was
                saved again (it no longer holds the weights the session was created from).
        """
        known = None if cached is None else cached.checkpoint
        stmt = (
            select(SamplingSessionRow, Tenant.deleted_at)
            .join(Tenant, Tenant.id == SamplingSessionRow.tenant_id)
            .where(SamplingSessionRow.id == sampler_id)
        )
        if known is not None:  # a loaded session: its checkpoint row in the same statement
            run, kind, name = known
            stmt = stmt.add_columns(TrainingCheckpoint).outerjoin(
                TrainingCheckpoint,
                and_(
                    TrainingCheckpoint.model_id == run,
                    TrainingCheckpoint.kind == kind,
                    TrainingCheckpoint.name == name,
                ),
            )
        source: _SamplerSource | None = None
        live = tenant_deleted = False
        with ctx.services.reads() as db:
            found: tuple[Any, ...] = tuple(db.execute(stmt).one_or_none() or ())
            row = found[0] if found and found[0].tenant_id == ctx.tenant else None
            tenant_deleted = row is not None and found[1] is not None
            if row is not None and not tenant_deleted:
                coords = _checkpoint_coords(row.model_path)
                source = _SamplerSource(
                    base_model=row.base_model,
                    weights_ref=row.weights_ref,
                    model_path=row.model_path,
                    checkpoint=coords,
                )
                if row.model_path is None:
                    live = True  # a base model, or an ephemeral sampler of a run
                elif coords is not None:
                    ckpt = found[2] if coords == known else find_checkpoint(db, *coords)
                    live = (
                        ckpt is not None
                        and ckpt.tenant_id == ctx.tenant
                        and ckpt.kind in ("sampler_weights", "external_weights")
                        and not is_expired(ckpt)
                        and ckpt.artifact_id == row.weights_ref
                    )
        if tenant_deleted:
            self._forget_tenant(ctx.tenant)
        if source is None or not live:
            self._drop(ctx.tenant, sampler_id, "sampling", why="because the database no longer allows it")
            if source is not None:
                raise JobFailedError(
                    f"sampling session {sampler_id!r} was created from {source.model_path!r}, which was "
                    "deleted, has expired or was saved again since; create a new sampling session from "
                    "a live sampler_weights checkpoint",
                    category="user",
                )
            raise JobFailedError(f"unknown sampling session {sampler_id!r}", category="user")
        return source

    def sample(self, ctx: JobContext) -> JobResult:
        """``asample`` / ``compute_logprobs``: protobuf ``SampleResponse``."""
        from tensafe.protocol.wire import encode_sample_response

        p = ctx.payload
        sampler = self._sampler(ctx, str(p["sampling_session_id"]))
        params = dict(p.get("sampling_params") or {})
        prompt = [int(t) for t in json.loads(ctx.payload_bytes or b"[]")]
        result = sampler.sample(
            prompt,
            max_tokens=int(params.get("max_tokens") or DEFAULT_MAX_TOKENS),
            temperature=float(params.get("temperature", 1.0)),
            top_k=int(params.get("top_k", -1)),
            top_p=float(params.get("top_p", 1.0)),
            stop=params.get("stop"),
            seed=params.get("seed"),
            num_samples=int(p.get("num_samples", 1)),
            include_prompt_logprobs=bool(p.get("prompt_logprobs") or False),
            topk_prompt_logprobs=int(p.get("topk_prompt_logprobs", 0)),
        )
        body = encode_sample_response(
            [(s.tokens, s.logprobs, s.stop_reason) for s in result.sequences],
            prompt_logprobs=result.prompt_logprobs,
        )
        apply = None
        if p.get("record_stability_info"):
            # Recorded in the transaction that completes the future: the records always
            # describe the result the client receives (see tensafe.server.stability).
            sampler_id, tenant = str(p["sampling_session_id"]), ctx.tenant
            sealed = seal_records(
                ctx.services.store,
                tenant,
                sampling_session_id=sampler_id,
                seq_id=int(p["seq_id"]),
                prompt=prompt,
                sequences=[(s.tokens, s.logprobs) for s in result.sequences],
            )

            def apply(db: Session) -> None:
                store_records(db, tenant=tenant, sampling_session_id=sampler_id, sealed=sealed)

        return JobResult(
            data=body,
            content_type="application/x-protobuf",
            apply=apply,
            details={"sampling_session_id": p["sampling_session_id"], "num_samples": len(result.sequences)},
        )


# --------------------------------------------------------------------------- helpers


def _checkpoint(ctx: JobContext, path: str, *, kinds: tuple[str, ...]) -> TrainingCheckpoint:
    try:
        parsed = TinkerPath.parse(path)
    except InvalidTinkerPathError as exc:
        raise JobFailedError(str(exc), category="user") from None
    with ctx.services.sessions() as db:
        row = find_checkpoint(db, parsed.run_id, parsed.kind, parsed.name)
        if row is None or row.tenant_id != ctx.tenant or parsed.kind not in kinds or is_expired(row):
            raise JobFailedError(f"unknown checkpoint {path!r}", category="user")
        db.expunge(row)
        return row


def _from_upload(ctx: JobContext, source: TrainingCheckpoint, row: TrainingModel, policy: Any) -> Any:
    """A training session from an uploaded ``external_weights`` checkpoint (weights only)."""
    from tensafe.server.external_weights import training_session_from_upload

    ref = source.artifact_id or ""
    return training_session_from_upload(
        directory=str(ctx.services.catalog.get(row.base_model).directory()),
        adapter_files={
            name: ctx.services.store.get_bytes(ctx.tenant, f"{ref}.{i}")
            for i, name in enumerate(_ADAPTER_FILES)
        },
        lora_config=json.loads(row.lora_config or "{}"),
        policy=policy,
    )


def _checkpoint_coords(model_path: str | None) -> tuple[str, str, str] | None:
    """``(run, kind, name)`` of a sampling session's ``model_path`` (None: none, or malformed)."""
    if model_path is None:
        return None
    try:
        path = TinkerPath.parse(model_path)
    except InvalidTinkerPathError:
        return None
    return path.run_id, path.kind, path.name


def _put_files(ctx: JobContext, ref: str, files: Mapping[str, bytes]) -> int:
    """Store a checkpoint's files as encrypted artifacts ``<ref>.<i>``; return the total size."""
    names = ["state"] if set(files) == {"state"} else list(_ADAPTER_FILES)
    size = 0
    for i, name in enumerate(names):
        ctx.services.store.put_bytes(
            ctx.tenant, f"{ref}.{i}" if len(names) > 1 else ref, files[name], kind="checkpoint"
        )
        size += len(files[name])
    return size


def _delete_files(ctx: JobContext, ref: str, kind: str) -> None:
    if kind == "weights":
        ctx.services.store.delete(ctx.tenant, ref)
    else:
        for i in range(len(_ADAPTER_FILES)):
            ctx.services.store.delete(ctx.tenant, f"{ref}.{i}")


#: Label of the keyed digest that identifies a registered data set (``privacy_ledgers.dataset_key``).
DATASET_KEY_LABEL = b"tensafe/dataset-key/v1"


def _draw_ref(model_id: str, step_index: int) -> str:
    """Record id of a step's sealed Poisson batch (binds the seal to the run and the step)."""
    return f"draw-{hashlib.sha256(model_id.encode()).hexdigest()[:32]}-{step_index}"


def _privacy_record(session: Any) -> dict[str, Any]:
    """What ``training_models.privacy_spent`` holds: the summary and the certificate so far."""
    from tensafe.training.runtime import SessionStateError

    try:
        certificate: dict[str, Any] | None = session.privacy_certificate().to_dict()
    except SessionStateError:
        certificate = None
    return {"spent": session.privacy_spent(), "certificate": certificate}


def _create_failed(session: Session, ctx: JobContext, message: str) -> None:
    if ctx.model_id is None:
        return
    row = session.get(TrainingModel, ctx.model_id)
    if row is not None and row.state != ModelState.READY:
        row.state, row.error = transition(row.state, ModelState.FAILED), message[:4000]


def default_registry(*, auto_checkpoint: bool = True) -> OperationRegistry:
    """Return a registry with every operation this server version implements (a fresh table)."""
    return ComputeOps(auto_checkpoint=auto_checkpoint).registry()
