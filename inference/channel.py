"""The HTTP connection: twisted.web's ``HTTPChannel`` with the gateway's limits, and errors a client can read.

twisted.web answers a bad request with a bare ``400 Bad Request`` (or just hangs up when a line is too long)
and lets a client take as long as it likes to send a request, one byte at a time, as long as the bytes keep
coming. Here the request line, the headers and the time to receive a whole request are bounded by
``server.max_url_bytes``, ``server.max_header_bytes`` and ``server.read_timeout_secs``, and each refusal is
an OpenAI-shaped JSON error with the right status (414, 431, 408, 400). A slow client never reaches the
handler, so it never holds an upstream slot.
"""

from __future__ import annotations

from typing import Any

from twisted.internet.interfaces import IDelayedCall, ITCPTransport
from twisted.internet.protocol import connectionDone
from twisted.logger import Logger
from twisted.python.failure import Failure
from twisted.web.http import HTTPChannel
from twisted.web.http_headers import Headers

from .errors import (
    BadHTTPRequest,
    GatewayError,
    HeadersTooLarge,
    RequestReadTimeout,
    RequestTooLarge,
    URLTooLong,
    reason_phrase,
)
from .reactor import send_buffered

log = Logger()

LINGER_SECS = 2.0
"""How long a connection refused for a body too large reads (and drops) what its client still sends."""


