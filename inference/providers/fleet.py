"""Several hosts behind one gateway: each call goes to the host the routing policies pick (``inference.routing``),
and to the next in their ranking when a host fails before answering.

A call moves to the next host only while no byte of its answer has arrived: nothing is retried once a stream has
been handed to the relay, nor after a deadline passed (the call may still run there); a host's 4xx is the
client's answer, not the host's failure. Each host's health is its own state machine (``routing.health``): what
calls and probes report decides whether it is routed to. Model lists are refreshed in the background, each host
within ``probe_timeout_secs``: no call waits for a host it is not sent to.
"""

from __future__ import annotations

import dataclasses
import random
from collections.abc import Callable, Coroutine
from dataclasses import dataclass
from functools import cache, partial
from typing import Any, TypeVar

from twisted.internet.defer import Deferred, DeferredList
from twisted.internet.interfaces import IReactorTime
from twisted.logger import Logger
from twisted.python.failure import Failure

from .. import jsonio
from ..config import DEFAULT_HOST_SLOTS, PlacementConfig, RoutingConfig, UpstreamConfig
from ..errors import GatewayError, UpstreamClientError, UpstreamError, UpstreamTimeout, UpstreamUnreachable
from ..fairness import FairQueue, Shares, overloaded
from ..operations import Operation
from ..routing.conversation import conversation
from ..routing.demand import Demand
from ..routing.health import CHECKING, DOWN, EJECTED, PROBING, SERVING, HealthRules, HostHealth
from ..routing.memory import PrefixMemory, ResponseHomes
from ..routing.picker import HostView, ModelOnHost, Pick, pick, serving
from ..tenants import ANONYMOUS, Caller
from .base import ChatStream, Completion, EventConsumer, Provider, Route, WrappedStream
from .placement import Placement

T = TypeVar("T", Completion, ChatStream)

log = Logger()

# LM Studio's words when a host cannot serve the model right now (another host may).
_NOT_LOADED = ("not loaded", "no models loaded", "model is loading", "failed to load")


def lacks_response(error: GatewayError) -> bool:
    """Whether a host said it does not hold the ``previous_response_id`` asked for (another host may)."""
    if not isinstance(error, UpstreamClientError) or error.status not in (400, 404):
        return False
    message = error.message.lower()
    return error.code == "previous_response_not_found" or (
        error.param == "previous_response_id" and "not found" in message) or "previous response" in message


def is_host_failure(error: GatewayError) -> bool:
    """Whether another host may well answer what this one could not: it refused or timed out the connection,
    reset it before answering, failed (5xx, 503 "loading"), refused the gateway's token or has the model
    unloaded. A request it refused (4xx) would be refused anywhere; one it did not answer in time may still be
    running there (no second copy)."""
    if isinstance(error, UpstreamUnreachable):
        return True
    if isinstance(error, UpstreamClientError):
        return error.status == 503 or any(words in error.message.lower() for words in _NOT_LOADED)
    return isinstance(error, UpstreamError) and error.kind in ("server_error", "interrupted", "unauthorized")


class Host:
    """One host: its provider, what routing knows of it (``view``) and its health (set by the fleet)."""

    health: HostHealth

    def __init__(self, config: UpstreamConfig, provider: Provider) -> None:
        self.config = config
        self.provider = provider
        self.view = HostView(config.name, config.max_concurrent or DEFAULT_HOST_SLOTS, config.weight)
        self.models: list[dict[str, Any]] = []  # its model list, as it last answered it


@dataclass(frozen=True)
class _Waiting:
    """A call waiting for a host to free a slot for its model."""

    model: str
    woken: Deferred[None]  # fired when a slot it may take is free (it then looks again)


