"""Which adapters a caller may use, and which of them are resident in the engines.

The API layer (:mod:`tensafe.serving.api`) asks the :class:`AdapterRegistry` for the target
of each request: :meth:`AdapterRegistry.acquire` turns the request's ``model`` and the
authenticated :class:`ServingCaller` into a :class:`Target` (an engine and the engine's
adapter id, or ``None`` for the base model), and :meth:`AdapterRegistry.release` ends the use.

**Sources.** Adapters come from :class:`AdapterSource` objects: the caller's own encrypted
``sampler_weights`` checkpoints in ``tensafe server``, verified TSSP packages in ``tensafe
serve``. A source says which names are its own (:meth:`AdapterSource.resolve`), fetches the
decrypted files into memory (:meth:`AdapterSource.fetch`) and tells whether a resolved
adapter may still be served (:meth:`AdapterSource.check`: deleted, expired, revoked). Every
method of a source is blocking (database, decryption); the registry calls them in a worker
thread. A name that belongs to a source but is not visible to the caller (another tenant's,
unknown, deleted, expired) is a :class:`~tensafe.serving.errors.ModelNotFoundError`, the
same answer in every case.

**Identity.** The engine knows an adapter by :attr:`AdapterRef.adapter_id`, a digest of the
source, the owning tenant, the name and the content version (the checkpoint's artifact id,
the package's header digest). Two tenants never share an id, and an adapter saved again
under the same name is a new id: the old weights are never served for the new name.

**Residency.** At most ``max_resident`` adapters are loaded in all engines together
(``TS_SERVE_MAX_RESIDENT_ADAPTERS``, :func:`tensafe.config.serve_max_resident_adapters`). A
request for an adapter that is not resident loads it; when every slot is taken, the least
recently used adapter that no request is using is unloaded first; when none is idle the
request is refused with :class:`~tensafe.serving.errors.ServingOverloadedError` (HTTP 429).
Loads are serialized (one lock); a resident adapter is found without waiting for a load.

**Revalidation.** Every request resolves its name again through the source (for checkpoints:
one database read), so a deleted, expired or re-saved checkpoint is never served from memory.
:meth:`AdapterRegistry.sweep` asks the source of every resident adapter whether it may still
be served and unloads those that may not; :meth:`acquire` runs it at most every
``recheck_seconds``, and a long-running server may also call it on a timer.

**Audit.** Every load, unload and refusal is recorded (:data:`tensafe.serving._audit.SERVING_EVENTS`)
in the owning tenant's chain before the request goes on; a failing audit log fails the request.
Records name the adapter and the reason, never a prompt or a completion.
"""

from __future__ import annotations

import asyncio
import contextlib
import hashlib
import logging
import time
from collections import OrderedDict
from collections.abc import Awaitable, Callable, Iterable, Sequence
from dataclasses import dataclass, field
from typing import Any, Literal, NoReturn, Protocol, runtime_checkable

import anyio.to_thread

from tensafe.serving._audit import SERVING_EVENTS, AuditAppender, serving_details
from tensafe.serving.engine import Engine, LoraAdapter
from tensafe.serving.errors import (
    AdapterRefusedError,
    AdapterUnavailableError,
    InvalidGenerationRequestError,
    ModelNotFoundError,
    ServingError,
    ServingOverloadedError,
)

__all__ = [
    "SERVING_EVENTS",
    "AdapterRef",
    "AdapterRegistry",
    "AdapterSource",
    "AuditAppender",
    "ModelEntry",
    "ResidentAdapter",
    "ServingCaller",
    "Target",
    "UnloadReason",
    "model_not_found",
]

_log = logging.getLogger("tensafe.serving")

#: Why an adapter left an engine (the ``reason`` of ``serving.adapter.unloaded``).
UnloadReason = Literal["lru", "invalid", "admin", "shutdown"]


@dataclass(frozen=True, kw_only=True)
class ServingCaller:
    """The authenticated caller of a request: the tenant and the audit ``actor`` string."""

    tenant: str
    actor: str


