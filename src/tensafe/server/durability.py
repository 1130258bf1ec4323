"""The worker's background committer: durable writes overlapped with the next request.

A request that changes a training run's state (``optim_step``, ``train_step``,
``register_dataset``, ``create_model``, ``load_weights``) produces an auto-checkpoint that
must be durable before the request is reported done (:mod:`tensafe.server.ops`,
*Durability*). The session's state is serialized in the worker (a consistent snapshot of
the step); encrypting, writing and fsyncing it, then committing the future's completion
with its audit record, is the job of one :class:`OrderedCommitter` per worker, so that the
worker can already execute the model's next queued ``forward_backward``.

Ordering is the committer's whole contract:

* tasks run one at a time, in submission order (one thread, one FIFO queue), so the
  completions of a model's requests are committed, and their futures signalled, in the
  order the worker executed them: a later request never completes before an earlier
  step's state is durable;
* the worker asks :meth:`OrderedCommitter.pending` before it executes a request; only a
  request that reads nothing a pending commit changes (``forward``/``forward_backward``,
  while every pending task of the model is a state write) may run before the model's queue
  is drained (:meth:`OrderedCommitter.wait`);
* a model whose pending commit failed is *poisoned*: the worker fails the requests queued
  behind it (they ran on a state that never became durable) and drains before it executes
  anything else of that model.

Crash safety is unchanged: until its task commits, a future stays ``running`` in the
database with its previous state referenced, so a worker that dies with tasks in its
queue leaves exactly what a worker dying inside the request would (recovery in
:mod:`tensafe.server.jobs`).
"""

from __future__ import annotations

import collections
import logging
import threading
from collections.abc import Callable
from dataclasses import dataclass

__all__ = ["OrderedCommitter"]

_log = logging.getLogger("tensafe.server.durability")


@dataclass(frozen=True)
class _Task:
    key: str | None
    run: Callable[[], None]
    state_write: bool


class OrderedCommitter:
    """One background thread running submitted tasks strictly in submission order.

    Tasks handle their own failures (they fail their future); an exception that escapes a
    task is logged and poisons its key (see the module docstring).
    """

    def __init__(self, name: str) -> None:
        """Create an idle committer; its thread starts with the first task."""
        self._name = name
        self._cond = threading.Condition()
        self._queue: collections.deque[_Task] = collections.deque()
        self._pending: collections.Counter[str | None] = collections.Counter()
        self._writes: collections.Counter[str | None] = collections.Counter()
        self._poisoned: set[str | None] = set()
        self._thread: threading.Thread | None = None
        self._closed = False

    def __repr__(self) -> str:
        return f"OrderedCommitter({self._name!r}, pending={sum(self._pending.values())})"

    def submit(self, key: str | None, task: Callable[[], None], *, state_write: bool) -> None:
        """Queue ``task`` (for model ``key``) after every task submitted before it.

        ``state_write``: the task commits a state change whose write the model's next
        ``forward``/``forward_backward`` may overlap (see :meth:`overlappable`).
        """
        with self._cond:
            if self._closed:
                raise RuntimeError("the worker's committer is stopped")
            self._queue.append(_Task(key, task, state_write))
            self._pending[key] += 1
            if state_write:
                self._writes[key] += 1
            if self._thread is None:
                self._thread = threading.Thread(target=self._loop, name=self._name, daemon=True)
                self._thread.start()
            self._cond.notify_all()

    def pending(self, key: str | None = None) -> int:
        """How many tasks of ``key`` (None: of every key) are queued or running."""
        with self._cond:
            return sum(self._pending.values()) if key is None else self._pending[key]

    def overlappable(self, key: str | None) -> bool:
        """Whether every pending task of ``key`` is a state write (and none has failed)."""
        with self._cond:
            return key not in self._poisoned and self._pending[key] == self._writes[key]

    def poison(self, key: str | None) -> None:
        """Mark ``key``: a commit failed, so the requests queued behind it must fail too."""
        with self._cond:
            self._poisoned.add(key)

    def poisoned(self, key: str | None) -> bool:
        """Whether a commit of ``key`` failed since the worker last drained it."""
        with self._cond:
            return key in self._poisoned

    def wait(self, key: str | None = None) -> None:
        """Block until no task of ``key`` (None: no task at all) is pending; clear its poison."""
        with self._cond:
            while (self._pending[key] if key is not None else sum(self._pending.values())) > 0:
                if self._thread is None or not self._thread.is_alive():
                    raise RuntimeError("the worker's committer stopped with tasks pending")
                self._cond.wait(0.5)
            if key is None:
                self._poisoned.clear()
            else:
                self._poisoned.discard(key)

    def close(self, timeout: float = 30.0) -> None:
        """Run the queued tasks, then stop the thread (later submissions are refused)."""
        with self._cond:
            self._closed = True
            self._cond.notify_all()
            thread = self._thread
        if thread is not None:
            thread.join(timeout)
            if thread.is_alive():
                return
        with self._cond:  # stopped and empty: a restarted worker may submit again
            self._thread, self._closed = None, False

    def _loop(self) -> None:
        while True:
            with self._cond:
                while not self._queue and not self._closed:
                    self._cond.wait()
                if not self._queue:
                    return
                task = self._queue[0]
            try:
                task.run()
            except Exception:
                _log.exception("%s: a background commit failed", self._name)
                self.poison(task.key)
            finally:
                with self._cond:
                    self._queue.popleft()
                    self._pending[task.key] -= 1
                    if task.state_write:
                        self._writes[task.key] -= 1
                    self._cond.notify_all()
                # Drop the finished task now: it holds the result, which may reference a
                # session that must be freed once evicted (not when the next task comes).
                del task