class FleetProvider(Provider):
    """The hosts of ``inference.upstreams`` as one provider: their models together, each call routed."""

    def __init__(self, hosts: list[Host], routing: RoutingConfig, clock: IReactorTime,
                 rng: random.Random | None = None, placement: PlacementConfig | None = None,
                 load_timeout: float = 300.0, shed_above: int | None = None) -> None:
        self.hosts = hosts
        self._probe_timeout = routing.probe_timeout_secs
        self.on_eject: Callable[[str], None] = lambda name: None  # telemetry counts ejections
        kinds = {host.provider.name for host in hosts}
        self.name = kinds.pop() if len(kinds) == 1 else "mixed"  # the provider label of metrics and spans
        self.base_url = "fleet:" + ",".join(host.view.name for host in hosts)
        self._by_name = {host.view.name: host for host in hosts}
        self._views = [host.view for host in hosts]  # live: each host updates its own view
        self._load_bound = routing.load_bound
        self._max_ejected = max(1, len(hosts) * routing.max_ejection_percent // 100) \
            if routing.max_ejection_percent else 0
        self._max_waiting = routing.max_waiting
        self._rng = rng or random.Random()
        self.memory = PrefixMemory(lambda name: self._by_name[name].view.max_concurrent)
        self.responses = ResponseHomes()
        # Calls waiting for a slot, handed freed slots by priority class and tenants' shares.
        self._waiting: FairQueue[_Waiting] = FairQueue(Shares(), shed_above)
        self._listed = False  # whether the hosts' model lists were asked once
        self.placement = Placement(placement or PlacementConfig(), hosts, clock, load_timeout,
                                   routing.probe_timeout_secs, self._learn_models)
        rules = HealthRules(routing.eject_after, routing.eject_secs, routing.max_eject_secs)
        for host in hosts:
            host.health = HostHealth(clock, rules, probe=partial(self._probe, host),
                                     busy=partial(lambda view: view.outstanding > 0, host.view),
                                     may_eject=self._may_eject)
            host.health.on_change = partial(self._health_changed, host)
            host.health.on_models = partial(self._learn_models, host)

    async def list_models(self, timeout: float | None = None) -> list[dict[str, Any]]:
        """Every host's models together (each model once, with the names of the hosts serving it).

        The lists are refreshed in the background, each host within ``probe_timeout_secs``, and the last answers
        served meanwhile: a host that hangs slows no call. Only the first list, and a probe (``timeout``: the
        health monitor, ``/health``), waits for the answers."""
        asked = DeferredList([host.health.refresh() for host in self.hosts])
        if timeout is not None or not self._listed:
            await asked
            self._listed = True
        return self._merged()

    def _merged(self) -> list[dict[str, Any]]:
        merged: dict[str, dict[str, Any]] = {}
        answering = [host for host in self.hosts if host.health.state != DOWN and host.health.answered]
        if not answering:
            errors = "; ".join(f"{host.view.name}: {host.health.error or host.health.state}" for host in self.hosts)
            raise UpstreamUnreachable(f"no host of the fleet answers its model list ({errors})")
        for host in answering:
            for model in host.models:
                entry = merged.setdefault(model["id"], {**_shared_fields(model), "hosts": []})
                entry["hosts"].append({"name": host.view.name, **_said(host.view.models[model["id"]])})
                _merge_native(entry, model)
        return list(merged.values())

    def _probe(self, host: Host) -> Deferred[list[dict[str, Any]]]:
        return Deferred.fromCoroutine(host.provider.list_models(timeout=self._probe_timeout))

    def _learn_models(self, host: Host, models: list[dict[str, Any]]) -> None:
        host.models = models
        host.view.models = {model["id"]: _facts(model) for model in models}
        self.placement.events.instances(host.view.name, {model: facts.instances for model, facts
                                                          in host.view.models.items() if facts.instances is not None})
        self.placement.listed(host)
        if host.config.max_concurrent is None:  # the operator's number overrides what the host says
            reported = _reported_slots(models)
            if reported and reported != host.view.max_concurrent:
                host.view.max_concurrent = reported
                self._wake_for_free_slots(host)

    def _may_eject(self) -> bool:
        """Envoy's max_ejection_percent: a cause every host shares (the same bad call failing everywhere) must not
        leave the fleet empty."""
        return sum(host.health.state == EJECTED for host in self.hosts) < self._max_ejected

    def _health_changed(self, host: Host, old: str, new: str) -> None:
        """What a host's change of state means for routing: its view, its conversations, the waiting calls, the
        log and the metrics."""
        name, health = host.view.name, host.health
        host.view.routed, host.view.on_trial = new == SERVING, health.on_trial
        if new == SERVING:
            if old == CHECKING:  # (still there: nothing to say each time a host is checked)
                log.debug("upstream host {host} answered its check", host=name)
            else:
                log.info("upstream host {host} is back, serving {models}", host=name,
                         models=", ".join(host.view.models) or "no models yet")
            self._wake_for_free_slots(host)
            return
        if old == SERVING:  # a host that was out may have restarted: its prompt cache is presumed lost
            self.memory.forget(name)
        if new == EJECTED:
            self.on_eject(name)
            log.warn("upstream host {host} left out for {secs:g}s ({why}); other hosts serve its calls",
                     host=name, secs=health.cool_down, why=health.why)
        elif new == DOWN and old != PROBING:
            log.warn("upstream host {host} does not answer its model list ({error}); left out, asked again "
                     "every second", host=name, error=health.error)
        elif new == CHECKING:
            log.info("upstream host {host} is asked for its model list at once ({why})", host=name, why=health.why)
        self._wake_all()  # calls waiting for it look again: another host may serve them, or none

    def fair_shares(self) -> Shares:
        return self._waiting.shares

    async def call(self, operation: Operation, body: dict[str, Any], headers: dict[str, str] | None = None,
                   caller: Caller = ANONYMOUS) -> Completion:
        host, answer, route = await self._first_answer(operation, body,
                                                       lambda host: host.provider.call(operation, body, headers),
                                                       caller)
        self._release(host, body["model"])
        if operation.continues_responses and isinstance(answer.data.get("id"), str):
            self.responses.remember(answer.data["id"], host.view.name)
        return dataclasses.replace(answer, served=dataclasses.replace(answer.served, route=route))

    async def open_stream(self, operation: Operation, body: dict[str, Any], headers: dict[str, str] | None = None,
                          caller: Caller = ANONYMOUS) -> ChatStream:
        host, stream, route = await self._first_answer(
            operation, body, lambda host: host.provider.open_stream(operation, body, headers), caller)
        # The slot is the stream's until it ends; a Responses stream names its response in its first event.
        created = partial(self.responses.remember, host=host.view.name) if operation.continues_responses else None
        return HostStream(stream, partial(self._stream_ended, host, body["model"]), route, created)

    async def _first_answer(self, operation: Operation, body: dict[str, Any],
                            attempt: Callable[[Host], Coroutine[Any, Any, T]], caller: Caller) -> tuple[Host, T, Route]:
        """``attempt`` on the ranked hosts until one answers; that host's slot is still taken when this returns."""
        key, ranking = await self._ranking(operation, body, caller)
        failed: list[tuple[str, str]] = []
        model = body["model"]
        for host in ranking.hosts:
            host.view.started(model)
            try:
                answer = await attempt(host)
            except GatewayError as e:
                self._report(host, e)
                self._release(host, model)
                failure = is_host_failure(e)
                if host is ranking.hosts[-1] or not (failure or ranking.elsewhere and lacks_response(e)):
                    e.route = _route(host, ranking, failed)  # the error names the host that failed last
                    raise
                if failure:  # (a host that lacks a previous response did not fail)
                    failed.append((host.view.name, e.kind or e.code or type(e).__name__))
                continue
            except BaseException:  # cancelled: the client left, or the deadline passed
                self._release(host, model)
                raise
            host.health.call_answered()
            if host.view.on_trial:  # proven: all its slots again
                host.view.on_trial = False
                self._wake_for_free_slots(host)
            if answer.served.model_load is not None and model in host.view.models:
                host.view.models[model] = dataclasses.replace(host.view.models[model], state="loaded")  # it loaded it
            self._served(host, key)
            self.placement.used(host, model)
            return host, answer, _route(host, ranking, failed)
        raise AssertionError("unreachable: the last host's failure is raised")

    async def _ranking(self, operation: Operation, body: dict[str, Any],
                       caller: Caller) -> tuple[bytes | None, Ranking]:
        """The conversation's key and the hosts to try, once one of them has a free slot.

        A ``previous_response_id`` the fleet saw given goes to the host holding it alone (waiting for its slot if
        need be); one it did not see (another gateway process gave it) is asked of each host in turn."""
        model = body["model"]
        key, source = conversation(operation.prefix, model, body)
        previous = body.get("previous_response_id") if operation.continues_responses else None
        home = self._by_name.get(self.responses.home(previous) or "") if isinstance(previous, str) else None
        views = [home.view] if home is not None and home.view in serving(self._views, model) else self._views
        demand = cache(partial(Demand.of, body, operation.output_limits))  # estimated once, and only where hosts differ
        while True:
            if self.placement.on:  # (again after a wait: the host that held the model may have gone)
                await self.placement.ready(model)
            try:
                chosen: Pick | None = pick(self.placement.holders(views, model), model, key, self.memory,
                                           self._load_bound, self._rng, demand)
            except LookupError:
                raise UpstreamUnreachable(f"no host that serves '{model}' is up") from None
            if chosen is not None:
                hosts = [self._by_name[view.name] for view in chosen.hosts]
                at_home = len(views) == 1 and len(self._views) > 1  # the host holding the previous response
                return key, Ranking(hosts, "affinity" if at_home else chosen.reason,
                                    elsewhere=isinstance(previous, str) and len(views) > 1, key_source=source,
                                    step="previous_response" if at_home else chosen.step)
            await self._wait(model, caller)

    def _wait(self, model: str, caller: Caller) -> Deferred[None]:
        """Wait for a host to free a slot for ``model``, in the fair order; 429 when there is no room to wait."""
        waiting = self._waiting
        shed = waiting.make_room(caller, self._max_waiting, "a host of the fleet to free a slot",
                                 "inference.routing.max_waiting")
        if shed is not None:
            shed.woken.errback(overloaded("The fleet's wait is full and gave this sheddable call's place to a more "
                                          "urgent one; retry shortly"))

        def give_up(woken: Deferred[None]) -> None:  # cancelled: its deadline passed, or its client left
            waiting.remove(entry)

        entry = _Waiting(model, Deferred(give_up))
        waiting.push(entry, caller)
        return entry.woken

    def _wake_one(self, host: Host) -> None:
        """A slot of ``host`` is free: the longest-waiting call for a model it serves looks again (one call, not
        every waiting one: at 2,000 waiting, waking all cost 10 ms of CPU per freed slot)."""
        if not host.view.routed or host.view.outstanding >= host.view.slots:
            return
        view = host.view
        entry = self._waiting.pop(lambda waiting: waiting.model in view.models and view.has_free_slot(waiting.model))
        if entry is not None:
            entry.woken.callback(None)

    def _wake_for_free_slots(self, host: Host) -> None:
        """``host`` has more free slots than before: as many waiting calls look again."""
        for _ in range(host.view.slots - host.view.outstanding):
            self._wake_one(host)

    def _wake_all(self) -> None:
        """Every waiting call looks again (a host left or joined the fleet: rare)."""
        for entry in self._waiting.clear():
            entry.woken.callback(None)

    def _report(self, host: Host, error: GatewayError) -> None:
        """Tell a host's health what a call's error says of the host (a 4xx says nothing of it)."""
        if isinstance(error, UpstreamUnreachable) or error.kind == "interrupted":
            host.health.connection_lost(error.message)
        elif isinstance(error, UpstreamTimeout) or is_host_failure(error):
            host.health.call_failed(error.message)

    def _stream_ended(self, host: Host, model: str, result: object) -> None:
        """A stream of ``host`` ended: cut or stalled says something of the host; its slot is free."""
        if isinstance(result, Failure) and isinstance(result.value, GatewayError):
            error = result.value
            if error.kind in ("interrupted", "timeout"):  # (a client that left is not the host's fault)
                self._report(host, error)
        self._release(host, model)

    def watch_models(self, changed: Callable[[], None]) -> None:
        self.placement.changed = changed

    def host_status(self) -> list[dict[str, Any]]:
        return [{"name": host.view.name, "base_url": host.provider.base_url, "state": host.health.state,
                 "up": host.health.state != DOWN, "ejected": host.health.state == EJECTED,
                 "in_flight": host.view.outstanding, "max_concurrent": host.view.max_concurrent,
                 "models": sorted(host.view.models), "loaded": _loaded_here(host),
                 **({"error": host.health.error} if host.health.error else {})}
                for host in self.hosts]

    def waiting(self) -> int:
        """How many calls wait for a host to free a slot."""
        return len(self._waiting)

    def _served(self, host: Host, key: bytes | None) -> None:
        if key is not None:
            self.memory.remember(host.view.name, key)

    def _release(self, host: Host, model: str) -> None:
        host.view.ended(model)
        self._wake_one(host)

    async def close(self) -> None:
        for host in self.hosts:
            host.health.stop()
            await host.provider.close()


def _said(facts: ModelOnHost) -> dict[str, Any]:
    """What a host says of one of its models, as ``/v1/models`` (under ``hosts``) and ``/health`` show it: LM
    Studio's state; from 0.4, its loaded instances, their slots and context length (what it does not say is left
    out)."""
    said = {"state": facts.state, "context_length": facts.context, "instances": facts.instances, "slots": facts.slots}
    return {key: value for key, value in said.items() if value is not None}


def _reported_slots(models: list[dict[str, Any]]) -> int:
    """The parallel slots of a host's loaded instances, as LM Studio 0.4 reports them (0: it does not say)."""
    return sum(instance.get("parallel", 0) for model in models for instance in model.get("instances") or ()
               if isinstance(instance, dict) and isinstance(instance.get("parallel"), int))


def _facts(model: dict[str, Any]) -> ModelOnHost:
    """What routing reads of a host's model entry (``LMStudioProvider.list_models``'s fields)."""
    instances = model.get("instances")
    capabilities = model.get("capabilities")
    said = capabilities if isinstance(capabilities, dict) else {}
    context, tools, vision = model.get("loaded_context_length"), said.get("trained_for_tool_use"), said.get("vision")
    return ModelOnHost(state=model.get("state"), instances=len(instances) if isinstance(instances, list) else None,
                       slots=_reported_slots([model]) or None, context=context if isinstance(context, int) else None,
                       tools=tools if isinstance(tools, bool) else None,  # (what a host says is not trusted blindly)
                       vision=vision if isinstance(vision, bool) else None)


def _loaded_here(host: Host) -> dict[str, dict[str, Any]]:
    """What ``/health`` says a host has loaded: by model, its instances, their slots and context length (what the
    host says: LM Studio 0.4 says all three, 0.3 the context)."""
    return {model: {**_said(dataclasses.replace(facts, state=None)), "in_flight": host.view.by_model.get(model, 0)}
            for model, facts in host.view.models.items() if facts.state == "loaded" or facts.instances}


def _shared_fields(model: dict[str, Any]) -> dict[str, Any]:
    """A host's model entry without what is that host's own (its instances go under ``hosts``)."""
    return {key: value for key, value in model.items() if key != "instances"}


def _merge_native(entry: dict[str, Any], model: dict[str, Any]) -> None:
    """The fleet's view of a model several hosts serve: loaded where any host has it loaded, the largest context
    it is loaded with (a prompt that fits no host is refused before any call), every capability a host has."""
    if model.get("state") == "loaded":
        entry["state"] = "loaded"
    context = model.get("loaded_context_length")
    if isinstance(context, int) and context > (entry.get("loaded_context_length") or 0):
        entry["loaded_context_length"] = context
    capabilities = model.get("capabilities")
    if isinstance(capabilities, dict) and capabilities is not entry.get("capabilities"):
        merged = dict(entry.get("capabilities") or {})
        for name, value in capabilities.items():
            merged[name] = merged.get(name) or value
        entry["capabilities"] = merged


def _route(host: Host, ranking: Ranking, failed: list[tuple[str, str]]) -> Route:
    return Route(host.view.name, "failover" if failed else ranking.reason, tuple(failed), ranking.key_source,
                 "failover" if failed else ranking.step)


@dataclass(frozen=True)
class Ranking:
    hosts: list[Host]  # the chosen host first, then the others to fail over to
    reason: str
    elsewhere: bool = False  # a previous_response_id no host is known to hold: ask the next when one lacks it
    key_source: str | None = None  # what the conversation's key was made from
    step: str = ""  # the picker's step that decided


class HostStream(WrappedStream):
    """A host's stream that gives the host's slot back when it ends, however it ends, and says how."""

    def __init__(self, inner: ChatStream, ended: Callable[[object], None], route: Route,
                 created: Callable[[str], None] | None = None) -> None:
        super().__init__(inner)
        self.served = dataclasses.replace(inner.served, route=route)
        self._ended = ended  # told how the stream ended (None, or its Failure); gives the slot back
        self._released = False
        self._created = created  # told the response's id, from its response.created event

    def event(self, payload: bytes, name: bytes | None = None, parsed: dict[str, Any] | None = None) -> None:
        if self._created is not None and name == b"response.created":
            try:
                event = parsed if parsed is not None else jsonio.loads(payload)
                response = event.get("response")
            except (ValueError, AttributeError):  # not a response event: the relay reports the stream broken
                response = None
            if isinstance(response, dict) and isinstance(response.get("id"), str):
                self._created(response["id"])
            self._created = None
        super().event(payload, name, parsed)

    def begin(self, consumer: EventConsumer) -> Deferred[None]:
        ended = super().begin(consumer)
        ended.addBoth(self._done)
        return ended

    def _done(self, result: Any) -> Any:
        if not self._released:
            self._released = True
            self._ended(result)
        return result
