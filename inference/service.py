"""Assemble the daemon: config -> provider -> Klein app -> Site -> listening services, log observer, drain."""

from __future__ import annotations

import atexit
import gc
import os
import signal
from collections.abc import Callable, Mapping
from typing import Any, cast
from urllib.parse import unquote_to_bytes

from twisted.application import service
from twisted.application.internet import StreamServerEndpointService
from twisted.internet import endpoints
from twisted.internet.defer import CancelledError, Deferred, DeferredList, maybeDeferred
from twisted.internet.error import CannotListenError
from twisted.internet.interfaces import IReactorTime
from twisted.logger import ILogObserver, Logger
from twisted.python.components import Componentized
from twisted.web.http import Request as HTTPRequest
from twisted.web.resource import Resource
from twisted.web.server import Request, Site

from . import __version__
from .api import Gateway, route_of, write_error
from .channel import GatewayChannel
from .config import Config
from .cors import Cors
from .errors import GatewayError, InvalidRequest, MethodNotAllowed, RouteNotFound
from .listen import describe, server_endpoint
from .logs import FlushedPerTurn, LogFile, TextSink, make_observer
from .providers import Connector, make_provider
from .providers.fleet import FleetProvider
from .reactor import IGatewayReactor
from .request import GatewayRequest
from .resource import GatewayResource
from .telemetry import Metrics, Telemetry
from .telemetry.models import ModelTelemetry
from .usage import UsageLedger, resolve_store

log = Logger()


class MetricsResource(Resource):
    """``GET /metrics``: the Prometheus exposition, rendered on the spot (a few hundred series, well under 1 ms)."""

    isLeaf = True

    def __init__(self, metrics: Metrics, authorize: Callable[[Request], None]) -> None:
        super().__init__()
        self._metrics = metrics
        self._authorize = authorize  # raises AuthenticationFailed when server.protect_metrics wants a key

    def render(self, request: Request) -> bytes:
        try:
            self._authorize(request)
        except GatewayError as error:
            return write_error(request, error)
        if request.method not in (b"GET", b"HEAD"):
            return write_error(request, MethodNotAllowed(f"Method {request.method.decode('latin-1')} is not "
                                                         f"allowed on {request.path.decode('latin-1')}; use GET",
                                                         headers={"Allow": "GET, HEAD"}))
        body, content_type = self._metrics.render((request.getHeader(b"accept") or b"").decode("latin-1"))
        request.setHeader(b"Content-Type", content_type.encode("latin-1"))
        return body


CLOSE_GRACE_SECS = 2.0
"""How long a stop waits, after the drain, for clients to take the last bytes written to them."""


class Connections:
    """The site's open client connections, so that a stop can close them itself: the reactor's own shutdown drops
    every connection at once, with whatever was written to it and not yet sent (the end of a stream that finished
    during the drain, say)."""

    def __init__(self, clock: IReactorTime) -> None:
        self._clock = clock
        self._open: set[GatewayChannel] = set()
        self._all_closed: list[Deferred[None]] = []

    def opened(self, channel: GatewayChannel) -> None:
        self._open.add(channel)

    def closed(self, channel: GatewayChannel) -> None:
        self._open.discard(channel)
        if not self._open:
            waiting, self._all_closed = self._all_closed, []
            for d in waiting:
                d.callback(None)

    async def close(self, seconds: float) -> int:
        """Close every connection once what it was sent is written; wait up to ``seconds`` for that. Returns how
        many were still open (a client that reads nothing)."""
        for channel in list(self._open):
            channel.loseConnection()  # what is buffered is written first, then the socket closes
        if not self._open:
            return 0
        closed: Deferred[None] = Deferred()
        self._all_closed.append(closed)
        timer = self._clock.callLater(seconds, closed.cancel)
        try:
            await closed
        except CancelledError:
            return len(self._open)
        finally:
            if timer.active():
                timer.cancel()
        return 0


