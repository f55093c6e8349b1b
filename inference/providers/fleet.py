"""Several hosts behind one gateway: each call goes to the host the routing policies pick (``inference.routing``),
and to the next in their ranking when a host fails before answering.

Nothing is retried once a stream has been handed to the relay (a byte may have reached the client); a host's
4xx is the client's answer, not the host's failure. A host that keeps failing is ejected for a cool-down
(``inference.routing.ejection``), then asked for its models: it serves again once it answers.
"""

from __future__ import annotations

import dataclasses
import random
from collections.abc import Callable, Coroutine
from dataclasses import dataclass
from functools import partial
from typing import Any, TypeVar, cast

from twisted.internet.defer import CancelledError, Deferred, DeferredList
from twisted.logger import Logger
from twisted.python.failure import Failure

from .. import jsonio
from ..config import RoutingConfig, UpstreamConfig
from ..errors import GatewayError, UpstreamClientError, UpstreamError, UpstreamTimeout, UpstreamUnreachable
from ..operations import RESPONSES, Operation
from ..routing.conversation import conversation
from ..routing.ejection import Ejection
from ..routing.memory import PrefixMemory, ResponseHomes
from ..routing.picker import HostView, Pick, pick, serving
from .base import ChatStream, Completion, EventConsumer, Provider, Route, WrappedStream

