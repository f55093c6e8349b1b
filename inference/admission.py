"""Admission control: at most N upstream calls at once, a bounded fair queue, and 429 past it."""

from __future__ import annotations

from collections.abc import Callable
from time import perf_counter
from typing import Any

from twisted.internet.defer import Deferred

from .fairness import FairQueue, Shares, overloaded
from .tenants import ANONYMOUS, Caller


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
    """Lets ``limit`` requests reach the upstream at once (0: no limit) and queues up to ``max_queue`` more, handed
    the freed slots in the fair order of :class:`~inference.fairness.FairQueue` (priority class, then tenants'
    shares); ``sheddable`` calls are refused first when the queue passes ``shed_above``.

    A queued request that is cancelled (its client left, its deadline passed, the daemon is stopping) leaves
    the queue, so abandoned requests never hold a place.
    ``observe_wait`` gets every request's wait (0 when a slot was free), admitted or given up while queued.
    """

    def __init__(self, limit: int, max_queue: int,
                 observe_wait: Callable[[float], None] = lambda seconds: None, shares: Shares | None = None,
                 shed_above: int | None = None) -> None:
        self._limit = limit
        self._free = limit
        self._queue: FairQueue[Deferred[None]] = FairQueue(shares, shed_above)
        self._max_queue = max_queue
        self._observe_wait = observe_wait
        self._active = 0

    @property
    def queued(self) -> int:
        """Requests waiting for a slot."""
        return len(self._queue)

    @property
    def active(self) -> int:
        """Requests holding a slot (with no limit, every request between admission and its end)."""
        return self._active

    def try_acquire(self, caller: Caller = ANONYMOUS, cost: float = 1.0) -> Slot | None:
        """A slot at once when one is free, else None (then :meth:`acquire` queues or refuses)."""
        if self._limit:
            if self._free == 0:
                return None
            self._free -= 1
        return self._admitted(caller, cost, 0.0, False)

    async def acquire(self, caller: Caller = ANONYMOUS, cost: float = 1.0) -> Slot:
        """A slot, at once or after waiting in the queue; :class:`Overloaded` when the queue is full (or past
        ``shed_above`` for a sheddable call)."""
        slot = self.try_acquire(caller, cost)
        if slot is not None:
            return slot
        self._make_room(caller)
        queued_at = perf_counter()
        waiting: Deferred[None] = Deferred(self._give_up)
        self._queue.push(waiting, caller, cost)
        try:
            await waiting
        finally:
            waited = perf_counter() - queued_at
            self._observe_wait(waited)
        return self._admitted(caller, cost, waited, True, charged=True)

    def _give_up(self, waiting: Deferred[None]) -> None:
        self._queue.remove(waiting)

    def _make_room(self, caller: Caller) -> None:
        """Refuse ``caller``'s call, or a sheddable one in its place, when the queue has no room for it."""
        shed = self._queue.make_room(caller, self._max_queue, "a slot of the gateway", "inference.max_queue")
        if shed is not None:
            shed.errback(overloaded("The gateway's queue is full and gave this sheddable call's place to a more "
                                    "urgent one; retry shortly"))

    def _admitted(self, caller: Caller, cost: float, waited: float, queued: bool, charged: bool = False) -> Slot:
        if not queued:
            self._observe_wait(0.0)
        if not charged:  # (the queue charged a call it handed a slot)
            self._queue.shares.served(caller, cost)
        self._active += 1
        return Slot(self, waited, queued)

    def _release(self) -> None:
        self._active -= 1
        if not self._limit:
            return
        waiting = self._queue.pop()
        if waiting is not None:
            waiting.callback(None)  # the slot passes straight to the next caller in the fair order
        else:
            self._free += 1
