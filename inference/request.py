"""The request class of the gateway's site: bounded in-memory bodies, request ids and measurement."""

from __future__ import annotations

from io import BytesIO
from typing import TYPE_CHECKING, Any, Protocol, cast

from twisted.python.failure import Failure

from .cors import Cors
from .errors import RequestTooLarge
from .logs import CURRENT_IDS, log_access, request_id_for
from .telemetry import RequestState, Telemetry

if TYPE_CHECKING:
    from .channel import GatewayChannel


class RequestSite(Protocol):
    """What a request needs of the site that made it (``service.GatewaySite``)."""

    telemetry: Telemetry
    cors: Cors | None
    max_body_bytes: int
    answering: int  # requests between process() and their end

    def route_of(self, path: bytes) -> str: ...


class GatewayRequest(RequestState):
    """A request whose body is kept in memory and stops growing at ``max_body_bytes``, and that is measured.

    twisted.web spools bodies over 100 kB to a temporary file (blocking disk I/O on the reactor) and has no
    size limit; here a body larger than ``server.max_body_bytes`` is refused with a 413 as soon as it is known to
    be: from its ``Content-Length``, or when a chunked body passes the limit. Every request is timed and traced
    from here, so errors Klein answers itself (404, 405) are counted like the rest.
    """

    request_id = ""
    _answering: RequestSite | None = None  # the site counting this request as being answered

    def __init__(self, channel: Any, *args: Any, **kwargs: Any) -> None:
        # No HTML-form parsing: this API takes JSON, and twisted.web would parse every POST's Content-Type
        # through the email package to find out (a measurable share of each request's CPU).
        kwargs.setdefault("parsePOSTFormSubmission", False)
        super().__init__(channel, *args, **kwargs)

    @property
    def gateway_site(self) -> RequestSite:
        """The site that made this request (twisted.web types the channel's site loosely)."""
        return cast(RequestSite, self.channel.site)  # type: ignore[attr-defined]

    def process(self) -> None:
        site = self._answering = self.gateway_site
        site.answering += 1
        self.request_id = request_id_for(self.getHeader(b"x-request-id"))
        self.setHeader(b"X-Request-ID", self.request_id)
        site.telemetry.request_started(self, site.route_of(self.path))
        if site.cors is not None and site.cors.apply(self):
            self.site = self.channel.site  # type: ignore[attr-defined]
            self.finish()  # a preflight, answered before routing
            return
        # The handler's coroutine copies this context, so what it logs carries the request's ids.
        ids = CURRENT_IDS.set((self.request_id, self.record.trace_id))
        try:
            super().process()
        finally:
            CURRENT_IDS.reset(ids)

    def finish(self) -> None:
        channel = cast("GatewayChannel | None", self.channel)
        super().finish()
        if channel is not None and self._answering is not None and self._answering.answering == 1:
            channel.send_now()  # alone: the answer goes before its metrics, span and access line are done
        self._ended(self.code)

    def connectionLost(self, reason: Failure) -> None:
        super().connectionLost(reason)
        if not self.finished and self.record.started:
            self._ended(None)

    def _ended(self, status: int | None) -> None:
        if self._answering is not None:
            self._answering.answering -= 1
            self._answering = None
        if self.record.recorded:
            return
        cast(RequestSite, self.site).telemetry.request_ended(self, status)  # (the channel is gone by now)
        log_access(self, status)

    def gotLength(self, length: int | None) -> None:
        self.content = BytesIO()
        if length is not None and length > self.gateway_site.max_body_bytes:
            self._too_large()  # said at once: the client need not send what will be refused

    def handleContentChunk(self, data: bytes) -> None:
        content = self.content
        assert content is not None  # gotLength made it
        if content.tell() + len(data) > self.gateway_site.max_body_bytes:
            self.content = BytesIO()
            self._too_large()  # a chunked body, as soon as it passes the limit
            return
        content.write(data)

    def _too_large(self) -> None:
        limit = self.gateway_site.max_body_bytes
        cast("GatewayChannel", self.channel).refuse(RequestTooLarge(
            f"Request body is larger than the limit of {limit} bytes (server.max_body_bytes)"))