T = TypeVar("T")

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
    reset it before answering, failed (5xx, 503 "loading") or has the model unloaded. A request it refused (4xx)
    would be refused anywhere; one it did not answer in time may still be running there (no second copy)."""
    if isinstance(error, UpstreamUnreachable):
        return True
    if isinstance(error, UpstreamClientError):
        return error.status == 503 or any(words in error.message.lower() for words in _NOT_LOADED)
    return isinstance(error, UpstreamError) and error.kind in ("server_error", "interrupted")


class Host:
    """One host: its provider, and what routing knows of it (``view``)."""

    def __init__(self, config: UpstreamConfig, provider: Provider, ejection: Ejection) -> None:
        self.config = config
        self.provider = provider
        self.view = HostView(config.name, config.max_concurrent, config.weight)
        self.ejection = ejection
        self.comeback: Any = None  # while ejected: the timer, then the probe, that may bring it back
        self.models: list[dict[str, Any]] = []  # its model list, as it last answered it


class FleetProvider(Provider):
    """The hosts of ``inference.upstreams`` as one provider: their models together, each call routed."""

    def __init__(self, hosts: list[Host], routing: RoutingConfig, clock: Any, probe_timeout: float,
                 rng: random.Random | None = None) -> None:
        self.hosts = hosts
        self.clock = clock
        self._probe_timeout = probe_timeout
        self.on_eject: Callable[[str], None] = lambda name: None  # telemetry counts ejections
        kinds = {host.provider.name for host in hosts}
        self.name = kinds.pop() if len(kinds) == 1 else "mixed"  # the provider label of metrics and spans
        self.base_url = "fleet:" + ",".join(host.view.name for host in hosts)
        self._by_name = {host.view.name: host for host in hosts}
        self._views = [host.view for host in hosts]  # live: each host updates its own view
        self._load_bound = routing.load_bound
        self._rng = rng or random.Random()
        self.memory = PrefixMemory(lambda name: self._by_name[name].view.max_concurrent)
        self.responses = ResponseHomes()
        self._waiting: list[Deferred[None]] = []  # calls waiting for a host to free a slot

    async def list_models(self, timeout: float | None = None) -> list[dict[str, Any]]:
        """Every host's models together (each model once, with the names of the hosts serving it); a host that
        does not answer serves nothing until it answers again."""
        asked = [Deferred.fromCoroutine(host.provider.list_models(timeout)) for host in self.hosts]
        answers = await DeferredList(asked, consumeErrors=True)
        merged: dict[str, dict[str, Any]] = {}
        failures: list[Failure] = []
        for host, (ok, result) in zip(self.hosts, answers, strict=True):
            if not ok and _busy(host, cast(Failure, result)):
                ok, result = True, host.models  # busy, not down: it serves what it served
            host.view.up = ok
            if not ok:
                failures.append(cast(Failure, result))
                host.view.models = {}
                continue
            host.view.models = _states(result)
            host.models = result
            for model in result:
                entry = merged.setdefault(model["id"], {**model, "hosts": []})
                entry["hosts"].append(host.view.name)
        if len(failures) == len(self.hosts):
            failures[0].raiseException()
        return list(merged.values())

    async def call(self, operation: Operation, body: dict[str, Any],
                   headers: dict[str, str] | None = None) -> Completion:
        host, answer, route = await self._first_answer(operation, body,
                                                       lambda host: host.provider.call(operation, body, headers))
        self._release(host)
        if operation is RESPONSES and isinstance(answer.data.get("id"), str):
            self.responses.remember(answer.data["id"], host.view.name)
        return dataclasses.replace(answer, route=route)

    async def open_stream(self, operation: Operation, body: dict[str, Any],
                          headers: dict[str, str] | None = None) -> ChatStream:
        host, stream, route = await self._first_answer(
            operation, body, lambda host: host.provider.open_stream(operation, body, headers))
        # The slot is the stream's until it ends; a Responses stream names its response in its first event.
        created = partial(self.responses.remember, host=host.view.name) if operation is RESPONSES else None
        return HostStream(stream, partial(self._release, host), route, created)

    async def _first_answer(self, operation: Operation, body: dict[str, Any],
                            attempt: Callable[[Host], Coroutine[Any, Any, T]]) -> tuple[Host, T, Route]:
        """``attempt`` on the ranked hosts until one answers; that host's slot is still taken when this returns."""
        key, ranking = await self._ranking(operation, body)
        failed: list[tuple[str, str]] = []
        for host in ranking.hosts:
            host.view.outstanding += 1
            try:
                answer = await attempt(host)
            except GatewayError as e:
                self._release(host)
                failure = is_host_failure(e)
                if failure:
                    self._host_failed(host, e)
                if host is ranking.hosts[-1] or not (failure or ranking.elsewhere and lacks_response(e)):
                    e.route = _route(host, ranking, failed)  # the error names the host that failed last
                    raise
                if failure:  # (a host that lacks a previous response did not fail)
                    failed.append((host.view.name, e.kind or e.code or type(e).__name__))
                continue
            except BaseException:  # cancelled: the client left, or the deadline passed
                self._release(host)
                raise
            host.ejection.served()
            if getattr(answer, "model_load", None) is not None:
                host.view.models[body["model"]] = "loaded"  # it loaded the model to answer
            self._served(host, key)
            return host, answer, _route(host, ranking, failed)
        raise AssertionError("unreachable: the last host's failure is raised")

    async def _ranking(self, operation: Operation, body: dict[str, Any]) -> tuple[bytes | None, Ranking]:
        """The conversation's key and the hosts to try, once one of them has a free slot.

        A ``previous_response_id`` the fleet saw given goes to the host holding it alone (waiting for its slot if
        need be); one it did not see (another gateway process gave it) is asked of each host in turn."""
        model = body["model"]
        key, source = conversation(operation.name, model, body)
        previous = body.get("previous_response_id") if operation is RESPONSES else None
        home = self._by_name.get(self.responses.home(previous) or "") if isinstance(previous, str) else None
        views = [home.view] if home is not None and home.view in serving(self._views, model) else self._views
        while True:
            try:
                chosen: Pick | None = pick(views, model, key, self.memory, self._load_bound, self._rng)
            except LookupError:
                raise UpstreamUnreachable(f"no host that serves '{model}' is up") from None
            if chosen is not None:
                hosts = [self._by_name[view.name] for view in chosen.hosts]
                reason = "affinity" if len(views) == 1 and len(self._views) > 1 else chosen.reason
                return key, Ranking(hosts, reason, elsewhere=isinstance(previous, str) and len(views) > 1,
                                    key_source=source)
            waiting: Deferred[None] = Deferred(self._give_up)
            self._waiting.append(waiting)
            await waiting

    def _give_up(self, waiting: Deferred[None]) -> None:
        """A waiting call was cancelled (its deadline, or its client left)."""
        if waiting in self._waiting:
            self._waiting.remove(waiting)

    def _host_failed(self, host: Host, error: GatewayError) -> None:
        cool_down = host.ejection.failed(unreachable=isinstance(error, UpstreamUnreachable))
        if host.view.ejected or host.comeback is not None:  # out already, or being checked
            return
        if cool_down is not None:
            self._eject(host, cool_down, error.message)
        elif error.kind == "interrupted":  # the connection broke mid-answer: a crashed host is known at once
            self._in_background(host, self._check(host, error.message))

    @staticmethod
    def _in_background(host: Host, work: Coroutine[Any, Any, None]) -> None:
        """Run a check of ``host`` as its ``comeback`` (cancelled at close); work that ended at once has already
        set ``comeback`` to what comes next."""
        running = Deferred.fromCoroutine(work)
        running.addErrback(lambda failure: failure.trap(CancelledError))  # closed while it ran
        if not running.called:
            host.comeback = running

    async def _check(self, host: Host, why: str) -> None:
        """Ask the model list of a host that cut a call; out if that fails too."""
        try:
            await host.provider.list_models(timeout=self._probe_timeout)
        except GatewayError as e:
            host.comeback = None
            if not _busy(host, Failure(e)):
                self._eject(host, host.ejection.eject(), f"{why}; then {e.message}")
            return
        host.comeback = None

    def _eject(self, host: Host, cool_down: float, why: str) -> None:
        """Leave ``host`` out for ``cool_down`` seconds, then probe it. Its prompt cache is presumed lost (a host
        that was down may have restarted): its conversations find new homes."""
        host.view.ejected = True
        self.memory.forget(host.view.name)
        self.on_eject(host.view.name)
        log.warn("upstream host {host} left out for {secs:g}s ({why}); other hosts serve its calls",
                 host=host.view.name, secs=cool_down, why=why)
        host.comeback = self.clock.callLater(cool_down, self._probe, host)

    def _probe(self, host: Host) -> None:
        self._in_background(host, self._comeback(host))

    async def _comeback(self, host: Host) -> None:
        """Back in the fleet when its model list answers. While it does not, it is asked again every first
        cool-down: a probe is cheap, and a doubled wait would keep a host that came back out for minutes (the
        doubling is for hosts that answer their model list but keep failing calls)."""
        try:
            models = await host.provider.list_models(timeout=self._probe_timeout)
        except GatewayError:
            host.comeback = self.clock.callLater(host.ejection.probe_secs, self._probe, host)
            return
        host.comeback = None
        host.view.up, host.view.ejected = True, False
        host.view.models = _states(models)
        log.info("upstream host {host} is back, serving {models}", host=host.view.name,
                 models=", ".join(host.view.models) or "no models yet")

    def host_status(self) -> list[dict[str, Any]]:
        return [{"name": host.view.name, "base_url": host.provider.base_url, "up": host.view.up,
                 "ejected": host.view.ejected, "in_flight": host.view.outstanding,
                 "max_concurrent": host.view.max_concurrent, "models": sorted(host.view.models)}
                for host in self.hosts]

    def waiting(self) -> int:
        """How many calls wait for a host to free a slot."""
        return len(self._waiting)

    def _served(self, host: Host, key: bytes | None) -> None:
        if key is not None:
            self.memory.remember(host.view.name, key)

    def _release(self, host: Host) -> None:
        host.view.outstanding -= 1
        waiting, self._waiting = self._waiting, []
        for d in waiting:  # each looks again; those that find every host busy wait again
            d.callback(None)

    async def close(self) -> None:
        for host in self.hosts:
            if host.comeback is not None:
                host.comeback.cancel()
            await host.provider.close()


