"""Server-sent events: an incremental parser for upstream bytes and the encoder for what clients get."""

from __future__ import annotations

import json

from .errors import GatewayError

DONE = b"[DONE]"
DONE_EVENT = b"data: [DONE]\n\n"


class SSEParser:
    """Turns a byte stream split anywhere into the ``data`` payloads of its events.

    Only ``data:`` fields matter for chat streams; comments (``: keep-alive``), ``event:`` and ``id:`` lines are
    skipped. Memory is bounded by the longest single event, which the caller limits with ``max_event_bytes``.
    """

    def __init__(self, max_event_bytes: int = 4 * 1024 * 1024) -> None:
        self._buffer = b""
        self._data: list[bytes] = []
        self._data_size = 0
        self._max = max_event_bytes

    def feed(self, chunk: bytes) -> list[bytes]:
        """Add bytes; return the payloads of the events they completed (a payload may still be incomplete)."""
        buffer = self._buffer + chunk if self._buffer else chunk
        events = []
        start = 0
        while True:  # walk the lines by index: one read can hold hundreds of events, so no re-slicing
            end = buffer.find(b"\n", start)
            if end < 0:
                break
            line = buffer[start:end]
            start = end + 1
            if line.endswith(b"\r"):
                line = line[:-1]
            if not line:
                if self._data:
                    events.append(b"\n".join(self._data))
                    self._data, self._data_size = [], 0
            elif line.startswith(b"data:"):
                value = line[5:]
                self._data.append(value[1:] if value.startswith(b" ") else value)
                self._data_size += len(value)
        self._buffer = buffer[start:]
        if len(self._buffer) + self._data_size > self._max:
            raise ValueError(f"an event is longer than {self._max} bytes")
        return events

    def close(self) -> list[bytes]:
        """The stream ended: an event not followed by a blank line still counts (some servers omit it)."""
        return self.feed(b"\n\n") if self._buffer or self._data else []


def encode(payload: bytes) -> bytes:
    """One ``data:`` event as relayed to the client (the upstream's JSON bytes, untouched)."""
    return b"data: " + payload + b"\n\n"


def error_event(error: GatewayError) -> bytes:
    """The event that ends a stream that failed after its 200 was sent (then ``[DONE]`` follows)."""
    return encode(json.dumps(error.body()).encode())
