"""The gateway in memory, on a fake clock: no socket, no sleep (the treq ``RequestTraversalAgent`` and synapse
``FakeChannel`` way, with the gateway's own site and channel).

A :class:`MemoryGateway` is built from a configuration like the daemon's, on a ``MemoryReactorClock``. Its upstreams
are fake servers (``FakeLMStudio`` resources, by base URL) reached through in-memory connections, and clients reach
its ``GatewaySite`` (its channel, limits and request class included) the same way. Nothing moves until the test
says so: :meth:`MemoryGateway.settle` moves bytes until none move, :meth:`MemoryGateway.advance` lets time pass.
Tests written on it are plain functions: a deadline of five minutes takes no time, and runs the same on a busy
machine.
"""

from __future__ import annotations

import itertools
import json
import queue
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

from treq.client import HTTPClient
from treq.content import content
from twisted.internet.address import IPv4Address
from twisted.internet.defer import Deferred
from twisted.internet.endpoints import TCP4ClientEndpoint
from twisted.internet.error import ConnectionRefusedError
from twisted.internet.protocol import Factory, Protocol, connectionDone
from twisted.internet.testing import MemoryReactorClock
from twisted.python.failure import Failure
from twisted.test import iosim
from twisted.web.client import Agent
from twisted.web.iweb import IAgent, IResponse
from twisted.web.resource import IResource
from twisted.web.server import Site
from zope.interface import implementer

from inference.config import load
from inference.providers.upstream import BytesProducer
from inference.service import GatewaySite, build_site

_PORTS = itertools.count(40000)


class FakeReactor(MemoryReactorClock):
    """A ``MemoryReactorClock`` with what the gateway asks of threads: work a thread hands back
    (``callFromThread``: span export reports, flushes) runs at the next :meth:`MemoryGateway.settle`."""

    def __init__(self) -> None:
        super().__init__()
        self._from_threads: queue.SimpleQueue[tuple[Callable[..., Any], tuple[Any, ...], dict[str, Any]]] = \
            queue.SimpleQueue()

    def callFromThread(self, f: Callable[..., Any], *args: Any, **kwargs: Any) -> None:  # noqa: N802 (Twisted's)
        self._from_threads.put((f, args, kwargs))

    def run_from_threads(self) -> bool:
        ran = False
        while not self._from_threads.empty():
            f, args, kwargs = self._from_threads.get()
            f(*args, **kwargs)
            ran = True
        return ran


@implementer(IAgent)
class MemoryAgent:
    """An agent whose requests ``server`` (a twisted.web ``Site``) answers through in-memory transports, pumped
    on ``clock`` (treq's ``RequestTraversalAgent``, with any site and a pump that says whether bytes moved)."""

    def __init__(self, server: Factory, clock: MemoryReactorClock) -> None:
        self._server = server
        self._clock = clock
        self._connector = MemoryReactorClock()  # where the agent's connection attempts land, to be wired up
        self._agent = Agent.usingEndpointFactory(self._connector, self)
        self._pumps: list[iosim.IOPump] = []
        self.refusing = False  # connections are refused (nothing listens there), as while the server is down
        self.attempts = 0  # connections asked for

    def endpointForURI(self, uri: Any) -> TCP4ClientEndpoint:
        return TCP4ClientEndpoint(self._connector, "127.0.0.1", uri.port)

    def request(self, method: bytes, uri: bytes, headers: Any = None, bodyProducer: Any = None) -> Deferred[Any]:
        answer = self._agent.request(method, uri, headers, bodyProducer)
        while self._connector.tcpClients:
            _, port, factory, _, _ = self._connector.tcpClients.pop()
            self.attempts += 1
            if self.refusing:
                factory.clientConnectionFailed(None, Failure(ConnectionRefusedError("Connection refused")))
            else:
                self._pumps.append(wire(self._server, factory.buildProtocol(None), self._clock, port))
        return answer

    def stop(self) -> None:
        """The server goes away: its connections close and new ones are refused until :meth:`start`."""
        self.refusing = True
        for pump in self._pumps:
            pump.serverIO.loseConnection()

    def start(self) -> None:
        self.refusing = False

    def pump(self) -> bool:
        """Move what is waiting on every connection once; whether anything moved (or a connection closed)."""
        moved = False
        for pump in list(self._pumps):
            moved = pump.pump(advanceClock=False) or moved
            if pump.clientIO.disconnected and pump.serverIO.disconnected:
                self._pumps.remove(pump)
        return moved


def wire(server: Factory, client: Protocol, clock: MemoryReactorClock, port: int = 3000) -> iosim.IOPump:
    """Connect ``client`` to a new protocol of ``server`` through in-memory transports."""
    peer = IPv4Address("TCP", "127.0.0.1", next(_PORTS))
    host = IPv4Address("TCP", "127.0.0.1", port)
    protocol = server.buildProtocol(peer)
    return iosim.connect(protocol, iosim.FakeTransport(protocol, isServer=True, hostAddress=host, peerAddress=peer),
                         client, iosim.FakeTransport(client, isServer=False, hostAddress=peer, peerAddress=host),
                         greet=False, clock=clock)  # (bytes move when pumped, as on a network)


class RawClient(Protocol):
    """A client that writes bytes and keeps what it is sent: for what HTTP libraries hide."""

    def __init__(self) -> None:
        self.data = b""
        self.lost = False

    def dataReceived(self, data: bytes) -> None:
        self.data += data

    def connectionLost(self, reason: Failure = connectionDone) -> None:
        self.lost = True