@dataclass(frozen=True, kw_only=True)
class AdapterRef:
    """An adapter a source resolved for a caller (no weights: :meth:`AdapterSource.fetch` reads them).

    Attributes:
        source: The source's :attr:`AdapterSource.name`.
        name: The model name clients use (``tinker://…/sampler_weights/…``, ``clinical@1.0.0``).
        tenant: The tenant who owns the adapter (its audit chain records the adapter's events).
        base_model: The base model's name (the engine that serves it).
        version: What identifies the content (artifact id, package header digest).
        locator: Source-private data for :meth:`AdapterSource.fetch` (never shown to clients).
    """

    source: str
    name: str
    tenant: str
    base_model: str
    version: str
    locator: str = ""

    @property
    def adapter_id(self) -> str:
        """The engine's id of this adapter: a digest of source, tenant, name and version."""
        digest = hashlib.sha256(
            "\0".join(
                ("tensafe/serving/adapter-id/v1", self.source, self.tenant, self.name, self.version)
            ).encode()
        ).hexdigest()
        return f"lora-{digest[:32]}"


@dataclass(frozen=True, kw_only=True)
class ModelEntry:
    """One model of ``GET /v1/models``: ``id`` is what clients send as ``model``."""

    id: str
    owned_by: str
    root: str
    created: int = 0


@runtime_checkable
class AdapterSource(Protocol):
    """Where adapters come from (see the module docstring). Every method may block."""

    @property
    def name(self) -> str:
        """A short name of the source (``checkpoint``, ``package``), part of the adapter id."""
        ...

    def resolve(self, caller: ServingCaller, model: str) -> AdapterRef | None:
        """The adapter ``model`` names for ``caller``.

        Returns:
            None when ``model`` is not a name of this source (the next source is asked).

        Raises:
            ModelNotFoundError: ``model`` is this source's kind of name but the caller may not
                use it (unknown, another tenant's, deleted, expired, revoked): one answer for all.
        """
        ...

    def fetch(self, ref: AdapterRef) -> LoraAdapter:
        """The decrypted adapter files, in memory (``adapter_id`` is :attr:`AdapterRef.adapter_id`).

        Raises:
            AdapterRefusedError: Verification, policy or decryption failed (the message says
                which, without secrets).
            ModelNotFoundError: The adapter is gone since :meth:`resolve`.
        """
        ...

    def check(self, ref: AdapterRef) -> None:
        """Return if ``ref`` may still be served; raise ``ModelNotFoundError`` or ``AdapterRefusedError``."""
        ...

    def list_models(self, caller: ServingCaller) -> Sequence[ModelEntry]:
        """The adapters ``caller`` may use, for ``GET /v1/models``."""
        ...


@dataclass(frozen=True, kw_only=True)
class Target:
    """Where one request runs: ``engine``, with ``adapter_id`` (None: the base model).

    ``model`` is the name the client sent (echoed in the answer); ``ref`` the adapter's
    :class:`AdapterRef` (None for a base model).
    """

    engine: Engine
    adapter_id: str | None
    model: str
    ref: AdapterRef | None = None


@dataclass(frozen=True, kw_only=True)
class ResidentAdapter:
    """A loaded adapter, as :meth:`AdapterRegistry.resident` reports it (no weights)."""

    adapter_id: str
    name: str
    tenant: str
    base_model: str
    source: str
    in_use: int


@dataclass
class _Slot:
    ref: AdapterRef
    engine: Engine
    users: int = 0
    loaded_at: float = field(default_factory=time.monotonic)


def model_not_found(model: str) -> ModelNotFoundError:
    """The one answer for a name the caller may not use (unknown, another tenant's, gone)."""
    return ModelNotFoundError(f"The model `{model[:200]}` does not exist or you do not have access to it.")


