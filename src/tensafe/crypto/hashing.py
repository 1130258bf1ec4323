"""SHA-256 computed on a worker thread, so hashing overlaps I/O and encryption.

``hashlib`` releases the GIL while it hashes a buffer larger than 2 KiB, so a digest
updated on a second thread runs in parallel with the caller's reading, encrypting and
writing. SHA-256 (about 1.7 GB/s per core with the SHA extensions) is several times
slower than AES-256-GCM, so on a machine with a spare core the hash disappears from the
critical path of an encrypt-and-hash pipeline. The digest itself is exactly
``hashlib.sha256`` over the concatenation of the updates, in order.

Buffer contract: the worker reads the caller's buffer after :meth:`ThreadedSha256.update`
returns. Immutable ``bytes`` are always safe. A mutable buffer (``bytearray``,
``memoryview``) must not be modified until the update is known to be complete: after
:meth:`ThreadedSha256.update` returns, at most ``max_in_flight`` updates are still
pending, and after :meth:`ThreadedSha256.wait` returns, none is. A ring of
``max_in_flight + 1`` reused buffers is therefore safe, as is calling ``wait()`` before
refilling a buffer.

Example:
    >>> with ThreadedSha256() as digest:
    ...     digest.update(b"abc")
    ...     digest.hexdigest()[:16]
    'ba7816bf8f01cfea'
"""

from __future__ import annotations

import hashlib
from collections import deque
from concurrent.futures import Future, ThreadPoolExecutor
from types import TracebackType
from typing import Final, Self

from tensafe.crypto.errors import CryptoUsageError

__all__ = ["INLINE_THRESHOLD", "ThreadedSha256"]

#: Updates smaller than this (with nothing pending) are hashed on the calling thread:
#: handing them to the worker costs more than hashing them.
INLINE_THRESHOLD: Final = 64 * 1024


class ThreadedSha256:
    """A SHA-256 digest whose updates run, in order, on one private worker thread.

    The worker thread is started on the first large update and stopped by
    :meth:`digest`, :meth:`hexdigest` or :meth:`close` (the class is a context manager
    that closes). Memory is bounded: an update blocks while more than ``max_in_flight``
    earlier updates are still being hashed, and the hasher never copies the data.
    """

    __slots__ = ("_closed", "_digest", "_final", "_max", "_pending", "_pool")

    def __init__(self, *, max_in_flight: int = 2) -> None:
        """Create an empty digest.

        Args:
            max_in_flight: How many updates may still be pending when :meth:`update`
                returns (at least 1). See the module docstring for what this means for
                reused buffers.

        Raises:
            CryptoUsageError: ``max_in_flight`` is not a positive integer.
        """
        if type(max_in_flight) is not int or max_in_flight < 1:
            raise CryptoUsageError("max_in_flight must be a positive integer")
        self._digest = hashlib.sha256()
        self._max = max_in_flight
        self._pending: deque[Future[None]] = deque()
        self._pool: ThreadPoolExecutor | None = None
        self._final: bytes | None = None
        self._closed = False

    def __repr__(self) -> str:
        state = "closed" if self._closed else f"pending={len(self._pending)}"
        return f"ThreadedSha256({state})"

    def __enter__(self) -> Self:
        return self

    def __exit__(
        self, exc_type: type[BaseException] | None, exc: BaseException | None, tb: TracebackType | None
    ) -> None:
        self.close()

    @property
    def max_in_flight(self) -> int:
        """How many updates may be pending when :meth:`update` returns."""
        return self._max

    def update(self, data: bytes | bytearray | memoryview) -> None:
        """Queue ``data`` to be hashed after every earlier update.

        Args:
            data: A bytes-like object; see the module docstring for mutable buffers.

        Raises:
            CryptoUsageError: The hasher is finished or closed.
        """
        if self._closed:
            raise CryptoUsageError("update() on a finished or closed ThreadedSha256")
        view = memoryview(data)
        if view.nbytes < INLINE_THRESHOLD and not self._pending:
            self._digest.update(view)
            return
        if self._pool is None:
            self._pool = ThreadPoolExecutor(max_workers=1, thread_name_prefix="tensafe-sha256")
        # One worker thread, so the updates run in submission order.
        self._pending.append(self._pool.submit(self._digest.update, view))
        while len(self._pending) > self._max:
            self._pending.popleft().result()

    def wait(self) -> None:
        """Block until every queued update has been hashed (buffers may then be reused)."""
        while self._pending:
            self._pending.popleft().result()

    def digest(self) -> bytes:
        """Wait for every update and return the 32-byte digest; the hasher is then finished.

        Calling it again returns the same digest; :meth:`update` afterwards raises.
        """
        if self._final is None:
            if self._closed:
                raise CryptoUsageError("digest() on a ThreadedSha256 closed before it finished")
            self.wait()
            self._final = self._digest.digest()
            self.close()
        return self._final

    def hexdigest(self) -> str:
        """Like :meth:`digest`, as lowercase hexadecimal."""
        return self.digest().hex()

    def close(self) -> None:
        """Wait for pending updates and stop the worker thread; safe to call more than once."""
        if self._closed:
            return
        self._closed = True
        try:
            self.wait()
        finally:
            if self._pool is not None:
                self._pool.shutdown(wait=True)
                self._pool = None