@dataclass
class Reply:
    status: int
    headers: dict[str, str]
    body: bytes

    def json(self) -> Any:
        return json.loads(self.body)

    @property
    def error(self) -> dict[str, Any]:
        return self.json()["error"]


class MemoryGateway:
    """A gateway on a fake clock in front of fake upstreams, all in memory (see the module's docstring)."""

    def __init__(self, upstreams: dict[str, IResource], env: dict[str, str] | None = None,
                 config_path: str | None = None) -> None:
        self.clock = FakeReactor()
        self._agents: list[MemoryAgent] = []
        env = {"INFERENCE_OBSERVABILITY_TRACING_EXPORTER": "none", "INFERENCE_INFERENCE_HEALTH_CHECK_SECS": "0",
               **(env or {})}

        self.upstreams: dict[str, MemoryAgent] = {}  # each upstream's agent, by base URL: stop() and start() it

        def connect(base_url: str) -> IAgent:
            url = base_url.rstrip("/")
            agent = self.upstreams[url] = self._agent(Site(upstreams[url], reactor=self.clock))
            return agent

        self.site: GatewaySite = build_site(load(config_path, env), self.clock, environ=env,  # type: ignore[arg-type]
                                            connect=connect)
        self.gateway = self.site.gateway
        self.http = HTTPClient(self._agent(self.site), data_to_body_producer=BytesProducer)  # (written at once)
        self._raw: list[iosim.IOPump] = []

    def _agent(self, server: Factory) -> MemoryAgent:
        agent = MemoryAgent(server, self.clock)
        self._agents.append(agent)
        return agent

    # -- time and bytes ------------------------------------------------------------------------------------------

    def settle(self, rounds: int = 10_000) -> None:
        """Run what is due now and move bytes everywhere until nothing moves."""
        for _ in range(rounds):
            self.clock.advance(0)
            moved = [agent.pump() for agent in self._agents] + [pump.pump(advanceClock=False) for pump in self._raw]
            moved.append(self.clock.run_from_threads())
            if not any(moved) and not [call for call in self.clock.getDelayedCalls() if call.getTime() <=
                                       self.clock.seconds()]:
                return
        raise AssertionError("the gateway kept moving bytes: a loop?")

    def advance(self, seconds: float) -> None:
        """Let ``seconds`` pass, a step at a time so that each timer fires when it is due, settling after each."""
        end = self.clock.seconds() + seconds
        while True:
            self.settle()
            due = [call.getTime() for call in self.clock.getDelayedCalls() if call.getTime() <= end]
            step = min(due, default=end) - self.clock.seconds()
            self.clock.advance(max(step, 0))
            if not due:
                self.settle()
                return

    @staticmethod
    def answered(d: Deferred[Any]) -> bool:
        """Whether ``d`` has its result (``called`` is also true while it waits on another Deferred)."""
        return d.called and not d.paused

    def result(self, d: Deferred[Any]) -> Any:
        """What ``d`` fired with, once everything settled (it must have fired)."""
        self.settle()
        results: list[Any] = []

        def keep(result: Any) -> Any:  # (a success stays d's result; a failure is raised here, not left unhandled)
            results.append(result)
            return None if isinstance(result, Failure) else result

        d.addBoth(keep)
        assert results, "no answer yet: the gateway is waiting for something (time, or an upstream)"
        if isinstance(results[0], Failure):
            results[0].raiseException()
        return results[0]

    # -- clients -------------------------------------------------------------------------------------------------

    def send(self, method: str, path: str, body: Any = None, headers: dict[str, str] | None = None) -> Deferred[Reply]:
        """Start a request (answered as time and bytes move)."""
        fields = {"Content-Type": ["application/json"]} if body is not None else {}
        fields.update({name: [value] for name, value in (headers or {}).items()})
        data = json.dumps(body).encode() if body is not None and not isinstance(body, bytes) else body
        answer: Deferred[IResponse] = self.http.request(method, "http://gateway" + path, headers=fields, data=data)

        async def read(response: IResponse) -> Reply:
            raw = await content(response)
            return Reply(response.code, {k.decode().lower(): v[0].decode() for k, v in
                                         response.headers.getAllRawHeaders()}, raw)

        return answer.addCallback(lambda response: Deferred.fromCoroutine(read(response)))

    def call(self, method: str, path: str, body: Any = None, headers: dict[str, str] | None = None) -> Reply:
        """A request and its whole answer."""
        reply: Reply = self.result(self.send(method, path, body, headers))
        return reply

    def post_chat(self, body: Any, headers: dict[str, str] | None = None) -> Reply:
        return self.call("POST", "/v1/chat/completions", body, headers)

    def metrics(self) -> Any:
        """``/metrics``, parsed (``conftest.Scrape``)."""
        from .conftest import Scrape
        reply = self.call("GET", "/metrics")
        assert reply.status == 200, reply.body
        return Scrape(reply.body.decode(), reply.headers.get("content-type", ""))

    def raw(self) -> tuple[RawClient, Callable[[bytes], None]]:
        """A raw client connection, and how to send it bytes."""
        client = RawClient()
        pump = wire(self.site, client, self.clock)
        self._raw.append(pump)
        return client, client.transport.write  # type: ignore[union-attr]

    def close(self) -> None:
        d = Deferred.fromCoroutine(self.gateway.close())
        self.settle()
        d.addErrback(lambda _: None)
