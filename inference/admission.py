"""Admission control: at most N upstream calls at once, a bounded FIFO queue, and 429 past it."""

from __future__ import annotations

from collections.abc import Callable
from time import perf_counter
from typing import Any

from twisted.internet.defer import DeferredSemaphore

from .errors import Overloaded

RETRY_AFTER_SECS = 1


class Slot:
    """The right to call the upstream, held for a ``with`` block; ``waited`` is the seconds spent queued."""

    def __init__(self, admission: Admission, waited: float, queued: bool) -> None:
        self.waited = waited
        self.queued = queued  # whether it had to wait in the queue at all
        self._admission: Admission | None = admission

    def __enter__(self) -> Slot:
        return self

    def __exit__(self, *exc_info: Any) -> None:
        self.release()

    def release(self) -> None:
        if self._admission is not None:
            self._admission._release()
            self._admission = None


class Admission:
    """Lets ``limit`` requests reach the upstream at once (0: no limit) and queues up to ``max_queue`` more.

    A queued request that is cancelled (its client left, its deadline passed, the daemon is stopping) leaves
    the queue: DeferredSemaphore removes a cancelled waiter, so abandoned requests never hold a place.
    ``observe_wait`` gets every request's wait (0 when a slot was free), admitted or given up while queued.
    """

    def __init__(self, limit: int, max_queue: int,
                 observe_wait: Callable[[float], None] = lambda seconds: None) -> None:
        self._semaphore = DeferredSemaphore(limit) if limit else None
        self._max_queue = max_queue
        self._observe_wait = observe_wait
        self._active = 0

    @property
    def queued(self) -> int:
        """Requests waiting for a slot."""
        return len(self._semaphore.waiting) if self._semaphore else 0

    @property
    def active(self) -> int:
        """Requests holding a slot (with no limit, every request between admission and its end)."""
        return self._active

    def try_acquire(self) -> Slot | None:
        """A slot at once when one is free, else None (then :meth:`acquire` queues or refuses)."""
        semaphore = self._semaphore
        if semaphore is not None:
            if semaphore.tokens == 0:
                return None
            semaphore.acquire()  # a token is free: it is taken now, and the Deferred has already fired
        self._observe_wait(0.0)
        self._active += 1
        return Slot(self, 0.0, False)

    async def acquire(self) -> Slot:
        """A slot, at once or after waiting in the queue; :class:`Overloaded` when the queue is full."""
        semaphore = self._semaphore
        waited, queued = 0.0, False
        if semaphore is not None:
            if semaphore.tokens == 0:
                if len(semaphore.waiting) >= self._max_queue:
                    raise Overloaded(f"The gateway is at capacity ({semaphore.limit} requests running, "
                                     f"{len(semaphore.waiting)} waiting). Retry shortly.",
                                     headers={"Retry-After": str(RETRY_AFTER_SECS)})
                queued, queued_at = True, perf_counter()
                try:
                    await semaphore.acquire()
                finally:
                    waited = perf_counter() - queued_at
                    self._observe_wait(waited)
            else:
                await semaphore.acquire()
        if not queued:
            self._observe_wait(0.0)
        self._active += 1
        return Slot(self, waited, queued)

    def _release(self) -> None:
        self._active -= 1
        if self._semaphore is not None:
            self._semaphore.release()
