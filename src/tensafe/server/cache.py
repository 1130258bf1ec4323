"""The worker's bounded table of loaded sessions: LRU eviction under a global and a per-tenant cap.

A worker keeps the models it runs loaded between requests (a training run's base model,
LoRA adapter and AdamW moments; a sampling session's base model and adapter), because a
load costs seconds. Each costs a base model's worth of memory, so the table is bounded:
at most ``max_models`` entries in all and ``max_per_tenant`` entries of one tenant,
training and sampling sessions alike (``TS_SERVER_MAX_LOADED_MODELS``,
``TS_SERVER_MAX_LOADED_PER_TENANT``).

**Eviction.** Before a model is loaded, :meth:`LoadedModels.make_room` evicts until the
new entry fits (and :meth:`LoadedModels.put` enforces the caps again when it inserts):

1. while the loading tenant holds ``max_per_tenant`` entries, one of *its own* entries;
2. while the table holds ``max_models`` entries, one of anyone's.

The victim is the least recently used *idle* entry of that scope; a *busy* entry (a
training run with gradients accumulated since its last step: ``busy(value)``) goes only
when no idle one is left, the loading tenant's own busy entries before another tenant's.
So a tenant can never hold more than ``max_per_tenant`` entries, and the other tenants
always keep at least ``max_models - max_per_tenant`` of theirs. The entry being loaded is
never a victim. Evicted entries are returned to the caller, who closes them outside the
table's lock and drops the last reference (:class:`tensafe.server.ops.ComputeOps`; an
evicted training run is reloaded from its encrypted auto-checkpoint on its next request,
and gradients it lost are reported by that run's next ``optim_step``).

The table is safe to call from several threads, but it does not know which entries a
thread is still using: one table belongs to one worker thread (``create_app`` gives each
worker its own).
"""

from __future__ import annotations

import threading
from collections import OrderedDict
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from typing import Any, Literal

from tensafe.server.errors import ServerConfigurationError

__all__ = [
    "DEFAULT_MAX_LOADED_MODELS",
    "CacheStats",
    "Evicted",
    "Kind",
    "KindView",
    "LoadedModels",
    "LoadedSession",
    "check_caps",
    "default_per_tenant_cap",
]

#: Loaded models a worker keeps by default (``TS_SERVER_MAX_LOADED_MODELS``).
DEFAULT_MAX_LOADED_MODELS = 8

Kind = Literal["training", "sampling"]


