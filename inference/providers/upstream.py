"""The HTTP client every network provider shares: treq over one connection pool, a total deadline, safe retries.

Requests go through treq's ``HTTPClient`` on an ``Agent`` whose pool is sized and timed by the ``http:`` config and
whose endpoints are made once per address. treq keeps its gzip decoding (OpenAI compresses its answers); it is
told never to follow a redirect (a 3xx is an upstream error, and the upstream's key must not reach another host)
and given a cookie jar that keeps nothing (one upstream session must not carry cookies from one client's request
to another's). treq's ``timeout=`` would stop at the response headers, and cancelling ``treq.content()`` leaves the
socket open (see docs/twisted.md), so answers are read by a protocol of ours that can abort the connection, and
one timer covers the whole exchange: connect, retries, headers and body.
"""

from __future__ import annotations

import urllib.request
from collections.abc import Callable
from dataclasses import dataclass
from functools import partial
from http.client import HTTPResponse
from typing import Any, cast

from hyperlink import EncodedURL
from treq.client import HTTPClient
from treq.cookies import IndexableCookieJar
from twisted.internet import error as neterror
from twisted.internet.abstract import isIPAddress, isIPv6Address
from twisted.internet.defer import CancelledError, Deferred, succeed
from twisted.internet.endpoints import HostnameEndpoint, TCP4ClientEndpoint, TCP6ClientEndpoint, wrapClientTLS
from twisted.internet.interfaces import IDelayedCall, IPushProducer, IReactorTime
from twisted.internet.protocol import Protocol, connectionDone
from twisted.internet.task import deferLater
from twisted.logger import Logger
from twisted.python.failure import Failure
from twisted.web import _newclient
from twisted.web.client import (
    URI,
    Agent,
    BrowserLikePolicyForHTTPS,
    HTTPConnectionPool,
    ResponseDone,
    _HTTP11ClientFactory,
    _RetryingHTTP11ClientProtocol,
)
from twisted.web.http import PotentialDataLoss
from twisted.web.http_headers import Headers
from twisted.web.iweb import IAgent, IAgentEndpointFactory, IBodyProducer, IResponse
from zope.interface import implementer

from ..config import UNBOUNDED_IDLE_CONNECTIONS, HttpConfig
from ..errors import GatewayError, UpstreamError, UpstreamTimeout, UpstreamUnreachable
from ..reactor import IGatewayReactor, send_buffered
from ..sse import SSEParser
from .base import ChatStream, EventConsumer

log = Logger()

MAX_RESPONSE_BYTES = 32 * 1024 * 1024
"""A non-streaming answer larger than this is refused rather than buffered (a broken upstream must not OOM us)."""

# Failures that happen before the upstream could have seen a whole request: retrying them cannot run a
# generation twice. A connection that dies after the request went out (ResponseNeverReceived) is not here.
_NOT_SENT = (neterror.ConnectError, neterror.DNSLookupError, _newclient.RequestNotSent,
             _newclient.RequestTransmissionFailed)
_NO_CONNECTION = (neterror.ConnectError, neterror.DNSLookupError)


@dataclass
class Answer:
    """A complete upstream answer."""

    status: int
    headers: Headers
    body: bytes


def normalise_base_url(base_url: str) -> str:
    """``http://host:1234``, ``http://host:1234/`` and ``http://host:1234/v1/`` all mean the same server."""
    url = base_url.rstrip("/")
    if url.endswith("/v1"):
        url = url[: -len("/v1")]
    return url