class GatewayChannel(HTTPChannel):
    """One client connection. ``site`` (set by the site) carries ``config.server``."""

    site: Any
    span_start: tuple[Any, ...] | None = None  # the last request's SERVER span start, for the next alike (telemetry's)
    _read_timer: IDelayedCall | None = None
    _linger: IDelayedCall | None = None
    _refused = False

    def connectionMade(self) -> None:
        server = self.site.gateway.config.server
        self.max_url_bytes = server.max_url_bytes
        self.read_timeout = server.read_timeout_secs
        self.totalHeadersSize = server.max_header_bytes
        # A single line longer than this never gets a newline in time; the checks below name the limit.
        self.MAX_LENGTH = max(server.max_header_bytes, server.max_url_bytes + 32)
        self.site.connections.opened(self)
        super().connectionMade()

    def getHost(self) -> Any:
        """The local address, asked of the kernel once per connection (twisted.web asks for every request)."""
        host = self.__dict__.get("_host")
        if host is None:
            host = self._host = super().getHost()
        return host

    def isSecure(self) -> bool:
        """Whether the connection is TLS, found once per connection: Klein's routing and the SERVER span ask for
        every request, and each time twisted.web looks an interface adapter up to answer."""
        secure = self.__dict__.get("_secure")
        if secure is None:
            secure = self._secure = super().isSecure()
        return bool(secure)

    def writeHeaders(self, version: bytes, code: bytes, reason: bytes, headers: Any) -> None:
        """The status line and headers as one piece of bytes: twisted.web hands the transport a list of four
        pieces a header, each checked and counted on its own (about 2% of a short call's time under cProfile)."""
        if not isinstance(headers, Headers):
            super().writeHeaders(version, code, reason, headers)  # (twisted.web sanitises that form)
            return
        lines = [b"%s %s %s\r\n" % (version, code, reason)]
        for name, values in headers.getAllRawHeaders():
            for value in values:
                lines.append(b"%s: %s\r\n" % (name, value))
        lines.append(b"\r\n")
        if self.transport is not None:
            self.transport.write(b"".join(lines))

    def send_now(self) -> None:
        """Hand what the connection holds to the kernel now, not when the reactor next finds the socket writable.

        Only when the gateway is answering this one request (the caller decides): the answer then leaves before
        the work that follows it in the same turn (its metrics, span and access line), and the client's next
        request arrives while that work is done. With other requests in hand, the reactor's next turn sends all
        the answers together, which costs less (writing each at once was 30% more CPU a request at 16 clients)."""
        send_buffered(self.transport)

    # -- the time to receive a request ---------------------------------------------------------------------------

    def dataReceived(self, data: bytes) -> None:
        if self._refused:
            return  # answered already: what the client still sends (a body refused as too large) is dropped
        if self._read_timer is None and not self._handlingRequest:
            self._read_timer = self.callLater(self.read_timeout, self._read_timed_out)
        super().dataReceived(data)

    def allContentReceived(self) -> None:
        self._stop_read_timer()
        if not self._refused:  # (the end of a body refused as too large, in the same read: not a request)
            super().allContentReceived()

    def connectionLost(self, reason: Failure = connectionDone) -> None:
        self._stop_read_timer()
        if self._linger is not None and self._linger.active():
            self._linger.cancel()
        super().connectionLost(reason)
        self.site.connections.closed(self)

    def _stop_read_timer(self) -> None:
        if self._read_timer is not None:
            if self._read_timer.active():
                self._read_timer.cancel()
            self._read_timer = None

    def _read_timed_out(self) -> None:
        self._read_timer = None
        self.refuse(RequestReadTimeout(f"The request was not received in full within {self.read_timeout:g}s "
                                       "(server.read_timeout_secs)"))

    # -- sizes -----------------------------------------------------------------------------------------------------

    def lineReceived(self, line: bytes) -> None:
        if self._refused:
            return
        if self._receivedHeaderSize == 0:  # the request line
            parts = line.split(b" ")
            if len(parts) == 3 and len(parts[1]) > self.max_url_bytes:
                self._command, self._path = parts[0], parts[1]  # what was asked, for the metrics
                return self.refuse(self._url_too_long())
        elif self._receivedHeaderSize + len(line) > self.totalHeadersSize:
            return self.refuse(self._headers_too_large())
        super().lineReceived(line)

    def lineLengthExceeded(self, line: bytes) -> None:
        self.refuse(self._url_too_long() if self._receivedHeaderSize == 0 else self._headers_too_large())

    def _url_too_long(self) -> GatewayError:
        return URLTooLong(f"The URL is longer than {self.max_url_bytes} bytes (server.max_url_bytes)")

    def _headers_too_large(self) -> GatewayError:
        return HeadersTooLarge(f"The request line and headers are larger than {self.totalHeadersSize} bytes "
                               "(server.max_header_bytes)")

    def _respondToBadRequestAndDisconnect(self) -> None:
        """twisted.web's answer to a malformed request (bad request line, header, length or encoding)."""
        self.refuse(BadHTTPRequest("Malformed HTTP request: check the request line, the headers and the "
                                   "Content-Length or Transfer-Encoding"))

    # -- refusing ----------------------------------------------------------------------------------------------------

    def refuse(self, error: GatewayError) -> None:
        """Answer ``error`` and close the connection (the request, if any, never reaches a handler)."""
        if self._refused:
            return
        self._refused = True
        self._stop_read_timer()
        self.setTimeout(None)
        body = error.to_bytes()
        reason = reason_phrase(error.status)
        head = b"HTTP/1.1 %d %s\r\nContent-Type: application/json\r\nContent-Length: %d\r\nConnection: close\r\n" \
            % (error.status, reason, len(body))
        transport = self.transport
        assert transport is not None  # a request is being read from it
        transport.write(head + b"\r\n" + body)
        method, path = getattr(self, "_command", None), getattr(self, "_path", None)
        route = self.site.route_of(path.partition(b"?")[0]) if path else "other"
        self.site.telemetry.refused(method, route, error.status)
        peer = transport.getPeer()
        log.info("refused a request from {client}: {status} {message}", client=getattr(peer, "host", "-"),
                 status=error.status, message=error.message)
        if isinstance(error, RequestTooLarge) and ITCPTransport.providedBy(transport):
            # The client may still be sending its body: closing now, with its bytes unread, would reset the
            # connection and could lose the answer. The answer is ended with a FIN, what still comes is dropped,
            # and the connection closed when the client closes it, or after LINGER_SECS.
            transport.loseWriteConnection()
            self._linger = self.callLater(LINGER_SECS, transport.abortConnection)
            return
        self.loseConnection()