class GatewaySite(Site):
    requestFactory = GatewayRequest
    # Plain HTTP/1.1 (no TLS, so no HTTP/2 negotiation) with the server's limits. twisted.web types this attribute
    # as a factory of its HTTP/1.1-or-2 wrapper, which a channel class is not, though it serves the same purpose.
    protocol = GatewayChannel  # type: ignore[assignment]
    noisy = False  # no "Starting factory" lines: the service logs what it serves

    def __init__(self, gateway: Gateway) -> None:
        super().__init__(GatewayResource(gateway.app), timeout=gateway.config.server.idle_timeout_secs,
                         reactor=gateway.reactor)
        self.gateway = gateway
        self.connections = Connections(gateway.reactor)
        self.telemetry = gateway.telemetry
        self.max_body_bytes = gateway.config.server.max_body_bytes
        self.answering = 0  # requests between their processing and their end (GatewayRequest counts them)
        origins = gateway.config.server.cors_origins
        self.cors = Cors(origins) if origins else None
        # Metrics with a port of their own are not served here (with several processes on this port, a scrape
        # would reach any one of them).
        own_port = gateway.config.observability.metrics.port is not None
        self._metrics_path = None if own_port else gateway.telemetry.metrics_path
        self._metrics = MetricsResource(gateway.telemetry.metrics, gateway.authorize_operator)

    def log(self, request: HTTPRequest) -> None:
        """Twisted's combined-format access log is replaced by ``log_access`` (one line with model, TTFT, tokens)."""

    def route_of(self, path: bytes) -> str:
        return self.telemetry.metrics_route if path == self._metrics_path else route_of(path)

    def getResourceFor(self, request: Request) -> Any:
        if request.path == self._metrics_path:
            return self._metrics
        if b"%" in request.path:  # Klein would answer a path not UTF-8 with text/html; every answer here is JSON
            try:
                unquote_to_bytes(request.path).decode("utf-8")
            except UnicodeDecodeError:
                return _NOT_UTF8
        return super().getResourceFor(request)


def build_site(config: Config, reactor: IGatewayReactor, environ: Mapping[str, str] | None = None,
               connect: Connector | None = None) -> GatewaySite:
    """The web site for ``config``; ``site.gateway.close()`` releases what it holds when done.

    ``environ`` supplies the standard ``OTEL_*`` variables (the process environment by default); ``connect`` how
    upstreams are reached (default: pooled connections).
    """
    provider = make_provider(reactor, config.inference, connect)
    telemetry = Telemetry(config.observability, provider.name, provider.base_url,
                          os.environ if environ is None else environ, reactor)
    if isinstance(provider, FleetProvider):
        metrics = telemetry.metrics
        metrics.track_hosts([host.view for host in provider.hosts], provider.waiting)
        provider.on_eject = lambda name: metrics.child(metrics.upstream_ejections, name).inc()
        provider.placement.events = ModelTelemetry(metrics, telemetry.tracing)
    else:  # one host: every call is its
        telemetry.upstream = "mock" if config.inference.provider == "mock" else config.inference.hosts()[0].name
    store = resolve_store(config.inference.usage, os.environ if environ is None else environ)
    if store != "none":
        telemetry.ledger = UsageLedger(store, config.inference.usage, reactor, telemetry.metrics.usage_rows_dropped.inc)
    return GatewaySite(Gateway(config, provider, reactor, telemetry))


class MetricsSite(Site):
    """Only the metrics path, on ``observability.metrics.port``: one scrape target per process."""

    noisy = False

    def __init__(self, metrics: Metrics, path: str, authorize: Callable[[Request], None]) -> None:
        super().__init__(_OnlyAt(path.encode(), MetricsResource(metrics, authorize)))


class _OnlyAt(Resource):
    isLeaf = True

    def __init__(self, path: bytes, resource: Resource) -> None:
        super().__init__()
        self._path = path
        self._resource = resource

    def render(self, request: Request) -> bytes:
        if request.path != self._path:
            return write_error(request, RouteNotFound(f"Only {self._path.decode()} is served on this port"))
        body: bytes = self._resource.render(request)
        return body