class UpstreamClient:
    """Talks HTTP to one upstream over a pool sized and timed by the ``http:`` config."""

    def __init__(self, reactor: IGatewayReactor, base_url: str, http: HttpConfig,
                 headers: dict[str, str] | None = None, retry_connect: bool = True,
                 agent: IAgent | None = None) -> None:
        """``agent`` replaces the pooled one (tests serve a fake upstream through an in-memory agent)."""
        self._reactor: IReactorTime = reactor
        self._http = http
        self._retry_connect = retry_connect  # a fleet's host does not: the next host is the retry
        self.base_url = normalise_base_url(base_url)
        self.pool = _Pool(reactor, persistent=True)
        idle = http.max_idle_connections  # (resolved per host by make_provider: see InferenceConfig.idle_connections)
        self.pool.maxPersistentPerHost = idle if idle is not None else UNBOUNDED_IDLE_CONNECTIONS
        self.pool.cachedConnectionTimeout = http.keep_alive_secs  # type: ignore[assignment]  # (a float works)
        if agent is None:
            agent = _Agent.usingEndpointFactory(reactor, _Endpoints(reactor, http.connect_timeout_secs), self.pool)
        self.treq = HTTPClient(agent, cookiejar=_NO_COOKIES, data_to_body_producer=BytesProducer)
        # Host given here, as the Agent would compute it: the Agent adds it to a copy of every request's headers
        self._headers = {"Host": _host_header(self.base_url), "Accept": "application/json", **(headers or {})}
        self._json_headers = {**self._headers, "Content-Type": "application/json"}
        self._urls: dict[str, EncodedURL] = {}

    def request(self, method: str, path: str, body: bytes | None = None, timeout: float | None = None,
                headers: dict[str, str] | None = None) -> Deferred[Answer]:
        """Send one request and read the whole answer, within ``timeout`` (default ``http.timeout_secs``).

        Fails with :class:`UpstreamUnreachable`, :class:`UpstreamTimeout` or :class:`UpstreamError`;
        cancelling the returned Deferred (the client went away) aborts the upstream connection.
        """
        async def exchange(state: _Exchange) -> Answer:
            response = await self._send(state, method, path, body, headers)
            return Answer(response.code, response.headers, await read_body(response))

        return self._within(timeout, exchange)

    def open(self, method: str, path: str, body: bytes | None = None, timeout: float | None = None,
             headers: dict[str, str] | None = None) -> Deferred[IResponse | Answer]:
        """Send one request expecting an event stream; return once its headers arrived, body unread.

        The deadline covers connecting and the headers; the stream's reader sets its own. Anything that is
        not a stream (an error status, or JSON, as LM Studio sends for some failures) is read whole within
        the deadline and returned as an :class:`Answer`.
        """
        async def exchange(state: _Exchange) -> IResponse | Answer:
            response = await self._send(state, method, path, body, headers)
            content_type = (response.headers.getRawHeaders(b"content-type") or [b""])[0]
            if response.code >= 300 or b"json" in content_type:
                return Answer(response.code, response.headers, await read_body(response))
            return response

        return self._within(timeout, exchange)

    def _within(self, timeout: float | None, exchange: Callable[[_Exchange], Any]) -> Deferred[Any]:
        """Run ``exchange`` under one deadline; cancelling the result aborts it without a retry."""
        state = _Exchange()
        inner = Deferred.fromCoroutine(exchange(state))
        deadline = timeout if timeout is not None else self._http.timeout_secs

        def expire() -> None:
            state.stopped = "timeout"
            inner.cancel()

        timer = self._reactor.callLater(deadline, expire)

        def cancel(_: Deferred[Any]) -> None:
            state.stopped = "cancelled"
            inner.cancel()

        outer: Deferred[Any] = Deferred(cancel)

        def settle(result: Any) -> None:
            if timer.active():
                timer.cancel()
            if outer.called:
                return
            if isinstance(result, Failure):
                outer.errback(_translate(result, state.stopped, deadline, self.base_url))
            else:
                outer.callback(result)

        inner.addBoth(settle)
        return outer

    async def _send(self, state: _Exchange, method: str, path: str, body: bytes | None,
                    extra_headers: dict[str, str] | None) -> IResponse:
        url = self._url_for(path)
        fields = self._json_headers if body is not None else self._headers
        if extra_headers:
            fields = {**fields, **extra_headers}
        attempt = 0
        while True:
            try:  # fresh Headers and producer per attempt: the agent may keep references to them
                response = await self.treq.request(
                    method, url, headers=Headers({name: [value] for name, value in fields.items()}), data=body,
                    cookies=_NO_COOKIES, allow_redirects=False, unbuffered=True)
                break
            except _NOT_SENT as e:
                if state.stopped or attempt >= self._http.max_retries or (
                        not self._retry_connect and isinstance(e, _NO_CONNECTION)):
                    raise
                delay = min(0.1 * 2 ** attempt, 2.0)
                attempt += 1
                log.warn("upstream {url} failed before the request was sent ({error}); retry {attempt} of "
                         "{retries} in {delay:.1f}s", url=self.base_url + path, error=_describe(e), attempt=attempt,
                         retries=self._http.max_retries, delay=delay)
                await deferLater(self._reactor, delay, lambda: None)
        if 300 <= response.code < 400:
            await read_body(response)  # drained, so the connection can serve the next request
            location = (response.headers.getRawHeaders(b"location") or [b"nowhere"])[0].decode("latin-1")[:200]
            raise UpstreamError(f"upstream at {self.base_url} answered HTTP {response.code}, a redirect to "
                                f"{location}; the gateway does not follow redirects: set inference.base_url to "
                                "the address that serves the API", status=502)
        return response

    def _url_for(self, path: str) -> EncodedURL:
        """The URL of ``path`` on the upstream, parsed and encoded once for all the requests that follow."""
        url = self._urls.get(path)
        if url is None:
            url = self._urls[path] = _EncodedOnce.from_uri(_as_uri(self.base_url + path))
        return url

    def close(self) -> Deferred[None]:
        """Close idle pooled connections (on shutdown, so no keep-alive socket outlives the service)."""
        closed: Deferred[None] = self.pool.closeCachedConnections()
        return closed


