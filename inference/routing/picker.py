"""Picking the host for a call: filter, then score, then pick, each step a small policy of its own.

1. Filter: hosts that are routed to (serving, by their health) and serve the model; of those, the ones with a
   free slot (none: the call waits).
2. Loaded first: hosts with the model in memory over hosts that would load it first (seconds to minutes).
3. Load bound: hosts no more than ``load_bound`` requests busier than the least busy one.
4. Prefix affinity: the host that holds the conversation's prefix; a conversation the gateway does not know goes
   to the first host in its rendezvous ranking that has an unfilled cache slot, else to the first in the ranking.
5. Least outstanding requests when there is no conversation (ties at random).

The ranking that comes out also orders failover: the chosen host, then the others in the order they scored.
"""

from __future__ import annotations

import random
from collections.abc import Sequence
from dataclasses import dataclass, field

from .memory import PrefixMemory
from .rendezvous import rank


@dataclass
class HostView:
    """What routing knows of one host now."""

    name: str
    max_concurrent: int
    weight: float = 1.0
    outstanding: int = 0  # calls in flight there
    routed: bool = True  # its health (routing/health.py) is serving: not down, ejected or being checked
    on_trial: bool = False  # back from an ejection and not yet proven: one call at a time

    @property
    def slots(self) -> int:
        """The calls it may have in flight now."""
        return 1 if self.on_trial else self.max_concurrent
    models: dict[str, str | None] = field(default_factory=dict)  # id -> LM Studio's state ("loaded", ...) or None


@dataclass(frozen=True)
class Pick:
    hosts: list[HostView]  # the chosen host first, then the rest for failover
    reason: str  # "affinity", "least_loaded" or "only_choice"


def serving(hosts: Sequence[HostView], model: str) -> list[HostView]:
    return [host for host in hosts if host.routed and model in host.models]


def with_free_slot(hosts: Sequence[HostView]) -> list[HostView]:
    return [host for host in hosts if host.outstanding < host.slots]


def loaded_first(hosts: Sequence[HostView], model: str) -> list[HostView]:
    """The hosts that have ``model`` loaded, if any does (a host that does not say counts as loaded)."""
    loaded = [host for host in hosts if host.models.get(model) in (None, "loaded")]
    return loaded or list(hosts)


def within_load_bound(hosts: Sequence[HostView], bound: int) -> list[HostView]:
    least = min(host.outstanding for host in hosts)
    return [host for host in hosts if host.outstanding - least <= bound]


def affine(hosts: Sequence[HostView], key: bytes, memory: PrefixMemory) -> list[HostView]:
    """``hosts`` ranked for a conversation: the host holding its prefix first, else the first in rendezvous order
    that evicts nobody, then the rest in rendezvous order."""
    ranked = rank(key, hosts)
    holder = memory.holder(key)
    first = next((host for host in ranked if host.name == holder), None)
    if first is None:
        first = next((host for host in ranked if memory.has_room(host.name)), ranked[0])
    return [first, *(host for host in ranked if host is not first)]


def least_outstanding(hosts: Sequence[HostView], rng: random.Random) -> list[HostView]:
    shuffled = list(hosts)
    rng.shuffle(shuffled)  # ties broken at random: sorted() keeps the shuffled order among equals
    return sorted(shuffled, key=lambda host: host.outstanding)


def pick(hosts: Sequence[HostView], model: str, key: bytes | None, memory: PrefixMemory, load_bound: int,
         rng: random.Random) -> Pick | None:
    """The hosts to try, best first; None when every host that serves ``model`` is busy (the call waits).
    Raises ``LookupError`` when no host that is up serves it."""
    candidates = serving(hosts, model)
    if not candidates:
        raise LookupError(model)
    free = with_free_slot(candidates)
    if not free:
        return None
    preferred = within_load_bound(loaded_first(free, model), load_bound)
    if key is not None:
        ranked, reason = affine(preferred, key, memory), "affinity"
        if memory.holder(key) not in (None, ranked[0].name):  # its host is too busy or gone: moved by load
            reason = "least_loaded"
    else:
        ranked, reason = least_outstanding(preferred, rng), "least_loaded"
    rest = [host for host in least_outstanding(free, rng) if host not in ranked]
    return Pick([*ranked, *rest], "only_choice" if len(candidates) == 1 else reason)
