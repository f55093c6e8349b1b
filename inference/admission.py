"""Admission control: at most N upstream calls at once, a bounded FIFO queue, and 429 past it."""

from __future__ import annotations

from contextlib import asynccontextmanager
from time import perf_counter
from typing import AsyncIterator

from twisted.internet.defer import DeferredSemaphore

from .errors import Overloaded

RETRY_AFTER_SECS = 1


class Admission:
    """Lets ``limit`` requests reach the upstream at once (0: no limit) and queues up to ``max_queue`` more.

    A queued request whose client leaves is cancelled, which takes it out of the queue (DeferredSemaphore
    removes a cancelled waiter), so abandoned requests never hold a place.
    """

    def __init__(self, limit: int, max_queue: int) -> None:
        self._semaphore = DeferredSemaphore(limit) if limit else None
        self._max_queue = max_queue
        self._active = 0

    @property
    def queued(self) -> int:
        """Requests waiting for a slot."""
        return len(self._semaphore.waiting) if self._semaphore else 0

    @property
    def active(self) -> int:
        """Requests holding a slot (with no limit, every request between admission and its end)."""
        return self._active

    @asynccontextmanager
    async def slot(self) -> AsyncIterator[float]:
        """Hold one upstream slot for the ``async with`` block, or raise :class:`Overloaded`.

        The block gets the seconds the request waited in the queue.
        """
        semaphore = self._semaphore
        waited = 0.0
        if semaphore is not None:
            if semaphore.tokens == 0 and len(semaphore.waiting) >= self._max_queue:
                raise Overloaded(f"The gateway is at capacity ({semaphore.limit} requests running, "
                                 f"{len(semaphore.waiting)} waiting). Retry shortly.",
                                 headers={"Retry-After": str(RETRY_AFTER_SECS)})
            if semaphore.tokens == 0:
                queued_at = perf_counter()
                await semaphore.acquire()
                waited = perf_counter() - queued_at
            else:
                await semaphore.acquire()
        self._active += 1
        try:
            yield waited
        finally:
            self._active -= 1
            if semaphore is not None:
                semaphore.release()