class _ClientProtocol(_newclient.HTTP11ClientProtocol):
    """Twisted's HTTP/1.1 client, sending a request at once in a lone turn, and leaving no garbage cycle behind a
    chunked answer.

    A request written in a turn that handles one event (a lone client's call: ``GatewayReactor.lone_turn``) goes
    to the kernel at once, not when the reactor next finds the socket writable: the upstream starts a turn sooner
    (4-8% more calls a second at one client in two alternated runs; in a busy turn the writes still go out
    together).

    The parser kept its chunked decoder, which keeps the parser's own ``_finished``, so each streamed exchange
    (about 30 objects) waited for a collection instead of going as it ended: at 1,000 streams a second that set
    off a young collection every second or two, and each stalled every stream for milliseconds."""

    def request(self, request: _newclient.Request) -> Deferred[IResponse]:
        answer: Deferred[IResponse] = super().request(request)
        if getattr(getattr(self.transport, "reactor", None), "lone_turn", False):
            send_buffered(self.transport)
        return answer

    def _disconnectParser(self, reason: Failure) -> None:
        parser = self._parser
        super()._disconnectParser(reason)
        if parser is not None:
            parser.bodyDecoder = None  # (told its connection is lost above: it reads nothing more)


class _ClientFactory(_HTTP11ClientFactory):
    def buildProtocol(self, addr: Any) -> _ClientProtocol:
        return _ClientProtocol(self._quiescentCallback)


class _Pool(HTTPConnectionPool):
    """The connection pool, with one retry Twisted's own makes only for GET: a call whose reused keep-alive
    connection is lost before any byte of the answer (the upstream timed it out as the request went out, or closed
    it after aborting a stream) is sent once more on a new connection, POST included: no answer of it was seen,
    and our bodies are bytes in memory (:class:`BytesProducer`) that can be written again. A connection lost that
    way on its first request is not retried: that host may have crashed on the request."""

    retryAutomatically = False  # (Twisted's rule: idempotent methods without a body only)
    _factory = _ClientFactory

    def getConnection(self, key: Any, endpoint: Any) -> Deferred[Any]:
        # As HTTPConnectionPool.getConnection, wrapping a reused connection in our retry rule.
        connections = self._connections.get(key)
        while connections:
            connection = connections.pop(0)
            self._timeouts.pop(connection).cancel()
            if connection.state == "QUIESCENT":
                return succeed(_RetryOnce(connection, partial(self._newConnection, key, endpoint)))
        new: Deferred[Any] = self._newConnection(key, endpoint)
        return new


class _RetryOnce(_RetryingHTTP11ClientProtocol):
    """A reused connection: its request is sent once more if the connection is lost before any answer byte."""

    def _shouldRetry(self, method: bytes, exception: Exception, bodyProducer: Any) -> bool:
        if bodyProducer is not None and not isinstance(bodyProducer, BytesProducer):
            return False  # a body that cannot be written twice
        # Twisted's other checks (no answer byte came, not cancelled), with the method and body taken as retryable
        retry = bool(super()._shouldRetry(b"GET", exception, None))
        if retry:
            log.info("upstream closed a reused connection before answering ({error}); sent again on a new "
                     "connection", error=_describe(exception))
        return retry


