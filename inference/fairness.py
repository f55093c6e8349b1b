"""The order in which waiting calls get a freed slot: priority class first, then fair shares across tenants.

Within a class each tenant has a virtual time: the tokens its calls used, divided by its weight (start-time fair
queuing). A freed slot goes to the waiting tenant whose virtual time is lowest, and to that tenant's
longest-waiting call; so a tenant with 600 calls queued gets no more slots than one with a single call, and a
tenant that was idle comes back at the pace of the calls being served (its virtual time is raised to the last
served call's), not with credit saved while away. Calls are charged their prompt's estimate when they take a slot
and their output when they end; the gateway's queues share one :class:`Shares`, as the tenants share the fleet.

When more than ``shed_above`` calls wait, a ``sheddable`` call is refused rather than queued, and a full queue
makes room for a more urgent call by refusing the ``sheddable`` call that came last.

Pure policy: no reactor, no I/O; :mod:`inference.admission` and the fleet hold the waiting Deferreds.
"""

from __future__ import annotations

from collections import deque
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from itertools import count
from typing import Generic, TypeVar

from .errors import Overloaded
from .tenants import PRIORITIES, Caller

T = TypeVar("T")

SHEDDABLE = PRIORITIES.index("sheddable")
RETRY_AFTER_SECS = 1  # what a call refused for want of room in a queue is told to wait


def overloaded(message: str) -> Overloaded:
    """The 429 of a queue with no room (or a sheddable call's place given away)."""
    return Overloaded(message, headers={"Retry-After": str(RETRY_AFTER_SECS)})


@dataclass(slots=True)
class _Waiting(Generic[T]):
    item: T
    caller: Caller
    cost: float  # its prompt's tokens, estimated: charged when it takes a slot
    arrived: int  # the order it came in (ties between tenants go to the longest waiting)


class Shares:
    """Each tenant's virtual time: the tokens its calls used over its weight, and the pace of the calls served."""

    def __init__(self) -> None:
        self._virtual: dict[str, float] = {}  # tenant -> tokens used / weight (tenants are few: the configured)
        self._pace = 0.0  # the virtual time of the call served last

    def of(self, name: str) -> float:
        return self._virtual.get(name, 0.0)

    def returns(self, name: str) -> None:
        """``name`` has calls waiting again: it goes on at the pace of those served, with no credit saved."""
        self._virtual[name] = max(self._virtual.get(name, 0.0), self._pace)

    def served(self, caller: Caller, tokens: float) -> None:
        """A call of ``caller`` takes a slot having an estimated ``tokens`` of prompt."""
        self._pace = max(self._pace, self.of(caller.tenant.name))
        self.used(caller, tokens)

    def used(self, caller: Caller, tokens: float) -> None:
        """``caller``'s calls used ``tokens`` more (a call's output, when it ends)."""
        name = caller.tenant.name
        self._virtual[name] = self.of(name) + max(tokens, 1.0) / caller.tenant.weight


class FairQueue(Generic[T]):
    """Waiting items, each for a caller, handed out by :meth:`pop` in the fair order described above."""

    def __init__(self, shares: Shares | None = None, shed_above: int | None = None) -> None:
        self.shares = shares if shares is not None else Shares()
        self.shed_above = shed_above
        self._classes: list[dict[str, deque[_Waiting[T]]]] = [{} for _ in PRIORITIES]  # rank -> tenant -> FIFO
        self._arrivals = count()
        self._size = 0

    def __len__(self) -> int:
        return self._size

    def __iter__(self) -> Iterator[T]:
        for tenants in self._classes:
            for waiting in tenants.values():
                yield from (w.item for w in waiting)

    def refuses(self, caller: Caller) -> bool:
        """Whether a call of ``caller`` is to be shed rather than queued (the queue is past ``shed_above``)."""
        return (self.shed_above is not None and caller.tenant.rank == SHEDDABLE and self._size >= self.shed_above)

    def push(self, item: T, caller: Caller, cost: float = 1.0) -> None:
        name = caller.tenant.name
        tenants = self._classes[caller.tenant.rank]
        if name not in tenants:
            self.shares.returns(name)
            tenants[name] = deque()
        tenants[name].append(_Waiting(item, caller, cost, next(self._arrivals)))
        self._size += 1

    def pop(self, eligible: Callable[[T], bool] = lambda item: True) -> T | None:
        """The next item a freed slot goes to among those ``eligible`` (a fleet host serves some models only)."""
        for tenants in self._classes:
            best: tuple[float, int, str, _Waiting[T]] | None = None
            for name, waiting in tenants.items():
                first = next((w for w in waiting if eligible(w.item)), None)
                if first is not None:
                    rank = (self.shares.of(name), first.arrived, name, first)
                    if best is None or rank[:2] < best[:2]:
                        best = rank
            if best is not None:
                chosen = best[3]
                self._take(tenants, chosen)
                self.shares.served(chosen.caller, chosen.cost)
                return chosen.item
        return None

    def remove(self, item: T) -> bool:
        """Take ``item`` out (its call gave up); False when it is not waiting."""
        for tenants in self._classes:
            for waiting in tenants.values():
                for entry in waiting:
                    if entry.item is item:
                        self._take(tenants, entry)
                        return True
        return False

    def make_room(self, caller: Caller, bound: int, waiting_for: str, setting: str) -> T | None:
        """Room for ``caller``'s call in this queue of at most ``bound``: :class:`Overloaded` when the call is to be
        shed or the queue is full with no sheddable call to give up its place; else the sheddable call that gave
        it up, taken out (the caller refuses it with :func:`overloaded`), or None. ``waiting_for`` and ``setting``
        name the queue in the 429s."""
        if self.refuses(caller):
            raise overloaded(f"{self._size} calls wait for {waiting_for}, more than inference.shed_above "
                             f"({self.shed_above}): sheddable calls are refused; retry shortly")
        if self._size < bound:
            return None
        shed = self.shed(caller)
        if shed is None:
            raise overloaded(f"{self._size} calls already wait for {waiting_for} ({setting}); retry shortly")
        return shed

    def shed(self, for_caller: Caller) -> T | None:
        """Make room for ``for_caller``'s call in a full queue: the sheddable call that came last, taken out (to be
        refused), when ``for_caller`` is more urgent; None when there is none to take."""
        if for_caller.tenant.rank >= SHEDDABLE:
            return None
        last = max((w[-1] for w in self._classes[SHEDDABLE].values()), key=lambda w: w.arrived, default=None)
        if last is None:
            return None
        self._take(self._classes[SHEDDABLE], last)
        return last.item

    def clear(self) -> list[T]:
        """Every waiting item, taken out (a host left the fleet: they all look again)."""
        items = list(self)
        for tenants in self._classes:
            tenants.clear()
        self._size = 0
        return items

    def _take(self, tenants: dict[str, deque[_Waiting[T]]], entry: _Waiting[T]) -> None:
        name = entry.caller.tenant.name
        waiting = tenants[name]
        waiting.remove(entry)
        if not waiting:
            del tenants[name]
        self._size -= 1
