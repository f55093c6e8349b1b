"""Server-sent events: an incremental parser for upstream bytes and the encoder for what clients get."""

from __future__ import annotations

import json

from .errors import GatewayError

DONE = b"[DONE]"
DONE_EVENT = b"data: [DONE]\n\n"


Event = tuple[bytes, "bytes | None"]
"""One server-sent event: its ``data`` payload and its ``event:`` name, if it had one (the Responses and Messages
APIs name every event; chat streams name none). A plain tuple: one is made per relayed event."""


class SSEParser:
    """Turns a byte stream split anywhere into its events.

    Comments (``: keep-alive``) and ``id:`` lines are skipped. Memory is bounded by the longest single event,
    which the caller limits with ``max_event_bytes``.
    """

    def __init__(self, max_event_bytes: int = 4 * 1024 * 1024) -> None:
        self._buffer = b""
        self._data: list[bytes] = []
        self._data_size = 0
        self._name: bytes | None = None
        self._max = max_event_bytes

    def feed(self, chunk: bytes) -> list[Event]:
        """Add bytes; return the events they completed (an event may still be incomplete)."""
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
                    events.append((b"\n".join(self._data), self._name))
                    self._data, self._data_size = [], 0
                self._name = None  # a name belongs to the event it is in, even one without data
            elif line.startswith(b"data:"):
                value = line[5:]
                self._data.append(value[1:] if value.startswith(b" ") else value)
                self._data_size += len(value)
            elif line.startswith(b"event:"):
                value = line[6:]
                self._name = value[1:] if value.startswith(b" ") else value
        self._buffer = buffer[start:]
        if len(self._buffer) + self._data_size > self._max:
            raise ValueError(f"an event is longer than {self._max} bytes")
        return events

    def close(self) -> list[Event]:
        """The stream ended: an event not followed by a blank line still counts (some servers omit it)."""
        return self.feed(b"\n\n") if self._buffer or self._data else []


def encode(payload: bytes, name: bytes | None = None) -> bytes:
    """One event as relayed to the client (the upstream's JSON bytes and event name, untouched)."""
    if name is None:
        return b"data: " + payload + b"\n\n"
    return b"event: " + name + b"\ndata: " + payload + b"\n\n"


def error_event(error: GatewayError) -> bytes:
    """The event that ends a stream that failed after its 200 was sent (then ``[DONE]`` follows)."""
    return encode(json.dumps(error.body()).encode())