class _EncodedOnce(EncodedURL):
    """A URL already in its ASCII URI form. treq re-encodes every URL it is given (IDNA host included) and then
    writes it out as text, which together cost a request about 35 µs; both are done once, when first used."""

    _text: str

    @classmethod
    def from_uri(cls, uri: EncodedURL) -> _EncodedOnce:
        url = cls(uri.scheme, uri.host, uri.path, uri.query, uri.fragment, uri.port, uri.rooted, uri.userinfo,
                  uri.uses_netloc)
        url._text = uri.to_text()
        return url

    def to_uri(self) -> _EncodedOnce:
        return self

    def to_text(self, with_password: bool = False) -> str:
        return self._text if not with_password else str(super().to_text(with_password))


class _Agent(Agent):
    """Twisted's Agent, with each URL it is given parsed once: it parses every request's URL again (through
    ``urlparse`` and a deprecation proxy), which cost a request about 10 µs. treq passes the URLs of
    :class:`_EncodedOnce`, one per path, so the map stays as small as the paths the gateway calls."""

    _MAX_TARGETS = 256
    _targets: dict[bytes, tuple[URI, Any]]

    @classmethod
    def usingEndpointFactory(cls, reactor: Any, endpointFactory: IAgentEndpointFactory,
                             pool: HTTPConnectionPool | None = None) -> _Agent:
        agent = cast(_Agent, super().usingEndpointFactory(reactor, endpointFactory, pool))
        agent._targets = {}
        return agent

    def request(self, method: bytes, uri: bytes, headers: Headers | None = None,
                bodyProducer: IBodyProducer | None = None) -> Deferred[IResponse]:
        targets = self._targets
        target = targets.get(uri)
        if target is None:
            parsed = URI.fromBytes(uri)
            if parsed.scheme not in (b"http", b"https") or len(targets) >= self._MAX_TARGETS:
                return super().request(method, uri, headers, bodyProducer)  # (its own errors and checks)
            target = targets[uri] = (parsed, self._getEndpoint(parsed))
        parsed, endpoint = target
        return self._requestWithEndpoint((parsed.scheme, parsed.host, parsed.port), endpoint, method, parsed,
                                         headers, bodyProducer, parsed.originForm)


def _as_uri(text: str) -> EncodedURL:
    """``text`` as an ASCII URI (an IDN host IDNA-encoded, the rest percent-encoded). hyperlink would IDNA-encode
    an IPv6 address too, and fail on its colons: such a host is kept as it is."""
    url = EncodedURL.from_text(text)
    if isIPv6Address(url.host):
        return url.replace(host="ipv6.invalid").to_uri().replace(host=url.host)
    return url.to_uri()


def _host_header(base_url: str) -> str:
    """The Host header of requests to ``base_url``, as twisted.web's Agent writes it."""
    url = URI.fromBytes(_as_uri(base_url).to_text().encode("ascii"))
    host: str = url.host.decode("ascii")
    if isIPv6Address(host):
        host = f"[{host}]"
    if (url.scheme, url.port) in ((b"http", 80), (b"https", 443)):
        return host
    return f"{host}:{url.port}"


class _NoCookies(IndexableCookieJar):
    """Keeps no cookie: the pool serves every client, so a cookie an upstream sets must not go back with another
    client's request (and answers need not be searched for them)."""

    def add_cookie_header(self, request: urllib.request.Request) -> None:
        pass

    def extract_cookies(self, response: HTTPResponse, request: urllib.request.Request) -> None:
        pass


_NO_COOKIES = _NoCookies()


@implementer(IAgentEndpointFactory)
class _Endpoints:
    """The endpoint for each upstream address, made once: the Agent's default makes a new one per request,
    IDNA-encoding the host name every time, which the benchmark saw as 3% of a request's CPU."""

    def __init__(self, reactor: IGatewayReactor, connect_timeout: float) -> None:
        self._reactor = reactor
        self._timeout = connect_timeout
        self._tls = BrowserLikePolicyForHTTPS()
        self._cache: dict[tuple[bytes, bytes, int], Any] = {}

    def endpointForURI(self, uri: Any) -> Any:
        key = (uri.scheme, uri.host, uri.port)
        endpoint = self._cache.get(key)
        if endpoint is None:
            host = uri.host.decode("ascii")
            endpoint = _endpoint(self._reactor, host, uri.port, self._timeout)
            if uri.scheme == b"https":
                endpoint = wrapClientTLS(self._tls.creatorForNetloc(uri.host, uri.port), endpoint)
            self._cache[key] = endpoint
        return endpoint