def _busy(host: Host, failure: Failure) -> bool:
    """Whether a host's model list failed because the host is busy, not down: it timed out while calls to it are in
    flight (llama.cpp's Python server, and LM Studio with one slot, answer it after the running generation)."""
    return bool(failure.check(UpstreamTimeout)) and host.view.outstanding > 0


def _states(models: list[dict[str, Any]]) -> dict[str, str | None]:
    """Each model's LM Studio state ("loaded", "not-loaded"), None when the host does not say."""
    return {model["id"]: model.get("state") for model in models}


def _route(host: Host, ranking: Ranking, failed: list[tuple[str, str]]) -> Route:
    return Route(host.view.name, "failover" if failed else ranking.reason, tuple(failed), ranking.key_source)


@dataclass(frozen=True)
class Ranking:
    hosts: list[Host]  # the chosen host first, then the others to fail over to
    reason: str
    elsewhere: bool = False  # a previous_response_id no host is known to hold: ask the next when one lacks it
    key_source: str | None = None  # what the conversation's key was made from


class HostStream(WrappedStream):
    """A host's stream that gives the host's slot back when it ends, however it ends."""

    def __init__(self, inner: ChatStream, release: Callable[[], None], route: Route,
                 created: Callable[[str], None] | None = None) -> None:
        super().__init__(inner)
        self.translated = inner.translated
        self.route = route
        self._release = release
        self._released = False
        self._created = created  # told the response's id, from its response.created event

    def event(self, payload: bytes, name: bytes | None = None) -> None:
        if self._created is not None and name == b"response.created":
            try:
                response = jsonio.loads(payload).get("response")
            except (ValueError, AttributeError):  # not a response event: the relay reports the stream broken
                response = None
            if isinstance(response, dict) and isinstance(response.get("id"), str):
                self._created(response["id"])
            self._created = None
        super().event(payload, name)

    def begin(self, consumer: EventConsumer) -> Deferred[None]:
        ended = super().begin(consumer)
        ended.addBoth(self._done)
        return ended

    def _done(self, result: Any) -> Any:
        if not self._released:
            self._released = True
            self._release()
        return result