class AdapterRegistry:
    """Resolves request models to engine targets; keeps at most ``max_resident`` adapters loaded.

    Args:
        sources: Adapter sources, asked in order.
        engine_for: The started engine of a base model (may start it on first use).
        base_models: The base model names served (a ``model`` equal to one of them is the
            base model, with no adapter); a callable is asked on each use.
        max_resident: The most adapters loaded in all engines together (at least 1).
        audit: Where load, unload and refusal records go (fail closed).
        recheck_seconds: :meth:`acquire` runs :meth:`sweep` at most this often (0: every time).
        clock: Monotonic seconds (tests drive it).
    """

    def __init__(
        self,
        *,
        sources: Sequence[AdapterSource],
        engine_for: Callable[[str], Awaitable[Engine]],
        base_models: Iterable[str] | Callable[[], Iterable[str]],
        max_resident: int,
        audit: AuditAppender,
        recheck_seconds: float = 5.0,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        """Create an empty registry (nothing is loaded until a request needs it)."""
        if isinstance(max_resident, bool) or not isinstance(max_resident, int) or max_resident < 1:
            raise ValueError("max_resident must be a positive integer")
        if recheck_seconds < 0:
            raise ValueError("recheck_seconds must not be negative")
        self._sources = tuple(sources)
        names = [s.name for s in self._sources]
        if len(set(names)) != len(names):
            raise ValueError(f"adapter sources need distinct names, got {names}")
        self._engine_for = engine_for
        self._base_models = base_models if callable(base_models) else tuple(base_models)
        self.max_resident = max_resident
        self._audit = audit
        self._recheck_seconds = recheck_seconds
        self._clock = clock
        self._slots: OrderedDict[str, _Slot] = OrderedDict()
        self._lock = asyncio.Lock()
        self._last_sweep = clock()

    def __repr__(self) -> str:
        sources = [s.name for s in self._sources]
        return f"AdapterRegistry(sources={sources}, resident={len(self._slots)}/{self.max_resident})"

    # ------------------------------------------------------------------ queries

    def base_models(self) -> tuple[str, ...]:
        """The base model names served."""
        names = self._base_models() if callable(self._base_models) else self._base_models
        return tuple(names)

    def resident(self) -> list[ResidentAdapter]:
        """The loaded adapters, least recently used first."""
        return [
            ResidentAdapter(
                adapter_id=adapter_id,
                name=slot.ref.name,
                tenant=slot.ref.tenant,
                base_model=slot.ref.base_model,
                source=slot.ref.source,
                in_use=slot.users,
            )
            for adapter_id, slot in self._slots.items()
        ]

    async def list_models(self, caller: ServingCaller) -> list[ModelEntry]:
        """``GET /v1/models`` for ``caller``: the base models, then each source's adapters."""
        entries = [ModelEntry(id=name, owned_by="tensafe", root=name) for name in self.base_models()]
        for source in self._sources:
            entries.extend(await anyio.to_thread.run_sync(source.list_models, caller))
        return entries

    # ------------------------------------------------------------------ requests

    async def resolve(self, caller: ServingCaller, model: str) -> AdapterRef | None:
        """The adapter ``model`` names for ``caller`` (None: a base model); 404 otherwise (recorded)."""
        if model in self.base_models():
            return None
        for source in self._sources:
            try:
                ref = await anyio.to_thread.run_sync(source.resolve, caller, model)
            except ModelNotFoundError as exc:  # the one 404, or the owner's AdapterUnavailableError
                await self._refuse_not_found(caller, model, source.name, exc)
            if ref is not None:
                return ref
        raise model_not_found(model)

    async def acquire(self, caller: ServingCaller, model: str) -> Target:
        """The target of a request for ``model`` by ``caller``; pair with :meth:`release`.

        Raises:
            ModelNotFoundError: No base model or adapter of that name is visible to the caller.
            AdapterRefusedError: The adapter's source refused it (verification, decryption).
            ServingOverloadedError: Every adapter slot is in use by running requests.
            EngineUnavailableError: The base model's engine cannot start.
        """
        await self._maybe_sweep()
        ref = await self.resolve(caller, model)
        if ref is None:
            return Target(engine=await self._engine_for(model), adapter_id=None, model=model)
        slot = self._slots.get(ref.adapter_id)
        if slot is None:
            async with self._lock:
                slot = self._slots.get(ref.adapter_id)
                if slot is None:
                    slot = await self._load(caller, ref)
        slot.users += 1
        self._slots.move_to_end(ref.adapter_id)
        return Target(engine=slot.engine, adapter_id=ref.adapter_id, model=model, ref=ref)

    def release(self, target: Target) -> None:
        """End the use :meth:`acquire` started (the adapter may be unloaded once idle)."""
        if target.adapter_id is None:
            return
        slot = self._slots.get(target.adapter_id)
        if slot is not None and slot.users > 0:
            slot.users -= 1

    # ------------------------------------------------------------------ administration

    async def load(self, caller: ServingCaller, model: str) -> ResidentAdapter:
        """Make ``model`` resident now (an admin action; the same checks as a request)."""
        target = await self.acquire(caller, model)
        self.release(target)
        if target.adapter_id is None:
            raise InvalidGenerationRequestError(f"{model!r} is a base model, not an adapter", param="model")
        return next(r for r in self.resident() if r.adapter_id == target.adapter_id)

    async def unload(self, caller: ServingCaller, model: str) -> bool:
        """Unload the caller's adapter ``model`` if it is resident (an admin action).

        Returns:
            Whether it was resident. Requests still running with it finish or are aborted
            (as the engine's ``unload_adapter`` does).
        """
        ref = await self.resolve(caller, model)
        if ref is None:
            raise InvalidGenerationRequestError(f"{model!r} is a base model, not an adapter", param="model")
        async with self._lock:
            if ref.adapter_id not in self._slots:
                return False
            await self._unload(ref.adapter_id, reason="admin", actor=caller.actor)
        return True

    async def sweep(self) -> list[str]:
        """Unload every resident adapter its source no longer allows; return their names."""
        self._last_sweep = self._clock()
        gone: list[str] = []
        for adapter_id, slot in list(self._slots.items()):
            source = self._source(slot.ref.source)
            try:
                await anyio.to_thread.run_sync(source.check, slot.ref)
            except (ModelNotFoundError, AdapterRefusedError) as exc:
                async with self._lock:
                    if adapter_id in self._slots:
                        await self._unload(adapter_id, reason="invalid", why=_why(exc))
                        gone.append(slot.ref.name)
        return gone

    async def close(self) -> None:
        """Unload every adapter (recorded with reason ``shutdown``); engines are the caller's to close."""
        async with self._lock:
            for adapter_id in list(self._slots):
                try:
                    await self._unload(adapter_id, reason="shutdown")
                except Exception:  # the engine may be gone already; keep unloading the others
                    _log.warning("could not unload an adapter at shutdown", exc_info=True)
                    self._slots.pop(adapter_id, None)

    # ------------------------------------------------------------------ internals

    def _source(self, name: str) -> AdapterSource:
        return next(s for s in self._sources if s.name == name)

    async def _maybe_sweep(self) -> None:
        if self._slots and self._clock() - self._last_sweep >= self._recheck_seconds:
            await self.sweep()

    async def _load(self, caller: ServingCaller, ref: AdapterRef) -> _Slot:
        """Load ``ref`` (the lock is held): make room, fetch, load into the engine, record."""
        while len(self._slots) >= self.max_resident:
            idle = next((aid for aid, s in self._slots.items() if s.users == 0), None)
            if idle is None:
                await self._record_refusal(
                    caller, ref.name, reason="no_free_slot", source=ref.source, ref=ref
                )
                raise ServingOverloadedError(
                    f"all {self.max_resident} adapter slots are serving running requests; retry shortly"
                )
            await self._unload(idle, reason="lru")
        source = self._source(ref.source)
        try:
            adapter = await anyio.to_thread.run_sync(source.fetch, ref)
        except ModelNotFoundError as exc:
            await self._refuse_not_found(caller, ref.name, ref.source, exc)
        except AdapterRefusedError as exc:
            await self._record_refusal(
                caller, ref.name, reason="refused", source=ref.source, ref=ref, why=_why(exc)
            )
            raise
        engine = await self._engine_for(ref.base_model)
        loaded = LoraAdapter(adapter_id=ref.adapter_id, base_model_id=engine.model_id, files=adapter.files)
        del adapter
        try:
            await engine.load_adapter(loaded)
        except InvalidGenerationRequestError as exc:
            await self._record_refusal(
                caller, ref.name, reason="invalid_adapter", source=ref.source, ref=ref, why=_why(exc)
            )
            raise AdapterRefusedError(f"adapter {ref.name!r} cannot be served: {exc}") from None
        except BaseException:  # cancelled mid-load: never leave weights the registry does not track
            with contextlib.suppress(Exception):
                await engine.unload_adapter(ref.adapter_id)
            raise
        del loaded
        slot = _Slot(ref=ref, engine=engine)
        self._slots[ref.adapter_id] = slot
        try:
            await self._record(
                "serving.adapter.loaded",
                ref,
                actor=caller.actor,
                resident=len(self._slots),
                max_resident=self.max_resident,
            )
        except BaseException:
            self._slots.pop(ref.adapter_id, None)
            await engine.unload_adapter(ref.adapter_id)
            raise
        return slot

    async def _unload(
        self,
        adapter_id: str,
        *,
        reason: UnloadReason,
        actor: str = "service:tensafe.serving",
        why: str | None = None,
    ) -> None:
        """Unload ``adapter_id`` (the lock is held) and record it."""
        slot = self._slots.pop(adapter_id)
        await slot.engine.unload_adapter(adapter_id)
        extra: dict[str, Any] = {"reason": reason}
        if why is not None:
            extra["why"] = why
        await self._record("serving.adapter.unloaded", slot.ref, actor=actor, **extra)

    async def _record(self, event: str, ref: AdapterRef, *, actor: str, **fields: Any) -> None:
        details = serving_details(
            event,
            adapter_id=ref.adapter_id,
            base_model=ref.base_model,
            source=ref.source,
            version=ref.version,
            **fields,
        )
        await anyio.to_thread.run_sync(
            lambda: self._audit.append(
                tenant=ref.tenant, actor=actor, action=event, resource=_resource(ref.name), details=details
            )
        )

    async def _refuse_not_found(
        self, caller: ServingCaller, model: str, source: str, exc: ModelNotFoundError
    ) -> NoReturn:
        """Record and raise a 404: the one answer, or the owner's own ``AdapterUnavailableError`` as is."""
        if isinstance(exc, AdapterUnavailableError):
            await self._record_refusal(caller, model, reason="unavailable", source=source, why=_why(exc))
            raise exc
        await self._record_refusal(caller, model, reason="not_found", source=source)
        raise model_not_found(model) from None

    async def _record_refusal(
        self,
        caller: ServingCaller,
        model: str,
        *,
        reason: str,
        source: str,
        ref: AdapterRef | None = None,
        why: str | None = None,
    ) -> None:
        """A refusal goes to the chain of the caller (who asked), never of another tenant."""
        fields: dict[str, Any] = {"reason": reason, "source": source}
        if ref is not None and ref.tenant == caller.tenant:
            fields |= {"adapter_id": ref.adapter_id, "base_model": ref.base_model}
        if why is not None:
            fields["why"] = why
        details = serving_details("serving.adapter.refused", **fields)
        await anyio.to_thread.run_sync(
            lambda: self._audit.append(
                tenant=caller.tenant,
                actor=caller.actor,
                action="serving.adapter.refused",
                resource=_resource(model),
                details=details,
            )
        )


def _resource(name: str) -> str:
    """The audit ``resource`` of a model name: ``adapter/<name>``, control characters replaced, clipped."""
    clean = "".join("?" if ord(c) < 32 or 127 <= ord(c) < 160 else c for c in name)
    return "adapter/" + (clean if len(clean) <= 200 else clean[:197] + "...")


def _why(exc: ServingError) -> str:
    text = str(exc).strip().splitlines()
    first = text[0] if text else type(exc).__name__
    return first if len(first) <= 300 else first[:297] + "..."