def _endpoint(reactor: IGatewayReactor, host: str, port: int, timeout: float) -> Any:
    """An IP address is connected to directly: HostnameEndpoint would resolve it in a thread, and takes 300 ms
    more to report a refused connection (twisted/twisted#8202), which a fleet's failover would wait for."""
    if isIPAddress(host):
        return TCP4ClientEndpoint(reactor, host, port, timeout=timeout)
    if isIPv6Address(host.strip("[]")):
        return TCP6ClientEndpoint(reactor, host.strip("[]"), port, timeout=timeout)
    return HostnameEndpoint(reactor, host, port, timeout=timeout)


@implementer(IBodyProducer)
class BytesProducer:
    """A request body that is already in memory, written at once (no cooperator, no file wrapper)."""

    def __init__(self, body: bytes) -> None:
        self.body = body
        self.length = len(body)

    def startProducing(self, consumer: Any) -> Deferred[None]:
        consumer.write(self.body)
        return succeed(None)

    def pauseProducing(self) -> None:
        pass

    def resumeProducing(self) -> None:
        pass

    def stopProducing(self) -> None:
        pass


class _Exchange:
    stopped: str | None = None  # "timeout" or "cancelled" once the exchange was stopped from outside


def read_body(response: IResponse, limit: int = MAX_RESPONSE_BYTES) -> Deferred[bytes]:
    """Collect a response body; cancelling the Deferred closes the connection (``treq.content`` does not)."""
    collector = _BodyCollector(limit)
    response.deliverBody(collector)
    return collector.done


class _BodyReader(Protocol):
    """A response body's protocol: its transport is the connection's producer, which can pause, resume or abort it
    (twisted.web types it as a plain transport)."""

    @property
    def producer(self) -> IPushProducer | None:
        return cast("IPushProducer | None", self.transport)


class _BodyCollector(_BodyReader):
    def __init__(self, limit: int) -> None:
        self._limit = limit
        self._parts: list[bytes] = []
        self._size = 0
        self._overflow = False
        self.done: Deferred[bytes] = Deferred(self._cancel)

    def _cancel(self, _: Deferred[bytes]) -> None:
        if self.producer is not None:
            self.producer.stopProducing()

    def dataReceived(self, data: bytes) -> None:
        if self._overflow:
            return
        self._size += len(data)
        if self._size > self._limit:
            self._overflow = True
            self._parts.clear()
            if self.producer is not None:
                self.producer.stopProducing()
            return
        self._parts.append(data)

    def connectionLost(self, reason: Failure = connectionDone) -> None:
        if self.done.called:
            return
        if self._overflow:
            self.done.errback(UpstreamError(f"upstream answer is larger than {self._limit} bytes"))
        elif reason.check(ResponseDone, PotentialDataLoss):
            self.done.callback(b"".join(self._parts))
        else:
            self.done.errback(reason)


def _translate(failure: Failure, stopped: str | None, deadline: float, base_url: str) -> Any:
    """Map what Twisted raised to the error table (docs/design.md)."""
    if stopped == "timeout":
        return UpstreamTimeout(f"upstream did not answer within {deadline:g}s ({base_url})")
    if stopped == "cancelled":
        return failure if failure.check(CancelledError) else Failure(CancelledError())
    if failure.check(GatewayError):
        return failure
    if failure.check(neterror.TimeoutError):
        return UpstreamUnreachable(f"could not connect to upstream at {base_url}: connect timed out")
    if failure.check(*_NOT_SENT):
        return UpstreamUnreachable(f"could not connect to upstream at {base_url}: {_describe(failure.value)}")
    if failure.check(_newclient.ResponseFailed, _newclient.ParseError):
        return UpstreamError(f"upstream at {base_url} closed the connection before a complete answer "
                             f"({_describe(failure.value)})", kind="interrupted")
    return failure