class _NotUtf8(Resource):
    """The answer to a path that is not UTF-8 (``/v1/models/%ff``): a 400 in OpenAI's error shape."""

    isLeaf = True

    def render(self, request: Request) -> bytes:
        return write_error(request, InvalidRequest("The URL's path is not UTF-8 once its %-escapes are decoded",
                                                   code="invalid_url"))


_NOT_UTF8 = _NotUtf8()


class _Listener(StreamServerEndpointService):
    """Like ``strports.service``: a port that cannot be opened stops the daemon at start, with one line."""

    _raiseSynchronously = True

    def privilegedStartService(self) -> None:
        try:
            super().privilegedStartService()
        except CannotListenError as e:
            reason = getattr(e.socketError, "strerror", None) or e.socketError
            log.critical("cannot listen on {interface}:{port}: {reason}", interface=e.interface or "*",
                         port=e.port, reason=reason)
            raise SystemExit(1) from None


GC_GEN0_THRESHOLD = 50_000
"""Young collections are set off when this many more tracked objects were made than freed since the last one.

A call in flight holds about 220 of them (its request, deferreds, coroutines, headers, spans) while it waits on
its upstream, and more while it is handled; the count only moves by what is made minus what is freed and never
falls below zero, so calls starting and ending in waves push it up by the calls in flight. At 10,000, 64 clients
did that 28 times in 8 seconds: each young collection walked the live calls (1.7 ms) and freed nothing, where 16
clients set off one. At 50,000 none run at 64 clients. Garbage in cycles waits longer for its collection, bounded
by this count: a call leaves none on its common paths (an upstream's streamed answer did, see
``providers.upstream._ClientProtocol``); what waits is the few small objects an error or a cut connection leaves.
"""


def tune_gc() -> None:
    """Make the garbage collector cheap for a server that allocates many short-lived objects per request.

    ``gc.freeze()`` moves everything built at start (modules, config, the app) out of the collector's sight, so
    the collections that follow need not walk it again and again; a first-generation threshold of
    GC_GEN0_THRESHOLD instead of 700 runs them only when garbage, not the calls in flight, adds up. The freeze and
    a threshold of 10,000 were worth a fifth more requests per second and half the p99 in the benchmark.
    """
    gc.collect()
    gc.freeze()
    _, second, third = gc.get_threshold()
    gc.set_threshold(GC_GEN0_THRESHOLD, second, third)


class GatewayService(service.Service):
    """The daemon's life: say what it serves, on SIGHUP reload the API keys, on SIGUSR1 reopen its log file, and
    on SIGTERM drain the requests in flight, then release all.

    SIGTERM is handled here rather than by twistd, which would re-raise the signal and end the process by it:
    a stop that let every request finish is a success, and exits 0.
    """

    def __init__(self, site: GatewaySite, endpoint: str, reactor: IGatewayReactor, handle_sigterm: bool = True,
                 reopen_logs: Callable[[], None] | None = None) -> None:
        self._site = site
        self._endpoint = endpoint
        self._reactor = reactor
        self._handle_sigterm = handle_sigterm
        self._reopen_logs = reopen_logs
        self._stopping = False

    def startService(self) -> None:
        super().startService()
        gateway = self._site.gateway
        log.info("inference {version} serving provider {provider} ({upstream}) on {endpoint}",
                 version=__version__, provider=gateway.provider.name, upstream=gateway.provider.base_url,
                 endpoint=self._endpoint)
        gateway.start()
        tune_gc()
        if self._handle_sigterm:  # once running: the reactor installs its own handlers as it starts
            self._reactor.callWhenRunning(signal.signal, signal.SIGTERM,
                                          lambda number, frame: self._reactor.callFromThread(self._sigterm))
            self._reactor.callWhenRunning(signal.signal, signal.SIGHUP,
                                          lambda number, frame: self._reactor.callFromThread(gateway.keys.reload))
            if self._reopen_logs is not None:  # logrotate moved the file: write to a new one at the same path
                reopen = self._reopen_logs
                self._reactor.callWhenRunning(signal.signal, signal.SIGUSR1,
                                              lambda number, frame: self._reactor.callFromThread(reopen))

    def _sigterm(self) -> None:
        if self._stopping:
            log.info("SIGTERM again: already stopping")
            return
        self._stopping = True
        log.info("SIGTERM: stopping")
        self._reactor.stop()

    def stopService(self) -> Deferred[None]:
        super().stopService()
        return Deferred.fromCoroutine(self._stop())

    async def _stop(self) -> None:
        gateway = self._site.gateway
        grace = gateway.config.server.shutdown_timeout_secs
        running = len(gateway.inflight)
        if running:
            log.info("no longer accepting; letting {count} request(s) finish, for up to {grace:g}s",
                     count=running, grace=grace)
        interrupted = await gateway.inflight.drain(grace)
        if interrupted:
            log.warn("{count} request(s) still running after {grace:g}s were ended with an error",
                     count=interrupted, grace=grace)
        elif running:
            log.info("all requests finished")
        unsent = await self._site.connections.close(CLOSE_GRACE_SECS)
        if unsent:
            log.warn("{count} client connection(s) had not taken their last bytes after {grace:g}s; closed",
                     count=unsent, grace=CLOSE_GRACE_SECS)
        await gateway.close()


