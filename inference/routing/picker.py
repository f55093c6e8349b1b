"""Picking the host for a call: filter, then score, then pick, each step a small policy of its own.

1. Filter: hosts that are routed to (serving, by their health) and serve the model; of those, where hosts say
   different things of the model, the ones whose context holds the call (prompt and output, else the prompt, the
   largest context first) and that have the capabilities it needs (tools, images; a host that does not say is
   taken at its word); of those, the ones with a free slot, for the host and for the model (none: the call waits).
2. Loaded first: hosts with the model in memory over hosts that would load it first (seconds to minutes).
3. Load bound: hosts no more than ``load_bound`` requests busier than the least busy one.
4. Prefix affinity: the host that holds the conversation's prefix; a conversation the gateway does not know goes
   to the first host in its rendezvous ranking that has an unfilled cache slot, else to the first in the ranking.
5. Least outstanding requests when there is no conversation (ties at random).

The ranking that comes out also orders failover: the chosen host, then the others in the order they scored.
"""

from __future__ import annotations

import random
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field

from .demand import Demand
from .memory import PrefixMemory
from .rendezvous import rank


@dataclass(frozen=True)
class ModelOnHost:
    """What a host says of one of its models (None: it does not say; LM Studio's native API does)."""

    state: str | None = None  # "loaded", "not-loaded"
    instances: int | None = None  # loaded instances (LM Studio 0.4)
    slots: int | None = None  # their parallel prediction slots together (LM Studio 0.4)
    context: int | None = None  # the context length it is loaded with
    tools: bool | None = None  # trained for tool use (LM Studio 0.4's capabilities)
    vision: bool | None = None

    @property
    def loaded(self) -> bool:
        return self.state in (None, "loaded")


@dataclass
class HostView:
    """What routing knows of one host now."""

    name: str
    max_concurrent: int
    weight: float = 1.0
    outstanding: int = 0  # calls in flight there
    routed: bool = True  # its health (routing/health.py) is serving: not down, ejected or being checked
    on_trial: bool = False  # back from an ejection and not yet proven: one call at a time
    models: dict[str, ModelOnHost] = field(default_factory=dict)  # what it serves, by model id
    by_model: dict[str, int] = field(default_factory=dict)  # calls in flight there, by model

    @property
    def slots(self) -> int:
        """The calls it may have in flight now."""
        return 1 if self.on_trial else self.max_concurrent

    def has_free_slot(self, model: str) -> bool:
        """Whether a call for ``model`` may start here now: a slot of the host's, and of the model's instances
        when the host says how many they have (a call beyond them would queue inside the host)."""
        if self.outstanding >= self.slots:
            return False
        said = self.models.get(model)
        return said is None or said.slots is None or self.by_model.get(model, 0) < said.slots

    def started(self, model: str) -> None:
        self.outstanding += 1
        self.by_model[model] = self.by_model.get(model, 0) + 1

    def ended(self, model: str) -> None:
        self.outstanding -= 1
        left = self.by_model.get(model, 0) - 1
        if left > 0:
            self.by_model[model] = left
        else:
            self.by_model.pop(model, None)


@dataclass(frozen=True)
class Pick:
    hosts: list[HostView]  # the chosen host first, then the rest for failover
    reason: str  # "affinity", "least_loaded" or "only_choice"
    step: str = ""  # the step that decided: the first filter that left one host, else the scorer (``STEPS``)


STEPS = ("serving", "fits", "free_slot", "loaded", "load_bound", "affinity", "least_loaded")
"""The picker's steps in the order they run: filters, then a scorer (``inference.routing.step`` names one)."""


def serving(hosts: Sequence[HostView], model: str) -> list[HostView]:
    return [host for host in hosts if host.routed and model in host.models]


def with_free_slot(hosts: Sequence[HostView], model: str) -> list[HostView]:
    return [host for host in hosts if host.has_free_slot(model)]


def alike(hosts: Sequence[HostView], model: str) -> bool:
    """Whether the hosts say the same of ``model`` as far as a call's demand goes: then no demand need be
    estimated (it would choose nothing)."""
    said = {(m.context, m.tools, m.vision) for m in (host.models[model] for host in hosts)}
    return len(said) == 1


def fitting(hosts: Sequence[HostView], model: str, demand: Demand) -> list[HostView]:
    """The hosts that hold the call: its whole context need, else its prompt (the largest contexts, where the
    output has the most room), each narrowed to those with the capabilities it needs; all of them when none
    does (the upstream decides)."""
    whole = [host for host in hosts if demand.fits_all(host.models[model].context)]
    if not whole:
        prompt = [host for host in hosts if demand.fits_prompt(host.models[model].context)]
        largest = max((host.models[model].context or 0 for host in prompt), default=0)
        whole = [host for host in prompt if (host.models[model].context or 0) == largest]
    return capable(whole, model, demand) or capable(hosts, model, demand) or list(hosts)


def capable(hosts: Sequence[HostView], model: str, demand: Demand) -> list[HostView]:
    """The hosts not known to lack a capability the call needs (tools, vision)."""
    return [host for host in hosts if not (demand.tools and host.models[model].tools is False)
            and not (demand.images and host.models[model].vision is False)]


def loaded_first(hosts: Sequence[HostView], model: str) -> list[HostView]:
    """The hosts that have ``model`` loaded, if any does (a host that does not say counts as loaded)."""
    loaded = [host for host in hosts if host.models[model].loaded]
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
         rng: random.Random, demand: Callable[[], Demand] | None = None) -> Pick | None:
    """The hosts to try, best first; None when every host that serves ``model`` is busy (the call waits).
    Raises ``LookupError`` when no host that is up serves it. ``demand`` is asked only when the hosts differ."""
    decided: list[str] = []  # the first filter that left one host

    def narrowed(step: str, left: list[HostView]) -> list[HostView]:
        if len(left) == 1 and not decided:
            decided.append(step)
        return left

    candidates = narrowed("serving", serving(hosts, model))
    if not candidates:
        raise LookupError(model)
    only_choice = len(candidates) == 1
    if demand is not None and not only_choice and not alike(candidates, model):
        candidates = narrowed("fits", fitting(candidates, model, demand()))
    free = narrowed("free_slot", with_free_slot(candidates, model))
    if not free:
        return None
    preferred = narrowed("load_bound", within_load_bound(narrowed("loaded", loaded_first(free, model)), load_bound))
    if key is not None:
        ranked, reason = affine(preferred, key, memory), "affinity"
        if memory.holder(key) not in (None, ranked[0].name):  # its host is too busy or gone: moved by load
            reason = "least_loaded"
    else:
        ranked, reason = least_outstanding(preferred, rng), "least_loaded"
    rest = [host for host in least_outstanding(free, rng) if host not in ranked]
    return Pick([*ranked, *rest], "only_choice" if only_choice else reason, decided[0] if decided else reason)