def _describe(error: BaseException | None) -> str:
    """One readable line for Twisted's nested connection errors."""
    reasons = getattr(error, "reasons", None)
    if reasons:
        return "; ".join(_describe(r.value) for r in reasons)
    if isinstance(error, neterror.ConnectionRefusedError):
        return "connection refused"
    text = str(error).strip().rstrip(".")
    return text or type(error).__name__


class UpstreamEventStream(_BodyReader, ChatStream):
    """Reads an upstream SSE body as it arrives and hands each event on, with flow control and an idle limit.

    ``idle_timeout`` is how long the upstream may stay silent while we are not holding it back; a stream may
    run longer than that in total, since a long generation is not a stalled one.
    """

    def __init__(self, response: IResponse, reactor: IGatewayReactor, idle_timeout: float,
                 first_timeout: float | None = None) -> None:
        self._response = response
        self._reactor = reactor
        self._idle_timeout = idle_timeout
        self._first_timeout = first_timeout  # to the first bytes, when longer (a model being loaded)
        self._armed_for = idle_timeout
        self._parser = SSEParser()
        self._timer: IDelayedCall | None = None
        self._paused = False
        self._failure: Exception | None = None
        self._consumer: EventConsumer | None = None
        self.delivered = 0  # events handed on so far
        self.done: Deferred[None] = Deferred(lambda _: self.stopProducing())

    def begin(self, consumer: EventConsumer) -> Deferred[None]:
        self._consumer = consumer
        self._arm(self._first_timeout)
        self._response.deliverBody(self)
        return self.done

    def fail(self, error: Exception) -> None:
        """End the stream with ``error``: the upstream connection is closed, then ``done`` fails with it."""
        if self._failure is None:
            self._failure = error
        self.stopProducing()
        if self.transport is None and not self.done.called:
            self.done.errback(error)

    # -- IPushProducer, driven by the client connection ---------------------------------------------------------

    def pauseProducing(self) -> None:
        self._paused = True
        self._disarm()
        if self.producer is not None:
            self.producer.pauseProducing()

    def resumeProducing(self) -> None:
        self._paused = False
        self._arm()
        if self.producer is not None:
            self.producer.resumeProducing()

    def stopProducing(self) -> None:
        self._disarm()
        if self.producer is not None:
            self.producer.stopProducing()

    # -- body protocol -------------------------------------------------------------------------------------------

    def dataReceived(self, data: bytes) -> None:
        if self._failure is not None:
            return
        if not self._paused:
            self._arm()
        try:
            events = self._parser.feed(data)
        except ValueError as e:
            self.fail(UpstreamError(f"upstream stream is malformed: {e}"))
            return
        consumer = self._delivering_to()
        self.delivered += len(events)
        for payload, name in events:
            if self._failed():  # the consumer may have failed the stream on the previous event
                break
            consumer.event(payload, name)

    def connectionLost(self, reason: Failure = connectionDone) -> None:
        self._disarm()
        if self.done.called:
            return
        if self._failure is not None:
            self.done.errback(self._failure)
        elif reason.check(ResponseDone, PotentialDataLoss):
            consumer = self._delivering_to()
            for payload, name in self._parser.close():
                self.delivered += 1
                consumer.event(payload, name)
            if self._failed():  # the last events may have been unusable
                self.done.errback(self._failure)
            else:
                self.done.callback(None)
        else:
            self.done.errback(UpstreamError(f"upstream connection was lost mid-stream ({_describe(reason.value)})",
                                            kind="interrupted"))

    def _delivering_to(self) -> EventConsumer:
        assert self._consumer is not None  # begin() sets it before the body is delivered
        return self._consumer

    def _failed(self) -> bool:
        return self._failure is not None

    def _arm(self, timeout: float | None = None) -> None:
        timeout = self._armed_for = timeout or self._idle_timeout
        if self._timer is not None and self._timer.active():
            self._timer.reset(timeout)
        else:
            self._timer = self._reactor.callLater(timeout, self._idle)

    def _disarm(self) -> None:
        if self._timer is not None and self._timer.active():
            self._timer.cancel()
        self._timer = None

    def _idle(self) -> None:
        self._timer = None
        self.fail(UpstreamTimeout(f"upstream sent nothing for {self._armed_for:g}s mid-stream"))
