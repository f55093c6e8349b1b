"""Models placed across a fleet (``inference.placement``): a model no host has loaded is loaded on one host, through
LM Studio 0.4's load API, before its calls go there; otherwise a burst of calls has every host load it at once
(LM Studio loads a model a call asks for), each holding a copy and each call waiting for its own load.

The host is the one with the fewest loaded instances and no call in flight, ties broken by the model's rendezvous
order, so that gateway processes sharing the fleet choose alike. A load lists the host's models first (another
process may have loaded it), loads, lists again, and unloads its own instance if a race left two. With
``max_loaded_per_host`` it first unloads the host's least recently used idle instance; ``pinned`` models are
loaded on their hosts whenever those list them unloaded (at start, after a restart).
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from typing import TYPE_CHECKING, Any, Protocol

from twisted.internet.defer import Deferred
from twisted.internet.interfaces import IReactorTime
from twisted.logger import Logger
from twisted.python.failure import Failure

from ..config import PlacementConfig
from ..errors import GatewayError, UpstreamError, UpstreamTimeout
from ..fairness import overloaded
from ..routing.picker import HostView
from ..routing.rendezvous import rank
from .lmstudio import LMStudioProvider

if TYPE_CHECKING:
    from .fleet import Host

log = Logger()

PINNED_RETRY_SECS = 30.0
"""A pinned model whose load failed is not tried again on that host for this long (its list comes every few
seconds)."""


class ModelEvents(Protocol):
    """Where loads and unloads are recorded (spans and metrics; see ``telemetry.models``)."""

    def begin(self, action: str, host: str, model: str) -> Callable[[str, float | None], None]:
        """A load or unload starts; the function returned is told how it ended (``loaded``, ``load_failed``,
        ``unloaded``, ``unload_failed``) and the load time LM Studio reported."""

    def instances(self, host: str, counts: dict[str, int]) -> None:
        """The instances a host has loaded now, by model."""


class NoEvents:
    def begin(self, action: str, host: str, model: str) -> Callable[[str, float | None], None]:
        return lambda outcome, seconds: None

    def instances(self, host: str, counts: dict[str, int]) -> None:
        pass


class Placement:
    """Which host loads a model, one load per model and host at a time, and what is unloaded to make room."""

    def __init__(self, config: PlacementConfig, hosts: Sequence[Host], clock: IReactorTime, load_timeout: float,
                 list_timeout: float, learn: Callable[[Host, list[dict[str, Any]]], None]) -> None:
        self.on = config.mode == "on_demand"
        self.events: ModelEvents = NoEvents()
        self.changed: Callable[[], None] = lambda: None  # told when a load or unload changed what a host holds
        self._max = config.max_loaded_per_host
        self._pinned: dict[str, set[str]] = {}
        for model, names in config.pinned.items():
            for name in names:
                self._pinned.setdefault(name, set()).add(model)
        self._hosts = hosts
        self._clock = clock
        self._load_timeout = load_timeout
        self._list_timeout = list_timeout
        self._learn = learn  # the fleet takes in a host's model list
        self._placing: dict[tuple[str, str], list[Deferred[None]]] = {}  # loads under way, and who waits for each
        self._used: dict[tuple[str, str], float] = {}  # when a call last went to a model on a host
        self._failed_at: dict[tuple[str, str], float] = {}  # pinned loads that failed, and when

    # -- what routing asks -------------------------------------------------------------------------------------

    def holders(self, views: list[HostView], model: str) -> list[HostView]:
        """The hosts a call for ``model`` may go to: with placement on, those that have it loaded when one does
        (a busy holder is waited for: sending the call to another host would load a copy there)."""
        if not self.on:
            return views
        loaded = [view for view in views if view.routed and model in view.models and view.models[model].loaded]
        return loaded or views

    def used(self, host: Host, model: str) -> None:
        self._used[(host.view.name, model)] = self._clock.seconds()

    async def ready(self, model: str) -> None:
        """Return once a host that is up has ``model`` loaded, loading it on one first when none has; at once when
        placement is off or no host can load it (LM Studio 0.3, llama.cpp: they load on use). A failed load is
        tried on the next host; the last failure is the call's."""
        tried: set[str] = set()
        while self.on and self._needs_load(model):
            host = self._loading(model, tried) or self._target(model, tried)
            if host is None:
                if tried or not self._loadable_hosts(model, tried):
                    return  # (after failures: the call goes on, and the host it reaches says why)
                raise overloaded(f"every host that can load '{model}' holds inference.placement.max_loaded_per_host "
                                 "models with calls in flight; retry shortly")
            try:
                await self._placing_on(host, model)
                return
            except GatewayError:
                tried.add(host.view.name)
                if self._target(model, tried) is None:
                    raise

    def listed(self, host: Host) -> None:
        """A host's list was taken in: load a model pinned there that it lists unloaded."""
        name = host.view.name
        for model in self._pinned.get(name, ()):
            facts = host.view.models.get(model)
            failed = self._failed_at.get((name, model))
            if facts is None or facts.loaded or not _loadable(host) or (name, model) in self._placing or (
                    failed is not None and self._clock.seconds() - failed < PINNED_RETRY_SECS):
                continue
            log.info("upstream host {host} lists {model}, pinned there, as not loaded: loading it", host=name,
                     model=model)
            self._start(host, model)

    # -- choosing ------------------------------------------------------------------------------------------------

    def _needs_load(self, model: str) -> bool:
        serving = [host for host in self._hosts if host.view.routed and model in host.view.models]
        return bool(serving) and not any(host.view.models[model].loaded for host in serving) and any(
            _loadable(host) for host in serving)

    def _loadable_hosts(self, model: str, tried: set[str]) -> list[Host]:
        return [host for host in self._hosts if host.view.routed and model in host.view.models and _loadable(host)
                and host.view.name not in tried]

    def _target(self, model: str, tried: set[str]) -> Host | None:
        """The host to load ``model`` on: no call in flight, then the fewest instances loaded (or being loaded),
        then the model's rendezvous order (the same in every process); only hosts with room, or an idle instance
        to unload."""
        hosts = [host for host in self._loadable_hosts(model, tried)
                 if self._max is None or self._held(host) < self._max or self._idlest(host, model) is not None]
        order = {view.name: i for i, view in enumerate(rank(model.encode(), [host.view for host in hosts]))}
        return min(hosts, default=None,
                   key=lambda host: (host.view.outstanding > 0, self._held(host), order[host.view.name]))

    def _loading(self, model: str, tried: set[str]) -> Host | None:
        """A host ``model`` is being loaded on now (the call waits for that load rather than start another)."""
        return next((host for host in self._loadable_hosts(model, tried) if (host.view.name, model) in self._placing),
                    None)

    def _held(self, host: Host) -> int:
        """The instances ``host`` has loaded, and those it is loading for the gateway."""
        return _instances_on(host) + sum(name == host.view.name for name, _ in self._placing)

    def _idlest(self, host: Host, model: str) -> tuple[str, str] | None:
        """The least recently used instance on ``host`` with no call in flight, not pinned there and not of
        ``model``: (its model, its instance id)."""
        name = host.view.name
        idle = [(self._used.get((name, other), 0.0), other) for other, facts in host.view.models.items()
                if other != model and facts.instances and not host.view.by_model.get(other)
                and other not in self._pinned.get(name, ())]
        for _, other in sorted(idle):
            ids = _instance_ids(host, other)
            if ids:
                return other, ids[-1]
        return None

    # -- loading -------------------------------------------------------------------------------------------------

    def _placing_on(self, host: Host, model: str) -> Deferred[None]:
        """Wait for ``model``'s load on ``host``, starting it unless one is under way. Cancelling the wait (the
        call's deadline, or its client left) leaves the load running for the others."""
        key = (host.view.name, model)
        under_way = key in self._placing
        waiters = self._placing.setdefault(key, [])
        waiter: Deferred[None] = Deferred(lambda d: waiters.remove(d))
        waiters.append(waiter)  # (before the load starts: it may be over at once)
        if not under_way:
            self._start(host, model)
        return waiter

    def _start(self, host: Host, model: str) -> None:
        key = (host.view.name, model)
        self._placing.setdefault(key, [])
        Deferred.fromCoroutine(self._place(host, model)).addBoth(self._placed, key)

    def _placed(self, result: Failure | None, key: tuple[str, str]) -> None:
        for waiter in self._placing.pop(key):
            waiter.callback(result)  # (a Failure fails it)

    async def _place(self, host: Host, model: str) -> None:
        name = host.view.name
        await self._relist(host)  # another gateway may have loaded it meanwhile
        if host.view.models.get(model) is None or host.view.models[model].state == "loaded":
            return
        await self._make_room(host, model)
        finish = self.events.begin("load", name, model)
        log.info("loading {model} on upstream host {host}", model=model, host=name)
        provider = host.provider
        assert isinstance(provider, LMStudioProvider)  # (only such hosts are chosen)
        try:
            loaded = await provider.load(model, self._load_timeout)
        except GatewayError as e:
            finish("load_failed", None)
            self._failed_at[(name, model)] = self._clock.seconds()
            log.warn("upstream host {host} did not load {model}: {error}", host=name, model=model, error=e.message)
            if isinstance(e, UpstreamTimeout):
                raise UpstreamTimeout(f"loading '{model}' on upstream host {name} took longer than "
                                      f"http.load_timeout_secs ({self._load_timeout:g}s)") from None
            raise UpstreamError(f"upstream host {name} could not load '{model}': {e.message}",
                                kind=e.kind or "server_error") from None
        finish("loaded", loaded.seconds)
        self._failed_at.pop((name, model), None)
        log.info("upstream host {host} loaded {model} ({instance}) in {secs}s", host=name, model=model,
                 instance=loaded.instance_id, secs="?" if loaded.seconds is None else f"{loaded.seconds:.1f}")
        await self._relist(host, changed=True)
        ids = _instance_ids(host, model)
        if loaded.instance_id in ids[1:]:  # another gateway loaded it too, first: keep the first instance
            log.info("upstream host {host} has {model} loaded twice (another gateway loaded it at the same time): "
                     "unloading {instance}", host=name, model=model, instance=loaded.instance_id)
            await self._unload(host, model, loaded.instance_id)

    async def _make_room(self, host: Host, model: str) -> None:
        if self._max is None:
            return
        for _ in range(self._held(host)):
            if self._held(host) - 1 < self._max:  # (less its own load, under way)
                return
            victim = self._idlest(host, model)
            if victim is None:
                raise overloaded(f"upstream host {host.view.name} holds inference.placement.max_loaded_per_host "
                                 f"({self._max}) models with calls in flight; retry shortly")
            log.info("unloading {model} ({instance}) from upstream host {host}, its least recently used idle "
                     "model, to make room (max_loaded_per_host {max})", model=victim[0], instance=victim[1],
                     host=host.view.name, max=self._max)
            await self._unload(host, *victim)

    async def _unload(self, host: Host, model: str, instance_id: str) -> None:
        finish = self.events.begin("unload", host.view.name, model)
        provider = host.provider
        assert isinstance(provider, LMStudioProvider)
        try:
            await provider.unload(instance_id, self._list_timeout)
        except GatewayError as e:
            finish("unload_failed", None)
            log.warn("upstream host {host} did not unload {instance}: {error}", host=host.view.name,
                     instance=instance_id, error=e.message)
            raise
        finish("unloaded", None)
        await self._relist(host, changed=True)

    async def _relist(self, host: Host, changed: bool = False) -> None:
        self._learn(host, await host.provider.list_models(timeout=self._list_timeout))
        if changed:
            self.changed()


def _loadable(host: Host) -> bool:
    """Whether the gateway can load models on ``host``: LM Studio 0.4's API answers there."""
    return isinstance(host.provider, LMStudioProvider) and host.provider.native_api == "v1"


def _instances_on(host: Host) -> int:
    return sum(facts.instances or 0 for facts in host.view.models.values())


def _instance_ids(host: Host, model: str) -> list[str]:
    """The ids of ``model``'s loaded instances on ``host``, in the order the host lists them."""
    for entry in host.models:
        if entry["id"] == model:
            instances = entry.get("instances") or ()
            return [i["id"] for i in instances if isinstance(i, dict) and isinstance(i.get("id"), str)]
    return []