def default_per_tenant_cap(max_models: int) -> int:
    """The per-tenant cap when none is configured: half of ``max_models``, at least 1."""
    return max(1, max_models // 2)


def check_caps(max_models: object, max_per_tenant: object) -> None:
    """Validate the two caps (``max_per_tenant`` may be None: the default).

    Raises:
        ServerConfigurationError: A cap is not a positive integer, or the per-tenant cap
            exceeds the global one.
    """
    for name, value in (
        ("TS_SERVER_MAX_LOADED_MODELS (max_loaded_models)", max_models),
        ("TS_SERVER_MAX_LOADED_PER_TENANT (max_loaded_per_tenant)", max_per_tenant),
    ):
        if value is None and name.startswith("TS_SERVER_MAX_LOADED_PER_TENANT"):
            continue
        if isinstance(value, bool) or not isinstance(value, int) or value < 1:
            raise ServerConfigurationError(
                f"{name} must be a positive integer (a number of loaded models); got {value!r}"
            )
    assert isinstance(max_models, int)
    if isinstance(max_per_tenant, int) and max_per_tenant > max_models:
        raise ServerConfigurationError(
            f"TS_SERVER_MAX_LOADED_PER_TENANT ({max_per_tenant}) cannot exceed "
            f"TS_SERVER_MAX_LOADED_MODELS ({max_models})"
        )


@dataclass(frozen=True)
class LoadedSession:
    """What is loaded (for introspection: ``ComputeOps.loaded_sessions``).

    Attributes:
        key: The training model id or sampling session id.
        tenant: The tenant that owns it.
        kind: ``training`` or ``sampling``.
        busy: A training run with gradients accumulated since its last step.
    """

    key: str
    tenant: str
    kind: Kind
    busy: bool


@dataclass(frozen=True)
class Evicted:
    """An entry removed from the table; the caller closes ``value``."""

    key: str
    tenant: str
    kind: Kind
    value: Any
    busy: bool


@dataclass(frozen=True)
class CacheStats:
    """Counters since the table was created."""

    loaded: int
    evictions: int
    busy_evictions: int


@dataclass
class _Slot:
    tenant: str
    kind: Kind
    value: Any


class LoadedModels:
    """LRU table of loaded sessions under a global and a per-tenant cap (see the module docstring)."""

    def __init__(
        self,
        *,
        max_models: int = DEFAULT_MAX_LOADED_MODELS,
        max_per_tenant: int | None = None,
        busy: Callable[[Any], bool] | None = None,
    ) -> None:
        """Create an empty table.

        Args:
            max_models: Most entries in all.
            max_per_tenant: Most entries of one tenant (default: :func:`default_per_tenant_cap`).
            busy: Whether an entry's value must be kept if possible (default: never).

        Raises:
            ServerConfigurationError: A cap is invalid (see :func:`check_caps`).
        """
        check_caps(max_models, max_per_tenant)
        self.max_models = max_models
        self.max_per_tenant = default_per_tenant_cap(max_models) if max_per_tenant is None else max_per_tenant
        self._busy = busy or (lambda _value: False)
        self._slots: OrderedDict[str, _Slot] = OrderedDict()  # least recently used first
        self._lock = threading.RLock()
        self._evictions = 0
        self._busy_evictions = 0

    def __repr__(self) -> str:
        return f"LoadedModels({len(self._slots)}/{self.max_models}, per tenant {self.max_per_tenant})"

    def __len__(self) -> int:
        return len(self._slots)

    # ------------------------------------------------------------------ access

    def get(self, key: str, *, kind: Kind) -> Any | None:
        """The value of ``key`` (None if not loaded as ``kind``); marks it most recently used."""
        with self._lock:
            slot = self._slots.get(key)
            if slot is None or slot.kind != kind:
                return None
            self._slots.move_to_end(key)
            return slot.value

    def pop(self, key: str, *, kind: Kind, tenant: str | None = None) -> Any | None:
        """Remove ``key`` and return its value; the caller closes it.

        None (and nothing removed) if ``key`` is not loaded as ``kind``, or, when ``tenant``
        is given, is loaded for another tenant.
        """
        with self._lock:
            slot = self._slots.get(key)
            if slot is None or slot.kind != kind or (tenant is not None and slot.tenant != tenant):
                return None
            del self._slots[key]
            return slot.value

    def keys(self, kind: Kind | None = None) -> list[str]:
        """The loaded keys (of ``kind``), least recently used first."""
        with self._lock:
            return [k for k, s in self._slots.items() if kind is None or s.kind == kind]

    def entries(self) -> list[LoadedSession]:
        """What is loaded, least recently used first."""
        with self._lock:
            return [
                LoadedSession(key=k, tenant=s.tenant, kind=s.kind, busy=bool(self._busy(s.value)))
                for k, s in self._slots.items()
            ]

    def view(self, kind: Kind) -> KindView:
        """A mapping-like view of the entries of ``kind`` (lookups mark entries used)."""
        return KindView(self, kind)

    def stats(self) -> CacheStats:
        """Counters: entries loaded now, evictions so far, of which busy ones."""
        with self._lock:
            return CacheStats(
                loaded=len(self._slots), evictions=self._evictions, busy_evictions=self._busy_evictions
            )

    # ------------------------------------------------------------------ loading and eviction

    def make_room(self, *, tenant: str, key: str) -> list[Evicted]:
        """Evict what must go so that loading ``key`` for ``tenant`` stays within the caps."""
        with self._lock:
            return self._make_room(tenant, key)

    def put(self, key: str, value: Any, *, tenant: str, kind: Kind) -> list[Evicted]:
        """Insert (or replace) ``key`` as the most recently used entry, evicting others as needed.

        Returns:
            The evicted entries, and the replaced value of ``key`` if it was another object.
        """
        with self._lock:
            removed = self._make_room(tenant, key)
            old = self._slots.pop(key, None)
            if old is not None and old.value is not value:
                removed.append(Evicted(key, old.tenant, old.kind, old.value, bool(self._busy(old.value))))
            self._slots[key] = _Slot(tenant=tenant, kind=kind, value=value)
            return removed

    def pop_tenant(self, tenant: str) -> list[Evicted]:
        """Remove every entry of ``tenant`` (a deleted or shredded tenant); the caller closes them."""
        with self._lock:
            gone = [k for k, s in self._slots.items() if s.tenant == tenant]
            out = []
            for k in gone:
                slot = self._slots.pop(k)
                out.append(Evicted(k, slot.tenant, slot.kind, slot.value, bool(self._busy(slot.value))))
            return out

    def _make_room(self, tenant: str, key: str) -> list[Evicted]:
        evicted: list[Evicted] = []
        while self._count(tenant, key) >= self.max_per_tenant:
            evicted.append(self._evict(tenant, key, own_only=True))
        while len(self._slots) - (key in self._slots) >= self.max_models:
            evicted.append(self._evict(tenant, key, own_only=False))
        return evicted

    def _count(self, tenant: str, key: str) -> int:
        return sum(1 for k, s in self._slots.items() if s.tenant == tenant and k != key)

    def _evict(self, tenant: str, key: str, *, own_only: bool) -> Evicted:
        """Remove the victim of one eviction step (there always is one: the loops above count it)."""
        candidates = [
            (k, s) for k, s in self._slots.items() if k != key and (not own_only or s.tenant == tenant)
        ]
        flagged = [(k, s, bool(self._busy(s.value))) for k, s in candidates]
        order: Iterator[tuple[str, _Slot, bool]] = iter(
            [c for c in flagged if not c[2]]  # idle, least recently used first
            + [c for c in flagged if c[2] and c[1].tenant == tenant]  # then the tenant's own busy ones
            + [c for c in flagged if c[2] and c[1].tenant != tenant]
        )
        victim, slot, busy = next(order)
        del self._slots[victim]
        self._evictions += 1
        self._busy_evictions += busy
        return Evicted(victim, slot.tenant, slot.kind, slot.value, busy)


class KindView:
    """The entries of one kind: ``get`` (marks used), ``pop``, ``in``, ``len`` and iteration.

    Entries are added only through :meth:`LoadedModels.put`, which needs the tenant.
    """

    def __init__(self, table: LoadedModels, kind: Kind) -> None:
        """View ``table``'s entries of ``kind``."""
        self._table = table
        self._kind: Kind = kind

    def __repr__(self) -> str:
        return f"KindView({self._kind}, {len(self)} loaded)"

    def get(self, key: str) -> Any | None:
        """The value of ``key`` or None; marks it most recently used."""
        return self._table.get(key, kind=self._kind)

    def pop(self, key: str, default: Any = None) -> Any:
        """Remove ``key`` and return its value (``default`` if absent); the caller closes it."""
        value = self._table.pop(key, kind=self._kind)
        return default if value is None else value

    def __contains__(self, key: object) -> bool:
        return isinstance(key, str) and key in self._table.keys(self._kind)

    def __iter__(self) -> Iterator[str]:
        return iter(self._table.keys(self._kind))

    def __len__(self) -> int:
        return len(self._table.keys(self._kind))
