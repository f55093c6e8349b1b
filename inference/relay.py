"""Relay one completion stream to one client as SSE, with flow control, cancellation and clean failure.

The stream is registered on the request as its push producer: when the client's socket backs up, Twisted
pauses it and the upstream read stops, so a stream holds at most about one socket buffer (64 KiB) of unsent
events plus one upstream read (up to 64 KiB) and one partial event. A client that disconnects cancels the
handler (Klein), which stops the stream and so aborts the upstream request.
"""

from __future__ import annotations

from typing import Any, cast

from twisted.internet.defer import CancelledError
from twisted.web.http import HTTPChannel
from twisted.web.server import Request

from . import jsonio
from .errors import GatewayError, UpstreamError
from .operations import OPENAI_STREAM, EventReader, StreamFormat, StreamStats
from .providers.base import ChatStream
from .sse import DONE, encode


def connected(request: Request) -> bool:
    """Whether the client is still there: twisted.web sets ``channel`` to None once its connection is gone (its
    types do not say so), and a write or ``unregisterProducer`` after that would fail."""
    return cast("HTTPChannel | None", request.channel) is not None


class StreamRelay:
    """Writes ``stream``'s events to ``request`` until the stream ends, fails, or the client leaves."""

    def __init__(self, request: Request, stream: ChatStream, read_event: EventReader,
                 stream_format: StreamFormat = OPENAI_STREAM, capture_content: bool = False) -> None:
        self._request = request
        self._stream: ChatStream | None = stream  # None once it ended (it holds this relay as its consumer)
        self._read_event = read_event  # the operation's: what an event says about the answer
        self._format = stream_format  # the operation's: how its stream fails and ends
        self._upstream_done = False
        self.stats = StreamStats(text=[] if capture_content else None)

    async def run(self) -> StreamStats:
        """Relay the whole stream; never raises once the 200 is out, except to report the client gone."""
        assert self._stream is not None  # (a relay runs once)
        try:
            return await self._relay(self._stream)
        finally:  # the stream and this relay refer to each other: without the cycle the request is freed at once
            self._stream = None

    async def _relay(self, stream: ChatStream) -> StreamStats:
        request = self._request
        request.setResponseCode(200)
        request.setHeader(b"Content-Type", b"text/event-stream")
        request.setHeader(b"Cache-Control", b"no-cache")
        request.setHeader(b"X-Accel-Buffering", b"no")
        request.registerProducer(stream, True)
        try:
            await stream.begin(self)
            if not (self._upstream_done or self.stats.facts.finish_reasons):
                raise UpstreamError("upstream ended the stream without finishing it", kind="interrupted")
        except CancelledError:
            if self.stats.error is None:  # Klein cancelled us: the client went away
                self.stats.client_gone = True
                raise
        except GatewayError as e:
            self.stats.error = self.stats.error or e
        except Exception as e:  # a transport error the stream did not translate
            self.stats.error = self.stats.error or UpstreamError(f"upstream stream failed: {e}")
        finally:
            if connected(request) and request.producer is not None:
                request.unregisterProducer()
        if not connected(request):
            self.stats.client_gone = True
            return self.stats
        if self.stats.error is not None:
            ending = stream.failure_events(self.stats.error)  # a translated stream's own, in its API's shape
            request.write(ending if ending is not None else self._format.error_event(self.stats.error, self.stats))
        if self._format.closing:
            request.write(self._format.closing)
        return self.stats

    def event(self, payload: bytes, name: bytes | None = None, parsed: dict[str, Any] | None = None) -> None:
        """One upstream event: looked at for what metrics need (``parsed``, when the stream has it already), then
        relayed as the very same bytes."""
        if self._upstream_done or self.stats.error is not None:
            return
        if payload == DONE:
            self._upstream_done = True
            return
        try:
            chunk = parsed if parsed is not None else jsonio.loads(payload)
        except ValueError:
            return self._fail(UpstreamError("upstream sent an event that is not JSON"))
        if not isinstance(chunk, dict):
            return self._fail(UpstreamError("upstream sent an event that is not a JSON object"))
        failure = self._format.failure(chunk, payload)
        if failure is not None:
            return self._fail(failure)
        self._read_event(chunk, self.stats)
        if connected(self._request):
            self._request.write(encode(payload, name))

    def interrupt(self, error: GatewayError) -> None:
        """End the stream now with ``error`` (the daemon is stopping): between two events, never inside one."""
        if not self._upstream_done and self.stats.error is None:
            self._fail(error)

    def _fail(self, error: GatewayError) -> None:
        self.stats.error = error
        if self._stream is not None:
            self._stream.fail(error)