class _Daemon(service.MultiService):
    """The top service. It hands twistd the log observer the config asks for: twistd looks for an
    ``ILogObserver`` on the application before falling back to its own (``--logger`` still wins)."""

    def __init__(self, observer: ILogObserver | None) -> None:
        super().__init__()
        self._observer = observer

    def setServiceParent(self, parent: Any) -> Any:
        if isinstance(parent, Componentized) and self._observer is not None:
            parent.setComponent(ILogObserver, self._observer)
        return super().setServiceParent(parent)

    def stopService(self) -> Deferred[Any]:
        """The ports first, and closed (not only asked to close) before the drain says it accepts no more: a
        client that connects after that line is refused. (MultiService stops its children all at once.)"""
        service.Service.stopService(self)
        return Deferred.fromCoroutine(self._stop_children())

    async def _stop_children(self) -> None:
        children = list(reversed(list(self)))
        ports = [child for child in children if isinstance(child, _Listener)]
        await DeferredList([maybeDeferred(child.stopService) for child in ports])
        await DeferredList([maybeDeferred(child.stopService) for child in children if child not in ports])


def make_service(config: Config, listen: str | None = None, reactor: IGatewayReactor | None = None,
                 logs: TextSink | None = None) -> service.MultiService:
    """The whole daemon as a Twisted service: listen on ``listen`` (an endpoint string) or the config's, and log
    to ``logs`` (stdout; None leaves logging to twistd, for ``--logger`` and ``--syslog``)."""
    if reactor is None:
        from twisted.internet import reactor as default_reactor
        reactor = cast(IGatewayReactor, default_reactor)  # (the installed reactor: epoll provides it all)
    site = build_site(config, reactor)
    server = config.server
    where = listen or describe(server.host, server.port) + (" (shared: SO_REUSEPORT)" if server.reuse_port else "")
    lines = FlushedPerTurn(logs, reactor) if logs is not None else None
    top = _Daemon(make_observer(config.logging, lines) if lines is not None else None)
    reopen = None
    if isinstance(logs, LogFile) and lines is not None:
        def reopen() -> None:  # what was written to the old file reaches it first
            lines.flush()
            logs.reopen()
    if lines is not None:  # the last lines: those of the shutdown, and twistd's own once its reactor stopped
        reactor.addSystemEventTrigger("after", "shutdown", lines.flush)
        atexit.register(lines.flush)
    GatewayService(site, where, reactor, reopen_logs=reopen).setServiceParent(top)
    metrics = config.observability.metrics
    if metrics.enabled and metrics.port is not None:
        _Listener(endpoints.serverFromString(reactor, describe(server.host, metrics.port)),
                  MetricsSite(site.telemetry.metrics, metrics.path, site.gateway.authorize_operator)
                  ).setServiceParent(top)
    # Added last, stopped first: the port closes before the drain starts.
    _Listener(server_endpoint(reactor, server, listen), site).setServiceParent(top)
    return top

