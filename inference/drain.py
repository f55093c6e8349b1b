"""Graceful shutdown: the chat requests in flight, so a stopping daemon can let them finish, or end them cleanly.

Each chat request is a :class:`Job` from arrival to answer. ``drain`` waits for the jobs to end; when the
grace period is over it interrupts the rest: a stream gets an SSE error event and ``[DONE]`` between two
events (never in the middle of one), a request still waiting for the upstream or for a slot gets a 503.
"""

from __future__ import annotations

from collections.abc import Callable, Coroutine, Iterator
from contextlib import contextmanager
from typing import Any, TypeVar

from twisted.internet.defer import CancelledError, Deferred
from twisted.internet.interfaces import IDelayedCall, IReactorTime

from .errors import GatewayError, RequestTimeout, ShuttingDown

T = TypeVar("T")

INTERRUPT_GRACE_SECS = 5.0
"""How long interrupted jobs get to write their last bytes before the daemon stops anyway."""


class Job:
    """One request that a shutdown, or its own deadline, may have to interrupt."""

    def __init__(self) -> None:
        self._interrupted: GatewayError | None = None
        self._pending: Deferred[Any] | None = None
        self._on_interrupt: Callable[[GatewayError], None] | None = None
        self._deadline: IDelayedCall | None = None

    def clear_deadline(self) -> None:
        """The answer has started (a stream): from here on, the stream's own silence timeout applies."""
        if self._deadline is not None:
            if self._deadline.active():
                self._deadline.cancel()
            self._deadline = None

    async def run(self, work: Coroutine[Any, Any, T]) -> T:
        """Await ``work``; if the job is interrupted meanwhile, ``work`` is cancelled and the reason raised."""
        if self._interrupted is not None:
            work.close()
            raise self._interrupted
        self._pending = Deferred.fromCoroutine(work)
        try:
            result: T = await self._pending
            return result
        except CancelledError:
            if self._interrupted is not None:
                raise self._interrupted from None
            raise  # the client left
        finally:
            self._pending = None

    def on_interrupt(self, callback: Callable[[GatewayError], None]) -> None:
        """What interrupting means once the job has moved past ``run`` (a stream being relayed)."""
        self._on_interrupt = callback

    def interrupt(self, error: GatewayError) -> None:
        if self._interrupted is not None:
            return
        self._interrupted = error
        if self._pending is not None:
            self._pending.cancel()
        elif self._on_interrupt is not None:
            self._on_interrupt(error)


class InFlight:
    """The jobs running now, and the drain that waits for them."""

    def __init__(self, clock: IReactorTime) -> None:
        self._clock = clock
        self._jobs: set[Job] = set()
        self._idle: list[Deferred[None]] = []
        self.draining = False

    def __len__(self) -> int:
        return len(self._jobs)

    @contextmanager
    def track(self, deadline: float = 0) -> Iterator[Job]:
        """Hold a job for the ``with`` block; refuses new work once draining has begun.

        After ``deadline`` seconds (0: none) the job is interrupted with a 504 :class:`RequestTimeout`, wherever
        it is: resolving the model, queued for a slot, or waiting for the upstream.
        """
        if self.draining:
            raise ShuttingDown("The gateway is shutting down; retry on another instance or in a moment.",
                               headers={"Connection": "close", "Retry-After": "1"})
        job = Job()
        if deadline:
            error = RequestTimeout(f"No answer within {deadline:g}s (server.request_timeout_secs)")
            job._deadline = self._clock.callLater(deadline, job.interrupt, error)
        self._jobs.add(job)
        try:
            yield job
        finally:
            job.clear_deadline()
            self._jobs.discard(job)
            if not self._jobs:
                idle, self._idle = self._idle, []
                for d in idle:
                    d.callback(None)

    def idle(self) -> Deferred[None]:
        """Fires when no job is running (cancelling it stops the wait)."""
        d: Deferred[None] = Deferred(lambda d: self._idle.remove(d))
        if self._jobs:
            self._idle.append(d)
        else:
            d.callback(None)
        return d

    async def drain(self, grace: float, on_overdue: Callable[[int], None] = lambda count: None) -> int:
        """Refuse new work, wait up to ``grace`` seconds for the running jobs, then interrupt the rest.

        Returns how many jobs had to be interrupted.
        """
        self.draining = True
        if not self._jobs:
            return 0
        if await self._idle_within(grace):
            return 0
        overdue = list(self._jobs)
        on_overdue(len(overdue))
        error = ShuttingDown(f"The gateway is shutting down; the request was still running after {grace:g}s "
                             "(server.shutdown_timeout_secs).")
        for job in overdue:
            job.interrupt(error)
        await self._idle_within(INTERRUPT_GRACE_SECS)  # interrupted jobs end at once; never wait forever
        return len(overdue)

    async def _idle_within(self, seconds: float) -> bool:
        idle = self.idle()
        timer = self._clock.callLater(seconds, idle.cancel)
        try:
            await idle
            return True
        except CancelledError:
            return False
        finally:
            if timer.active():
                timer.cancel()
